"""HTTP handlers: parse the request, call the service, shape the response. Docstrings are the OpenAPI spec."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import InvalidHeader, ZypherError
from ..records import Prediction, Status
from ..validation import idempotency_key
from ..webhooks.target import requested
from .access import client_address
from .access_log import PREDICTION_ID
from .envelopes import json_response
from .keys import LIMITER, METRICS, SERVICE

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def wants_async(request: web.Request) -> bool:
    """`Async-Mode: true|1|yes` (the prototype's header) or `Prefer: respond-async` (RFC 7240)."""
    prefer = request.headers.getall("Prefer", [])
    if any(token.strip().lower() == "respond-async" for value in prefer for token in value.split(",")):
        return True
    raw = request.headers.get("Async-Mode")
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidHeader(f"Async-Mode must be true/1/yes or false/0/no, not {raw!r}")


def record_response(prediction: Prediction, status: int = 200) -> web.Response:
    headers = {}
    if status == 202:
        headers["Location"] = f"/predict/{prediction.prediction_id}"
    response = json_response(prediction.to_dict(), status=status, headers=headers)
    response[PREDICTION_ID] = prediction.prediction_id
    return response


async def predict(request: web.Request, body: dict[str, Any]) -> web.Response:
    """Submit a prediction, synchronously (default) or asynchronously.

    ---
    summary: Submit a prediction
    description: >
      Without `Async-Mode: true` or `Prefer: respond-async` the request waits up to the sync timeout:
      200 with the succeeded record, 500 with the failed record, or 202 (plus `Location`) when it is
      still unfinished; the prediction carries on either way. Asynchronously it answers 202 at once.
    tags: [predictions]
    parameters:
      - name: Async-Mode
        in: header
        required: false
        description: "true/1/yes answers 202 at once; false/0/no (the default) waits. Any case."
        schema: {type: string}
      - name: Prefer
        in: header
        required: false
        description: "`respond-async` is the same as `Async-Mode: true`."
        schema: {type: string}
      - name: Idempotency-Key
        in: header
        required: false
        description: >
          Repeating a request with the same key and body returns the same prediction (as it is now) and
          runs nothing again, for as long as the prediction is kept; the same key with another body is 409.
          1 to 255 printable ASCII characters (400 invalid_header otherwise).
        schema: {type: string, maxLength: 255}
    requestBody:
      required: true
      content:
        application/json:
          schema: {$ref: '#/components/schemas/PredictRequest'}
    responses:
      '200': {description: 'Succeeded (sync)', content: {application/json: {schema: {$ref: '#/components/schemas/Prediction'}}}}
      '202':
        description: Accepted (async), or still running when the sync timeout ran out
        headers: {Location: {description: URL of the record, schema: {type: string}}}
        content: {application/json: {schema: {$ref: '#/components/schemas/Prediction'}}}
      '400': {description: 'Malformed JSON, bad header, input failing the model schema, or a webhook the service will not send (invalid_webhook)', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '409': {description: 'Idempotency-Key reused with a different body (idempotency_conflict)', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '401': {description: 'No valid bearer token (when tokens are configured)', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '429': {description: 'Over the per-client rate limit (rate_limited); retry after `Retry-After` seconds', headers: {Retry-After: {schema: {type: integer}}}, content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '413': {description: 'Body larger than the limit (body_too_large), or an input too large to check against a schema without a fast validator (input_too_large)', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '415': {description: 'Body is not JSON', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '500': {description: 'The model raised (sync); the record carries the error', content: {application/json: {schema: {$ref: '#/components/schemas/Prediction'}}}}
      '503':
        description: Queue full or model not ready; retry after `Retry-After` seconds
        headers: {Retry-After: {schema: {type: integer}}}
        content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}
    """
    service = request.app[SERVICE]
    request.app[LIMITER].check(client_address(request))
    run_async = wants_async(request)
    key = idempotency_key(request.headers.get("Idempotency-Key"))
    webhook = requested(body)
    if run_async:
        return record_response(await service.submit(body["input"], idempotency_key=key, webhook=webhook), 202)
    timeout = service.settings.sync_timeout
    prediction = await service.run(body["input"], idempotency_key=key, timeout=timeout, webhook=webhook)
    if not prediction.status.terminal:
        return record_response(prediction, 202)
    return record_response(prediction, 500 if prediction.status is Status.FAILED else 200)


async def get_prediction(request: web.Request, prediction_id: str) -> web.Response:
    """Read a prediction's record.

    ---
    summary: Read a prediction
    tags: [predictions]
    parameters:
      - {name: prediction_id, in: path, required: true, schema: {type: string}}
    responses:
      '200': {description: 'The record', content: {application/json: {schema: {$ref: '#/components/schemas/Prediction'}}}}
      '404': {description: 'Unknown id', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
    """
    return record_response(await request.app[SERVICE].get(prediction_id))


async def cancel_prediction(request: web.Request, prediction_id: str) -> web.Response:
    """Cancel a queued or running prediction.

    ---
    summary: Cancel a prediction
    description: A queued prediction never runs; a running one is marked canceled and its result discarded.
    tags: [predictions]
    parameters:
      - {name: prediction_id, in: path, required: true, schema: {type: string}}
    responses:
      '200': {description: 'Canceled', content: {application/json: {schema: {$ref: '#/components/schemas/Prediction'}}}}
      '404': {description: 'Unknown id', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '409': {description: 'Already finished (code already_finished)', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
    """
    prediction = await request.app[SERVICE].cancel(prediction_id)
    request.app[METRICS].finished([prediction])
    return record_response(prediction)


async def model_info(request: web.Request) -> web.Response:
    """Describe the served model.

    ---
    summary: The served model and its schemas
    tags: [model]
    responses:
      '200': {description: 'Name, version, input and output JSON Schemas', content: {application/json: {schema: {$ref: '#/components/schemas/ModelInfo'}}}}
    """
    model = request.app[SERVICE].model
    return json_response(
        {
            "name": model.name,
            "version": model.version,
            "input_schema": model.input_schema,
            "output_schema": model.output_schema,
        }
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers.

    ---
    summary: Liveness
    tags: [health]
    responses:
      '200': {description: 'Up', content: {application/json: {schema: {$ref: '#/components/schemas/Status'}}}}
    """
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the model is loaded, the backend answers and the queue accepts work.

    ---
    summary: Readiness
    tags: [health]
    responses:
      '200': {description: 'Ready', content: {application/json: {schema: {$ref: '#/components/schemas/Status'}}}}
      '503': {description: 'Model not loaded, backend unavailable or queue full', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
    """
    await request.app[SERVICE].check_ready()
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics of this process.

    ---
    summary: Prometheus metrics
    tags: [health]
    responses:
      '200': {description: 'Metrics in the Prometheus text format', content: {text/plain: {schema: {type: string}}}}
    """
    m = request.app[METRICS]
    try:
        m.queue_depth.set(await request.app[SERVICE].queue_depth())
    except ZypherError:
        pass  # the backend is away: report the rest
    return web.Response(body=m.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
