"""OpenAPI components: the record, errors, and each served model's own schemas and routes."""

from __future__ import annotations

import copy
from typing import Any

from ..deployments import Deployment, Deployments
from ..records import Status

WEBSOCKET_PROTOCOL = """\
## Live results: WebSocket `GET /ws`

JSON text messages. Client to server, by `op`:
`{"op": "subscribe", "prediction_id": ID}` (or `"prediction_ids": [...]`),
`{"op": "unsubscribe", "prediction_id": ID}` (or `prediction_ids`),
`{"op": "predict", "input": INPUT, "model": "optional", "version": "optional", "request_id": "optional"}`
(submits asynchronously to the model named, else the default, and subscribes),
`{"op": "ping"}`, and `{"op": "auth", "token": TOKEN}` (see below).

Server to client, by `type`: `subscribed` (the current record, at once; if it is terminal it is the last
message for that id), `update` (each later status change, in order), `accepted` (for `predict`, with the
`request_id`), `pong`, `authenticated`, and `error` (`{"error": {"code", "message"}, "request_id"}`;
codes `invalid_json`, `invalid_message`, `unknown_op`, `not_found`, `model_not_found`,
`too_many_subscriptions`, `invalid_input`, `queue_full`, `not_ready`, `rate_limited`,
`backend_unavailable`). The socket stays
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
    },
}

# swagger3 validates only the envelope; the service checks `input` against the model's full JSON Schema
# (swagger3 understands a subset of it), so the spec below documents more than the validator enforces.
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


def _request_of(input: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["input"],
        "properties": {"input": _ref(input), "parameters": PARAMETERS},
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
                "description": "`input`: an input of the model the path names (its schema: GET /models/{name})",
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
