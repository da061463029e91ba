"""OpenAPI components: the record, errors, and each served model's own schemas and routes."""

from __future__ import annotations

import copy
from typing import Any

from ..deployments import Deployment, Deployments
from ..records import DEAD_LETTERED, DELIVERED, GONE, PENDING, WEBHOOK_EVENTS, Status
from ..webhooks.target import MAX_URL_LENGTH

WEBSOCKET_PROTOCOL = """\
## Live results: WebSocket `GET /ws`

JSON text messages. Client to server, by `op`:
`{"op": "subscribe", "prediction_id": ID}` (or `"prediction_ids": [...]`),
`{"op": "unsubscribe", "prediction_id": ID}` (or `prediction_ids`),
`{"op": "predict", "input": INPUT, "model": "optional", "version": "optional", "request_id": "optional"}`
(submits asynchronously to the model named, else the default, and subscribes; it takes `webhook`,
`webhook_events_filter` and `stream` as `POST /predict` does),
`{"op": "subscribe", "prediction_id": ID, "from_index": K}` resumes a stream: its chunks from K + 1,
`{"op": "ping"}`, and `{"op": "auth", "token": TOKEN}` (see below).

Server to client, by `type`: `subscribed` (the current record, at once; if it is terminal it is the last
message for that id; a stream's `result` holds its chunks 0..k so far), `output` (`{"prediction_id",
"index", "chunk"}`: a stream's chunks from k + 1, each once, in order, all before its terminal `update`),
`progress` (`{"prediction_id", "fraction", "message"}`), `queue` (`{"prediction_id", "queue_position",
"estimated_start_at"}`: a queued prediction's place in line, at once and on each change, at most once a
second), `update` (each later status change, in order),
`accepted` (for `predict`, with the
`request_id`), `pong`, `authenticated`, and `error` (`{"error": {"code", "message"}, "request_id"}`;
codes `invalid_json`, `invalid_message`, `unknown_op`, `not_found`, `model_not_found`,
`too_many_subscriptions`, `invalid_input`, `invalid_webhook`, `stream_not_supported`, `queue_full`,
`not_ready`, `rate_limited`, `backend_unavailable`; a `from_index` that is not an integer from 0 is
`invalid_message`). The socket stays
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
_EVENTS = {"type": "array", "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)}, "minItems": 1}

WEBHOOK_STATE = {
    "type": "object",
    "nullable": True,
    "description": "where the prediction's events go, and how the delivery of the latest one stands; "
    "null without a webhook",
    "required": ["url", "events", "event", "state", "attempts", "last_status", "next_attempt_at", "delivered_at"],
    "properties": {
        "url": {"type": "string", "description": "the webhook URL without its query string and fragment"},
        "events": {**_EVENTS, "description": "the events asked for (`output` is accepted; none is sent yet)"},
        "event": {
            "type": "string",
            "nullable": True,
            "enum": ["start", "completed", None],
            "description": "the latest event sent or being sent; null until the first",
        },
        "state": {
            "type": "string",
            "nullable": True,
            "enum": [PENDING, DELIVERED, GONE, DEAD_LETTERED, None],
            "description": "pending (next_attempt_at says when), delivered, gone (the receiver answered 410) "
            "or dead_lettered (the last attempt failed, or the address was refused)",
        },
        "attempts": {"type": "integer", "description": "attempts made for `event`"},
        "last_status": {"type": "integer", "nullable": True, "description": "HTTP status of the last attempt"},
        "last_error": {
            "type": "string",
            "nullable": True,
            "description": "why the last attempt got no HTTP answer: timeout, connection_error or address_not_allowed",
        },
        "next_attempt_at": _TIMESTAMP,
        "delivered_at": _TIMESTAMP,
    },
}

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
        "result": {"nullable": True, "description": "the model's output once succeeded, else null"},
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
        "webhook": WEBHOOK_STATE,
        "stream": {
            "type": "boolean",
            "description": "run by the model's predict_stream: `result` is the list of chunks so far",
        },
        "progress": {
            "type": "object",
            "nullable": True,
            "description": "a stream's latest progress (as committed); null until the model reports one",
            "properties": {
                "fraction": {"type": "number", "minimum": 0, "maximum": 1},
                "message": {"type": "string", "nullable": True},
            },
        },
        "queue_position": {
            "type": "integer",
            "nullable": True,
            "description": "while queued: how many predictions wait before it (0: it is next), where the queue "
            "can tell (GET; live messages carry it in `queue` messages); else null",
        },
        "estimated_start_at": {
            **_TIMESTAMP,
            "description": "while queued: when it should start, from the queue's recent throughput; null "
            "before there is any",
        },
    },
}

WEBHOOK_REQUEST = {
    "webhook": {
        "type": "string",
        "format": "uri",
        "maxLength": MAX_URL_LENGTH,
        "description": "http(s) URL, without credentials, to POST the prediction's events to, signed by the "
        "Standard Webhooks scheme (docs/webhooks.md); 400 invalid_webhook if the service will not send there",
    },
    "webhook_events_filter": {
        **_EVENTS,
        "default": ["completed"],
        "description": "which events to send: start, output (accepted, not sent yet), completed",
    },
}

# swagger3 validates only the envelope; the service checks `input` against the model's full JSON Schema
# (swagger3 understands a subset of it), so the spec below documents more than the validator enforces.
# The webhook fields are checked by the service alone (a bad one is invalid_webhook, over HTTP and the
# WebSocket alike): the envelope lets them through unchecked, as it does any other property.
PREDICT_REQUEST_ENVELOPE = {
    "type": "object",
    "required": ["input"],
    "properties": {},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _record_of(output: str) -> dict[str, Any]:
    """A record whose `result` is documented as one model's output."""
    result = {"allOf": [_ref(output)], "nullable": True, "description": "the model's output once succeeded"}
    return {"allOf": [_ref("Prediction"), {"type": "object", "properties": {"result": result}}]}


PARAMETERS = {
    "type": "object",
    "description": "where it waits in the model's queue (docs/oip.md, the queue policy)",
    "properties": {
        "priority": {"type": "integer", "minimum": 0, "description": "1 is the highest; 0: the model's default"},
        "timeout": {
            "type": "integer",
            "minimum": 0,
            "description": "microseconds it may wait in the queue before it ends deadline_exceeded; 0: the default",
        },
    },
}


STREAM_REQUEST = {
    "stream": {
        "type": "boolean",
        "description": "run the model's predict_stream and push its chunks (output events) as they come; "
        "400 stream_not_supported for a model without one. Unset: true for a sync request with "
        "`Accept: text/event-stream` to a model that streams, else false",
    },
    "cancel_on_disconnect": {
        "type": "boolean",
        "default": False,
        "description": "a sync request answered as text/event-stream: cancel the prediction if the client goes "
        "away before it ends (otherwise it runs on, to be followed again by GET /predict/{id}/events)",
    },
}


def _request_of(input: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["input"],
        "properties": {"input": _ref(input), "parameters": PARAMETERS, **WEBHOOK_REQUEST, **STREAM_REQUEST},
    }


def _loading(name: str, version: str) -> dict[str, Any]:
    return {"description": f"model {name} version {version}: known once it has loaded"}


MODEL_VERSION = {
    "type": "object",
    "required": ["name", "version", "runtime", "state", "error", "default", "links"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string"},
        "runtime": {"type": "string", "enum": ["onnx", "sklearn", "python"]},
        "state": {"type": "string", "enum": ["loading", "ready", "failed"]},
        "error": {"type": "string", "nullable": True, "description": "why it failed to load"},
        "default": {"type": "boolean", "description": "the model version POST /predict runs"},
        "streams": {"type": "boolean", "description": "it has predict_stream: a request may ask for `stream: true`"},
        "served_by": {
            "type": "integer",
            "description": "redis: how many worker processes announce they serve it (docs/scaling.md)",
        },
        "conflict": {"type": "string", "description": "redis: workers serving it publish different descriptions"},
        "unavailable": {
            "type": "string",
            "description": "redis: no worker has served it for longer than --unserved-grace (predictions are refused)",
        },
        "queue": {
            "type": "object",
            "properties": {
                "depth": {"type": "integer", "nullable": True, "description": "predictions waiting"},
                "max": {"type": "integer", "description": "past it, predictions are refused (503)"},
            },
        },
        "links": {"type": "object", "properties": {"self": {"type": "string"}, "predict": {"type": "string"}}},
    },
}


def components(default_name: str, default_version: str) -> dict[str, Any]:
    """The shared components; the default model's schemas are ModelInput and ModelOutput (and each model
    version's under its own names, from document_models)."""
    return {
        "schemas": {
            "Error": ERROR,
            "Prediction": PREDICTION,
            "ModelInput": _loading(default_name, default_version),
            "ModelOutput": _loading(default_name, default_version),
            "DefaultPrediction": _record_of("ModelOutput"),
            "PredictRequest": _request_of("ModelInput"),
            "AnyModelRequest": {
                **PREDICT_REQUEST_ENVELOPE,
                "description": "`input`: an input of the model the path names (its schema: GET /models/{name}); "
                "`webhook`, `webhook_events_filter`, `stream` and `cancel_on_disconnect` as in PredictRequest",
            },
            "ModelInfo": {
                "allOf": [
                    {"$ref": "#/components/schemas/ModelVersion"},
                    {
                        "type": "object",
                        "required": ["input_schema", "output_schema", "versions"],
                        "properties": {
                            "input_schema": {
                                "type": "object",
                                "nullable": True,
                                "description": "JSON Schema of one input",
                            },
                            "output_schema": {
                                "type": "object",
                                "nullable": True,
                                "description": "JSON Schema of one output",
                            },
                            "versions": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                ]
            },
            "ModelVersion": MODEL_VERSION,
            "ModelList": {
                "type": "object",
                "required": ["default", "models"],
                "properties": {
                    "default": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                    },
                    "models": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "default_version", "versions"],
                            "properties": {
                                "name": {"type": "string"},
                                "default_version": {"type": "string"},
                                "versions": {"type": "array", "items": _ref("ModelVersion")},
                            },
                        },
                    },
                },
            },
            "Status": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"type": "string"}},
            },
        }
    }


def _names(deployment: Deployment) -> tuple[str, str, str, str]:
    """Component names of one model version: its input, output, request and record."""
    suffix = f"{deployment.name}.{deployment.version}"
    return f"ModelInput.{suffix}", f"ModelOutput.{suffix}", f"PredictRequest.{suffix}", f"Prediction.{suffix}"


def document_models(spec: dict[str, Any], deployments: Deployments) -> None:
    """A documented route per model (`/models/NAME/predict`) and model version, with that model's own
    schemas, copied from the generic predict operation (`POST /predict`). They are documentation: the
    routes `/models/{name}/...` answer them. Schemas are filled in by `describe_model` once loaded."""
    operation = spec["paths"]["/predict"]["post"]
    schemas = spec["components"]["schemas"]
    for deployment in deployments:
        input_name, output_name, request_name, record_name = _names(deployment)
        schemas[input_name] = _loading(deployment.name, deployment.version)
        schemas[output_name] = _loading(deployment.name, deployment.version)
        schemas[request_name] = _request_of(input_name)
        schemas[record_name] = _record_of(output_name)
        model = f"{deployment.name} version {deployment.version}"
        routes = [(f"/models/{deployment.name}/versions/{deployment.version}/predict", model)]
        if deployments.find(deployment.name) is deployment:
            routes.append((f"/models/{deployment.name}/predict", f"{deployment.name} (version {deployment.version})"))
        for path, title in routes:
            documented = copy.deepcopy(operation)
            documented["summary"] = f"Predict with {title}"
            documented["tags"] = ["models"]
            documented["operationId"] = "predict-" + path.strip("/").replace("/", "-")
            documented["requestBody"]["content"]["application/json"]["schema"] = _ref(request_name)
            for status in ("200", "202", "500"):
                documented["responses"][status]["content"]["application/json"]["schema"] = _ref(record_name)
            spec["paths"][path] = {"post": documented}


def document_again(spec: dict[str, Any], deployments: Deployments) -> None:
    """Every model's routes and schemas anew, after the set of models changed while serving (a version
    that workers publish has appeared: the unversioned route of its model may now be that version)."""
    document_models(spec, deployments)
    for deployment in deployments:
        describe_model(spec, deployment)


def describe_model(spec: dict[str, Any], deployment: Deployment) -> None:
    """Put a loaded model's schemas in the document (the default's also as ModelInput and ModelOutput)."""
    if deployment.description is None:
        return
    schemas = spec["components"]["schemas"]
    input_name, output_name, _, _ = _names(deployment)
    schemas[input_name] = deployment.description.input_schema
    schemas[output_name] = deployment.description.output_schema
    if deployment.is_default:
        schemas["ModelInput"] = deployment.description.input_schema
        schemas["ModelOutput"] = deployment.description.output_schema
