"""OpenAPI components: the record, errors, and the served model's own schemas."""

from __future__ import annotations

from typing import Any

from ..models import Model
from ..records import Status

WEBSOCKET_PROTOCOL = """\
## Live results: WebSocket `GET /ws`

JSON text messages. Client to server, by `op`:
`{"op": "subscribe", "prediction_id": ID}` (or `"prediction_ids": [...]`),
`{"op": "unsubscribe", "prediction_id": ID}` (or `prediction_ids`),
`{"op": "predict", "input": INPUT, "request_id": "optional"}` (submits asynchronously and subscribes),
`{"op": "ping"}`, and `{"op": "auth", "token": TOKEN}` (see below).

Server to client, by `type`: `subscribed` (the current record, at once; if it is terminal it is the last
message for that id), `update` (each later status change, in order), `accepted` (for `predict`, with the
`request_id`), `pong`, `authenticated`, and `error` (`{"error": {"code", "message"}, "request_id"}`;
codes `invalid_json`, `invalid_message`, `unknown_op`, `not_found`, `too_many_subscriptions`,
`invalid_input`, `queue_full`, `not_ready`, `rate_limited`, `backend_unavailable`). The socket stays
open after an error. `GET /ws?prediction_id=ID` (repeatable) subscribes at connect. Each subscriber gets
exactly one terminal message per prediction.

With API tokens configured, send the token as the protocol `bearer.TOKEN` next to `zypher`
(`Sec-WebSocket-Protocol: zypher, bearer.TOKEN`) or as the first message `{"op": "auth", "token": TOKEN}`.
Upgrades from a browser origin other than the service's own (or the allowlist) are refused with 403.

Close codes: 1008 for a missing or wrong token (or none within 10 s of the upgrade), 1009 for a frame
over the size limit, 1013 for a client that fell behind its outbox or that authenticated by message past
the sockets allowed per client address, 1001 on server shutdown (after a `{"type": "shutdown"}` message).
"""

_TIMESTAMP = {"type": "string", "format": "date-time", "nullable": True}

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable machine-readable code", "example": "queue_full"},
                "message": {"type": "string", "description": "what went wrong, for people"},
            },
        }
    },
}

PREDICTION = {
    "type": "object",
    "required": [
        "prediction_id",
        "status",
        "model",
        "result",
        "error",
        "created_at",
        "started_at",
        "completed_at",
        "links",
    ],
    "properties": {
        "prediction_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "status": {"type": "string", "enum": [s.value for s in Status]},
        "model": {
            "type": "object",
            "required": ["name", "version"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
        },
        "result": {
            "allOf": [{"$ref": "#/components/schemas/ModelOutput"}],
            "nullable": True,
            "description": "the model's output once succeeded, else null",
        },
        "error": {
            "type": "object",
            "nullable": True,
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
        "created_at": _TIMESTAMP,
        "started_at": _TIMESTAMP,
        "completed_at": _TIMESTAMP,
        "expires_at": {**_TIMESTAMP, "description": "when a finished record is deleted (then GET answers 404)"},
        "attempts": {"type": "integer", "description": "times a worker started it (more than 1 after a crash)"},
        "metrics": {
            "type": "object",
            "properties": {
                "batch_size": {
                    "type": "integer",
                    "nullable": True,
                    "description": "predictions in the model call that ran this one",
                }
            },
        },
        "links": {
            "type": "object",
            "required": ["self"],
            "properties": {"self": {"type": "string"}},
        },
    },
}

# swagger3 validates only the envelope; the service checks `input` against the model's full JSON Schema
# (swagger3 understands a subset of it), so the spec below documents more than the validator enforces.
PREDICT_REQUEST_ENVELOPE = {
    "type": "object",
    "required": ["input"],
    "properties": {},
}


def components(model: Model) -> dict[str, Any]:
    return {
        "schemas": {
            "Error": ERROR,
            "Prediction": PREDICTION,
            "ModelInput": model.input_schema,
            "ModelOutput": model.output_schema,
            "PredictRequest": {
                "type": "object",
                "required": ["input"],
                "properties": {"input": {"$ref": "#/components/schemas/ModelInput"}},
            },
            "ModelInfo": {
                "type": "object",
                "required": ["name", "version", "input_schema", "output_schema"],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "input_schema": {"type": "object", "description": "JSON Schema of one input"},
                    "output_schema": {"type": "object", "description": "JSON Schema of one output"},
                },
            },
            "Status": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"type": "string"}},
            },
        }
    }
