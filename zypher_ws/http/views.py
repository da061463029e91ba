"""HTTP handlers: parse the request, call the service, shape the response. Docstrings are the OpenAPI spec."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..deployments import Deployment
from ..errors import BadRequest, InvalidHeader, ZypherError
from ..records import Prediction, Status
from ..service import PredictionService
from ..validation import idempotency_key
from ..webhooks.target import requested
from .access import client_address
from .access_log import PREDICTION_ID
from .envelopes import json_response
from .keys import LIMITER, LIVE_CLIENTS, METRICS, SERVICE
from .live import EventStream
from .middleware import predict_envelope

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def wants_async(request: web.Request) -> bool:
    """`Async-Mode: true|1|yes` (the prototype's header) or `Prefer: respond-async` (RFC 7240)."""
    headers = request.headers
    prefer = headers.getall("Prefer", ())
    if prefer and any(token.strip().lower() == "respond-async" for value in prefer for token in value.split(",")):
        return True
    raw = headers.get("Async-Mode")
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


def _predict_operation(
    summary: str, path_parameters: str = "", not_found: str = "", *, request: str, record: str
) -> str:
    """The OpenAPI text of a predict route: POST /predict and the per-model routes share it."""
    return f"""{summary}.

    ---
    summary: {summary}
    description: >
      Without `Async-Mode: true` or `Prefer: respond-async` the request waits up to the sync timeout:
      200 with the succeeded record, 500 with the failed record, or 202 (plus `Location`) when it is
      still unfinished; the prediction carries on either way. Asynchronously it answers 202 at once.
      A sync request with `Accept: text/event-stream` is answered by the prediction's event stream
      (as GET /predict/{{prediction_id}}/events, with `Location`): with `stream` (implied for a model that
      streams) its chunks come as `output` events while it runs.
    tags: [predictions]
    parameters:{path_parameters}
      - name: Async-Mode
        in: header
        required: false
        description: "true/1/yes answers 202 at once; false/0/no (the default) waits. Any case."
        schema: {{type: string}}
      - name: Prefer
        in: header
        required: false
        description: "`respond-async` is the same as `Async-Mode: true`."
        schema: {{type: string}}
      - name: Idempotency-Key
        in: header
        required: false
        description: >
          Repeating a request with the same key and body returns the same prediction (as it is now) and
          runs nothing again, for as long as the prediction is kept; the same key with another body
          (or another model) is 409. 1 to 255 printable ASCII characters (400 invalid_header otherwise).
        schema: {{type: string}}
    requestBody:
      required: true
      content:
        application/json:
          schema: {{$ref: '#/components/schemas/{request}'}}
    responses:
      '200':
        description: 'Succeeded (sync); or, with Accept text/event-stream, its event stream'
        content:
          application/json: {{schema: {{$ref: '#/components/schemas/{record}'}}}}
          text/event-stream: {{schema: {{type: string, description: 'subscribed, output, progress and update events, as GET /predict/{{prediction_id}}/events'}}}}
      '202':
        description: Accepted (async), or still running when the sync timeout ran out
        headers: {{Location: {{description: URL of the record, schema: {{type: string}}}}}}
        content: {{application/json: {{schema: {{$ref: '#/components/schemas/{record}'}}}}}}
      '400': {{description: 'Malformed JSON, bad header, input failing the model schema, a webhook the service will not send (invalid_webhook), or stream asked of a model without predict_stream (stream_not_supported)', content: {{application/json: {{schema: {{$ref: '#/components/schemas/Error'}}}}}}}}{not_found}
      '409': {{description: 'Idempotency-Key reused with a different body (idempotency_conflict)', content: {{application/json: {{schema: {{$ref: '#/components/schemas/Error'}}}}}}}}
      '401': {{description: 'No valid bearer token (when tokens are configured)', content: {{application/json: {{schema: {{$ref: '#/components/schemas/Error'}}}}}}}}
      '429': {{description: 'Over the per-client rate limit (rate_limited); retry after `Retry-After` seconds', headers: {{Retry-After: {{schema: {{type: integer}}}}}}, content: {{application/json: {{schema: {{$ref: '#/components/schemas/Error'}}}}}}}}
      '413': {{description: 'Body larger than the limit (body_too_large), or an input too large to check against a schema without a fast validator (input_too_large)', content: {{application/json: {{schema: {{$ref: '#/components/schemas/Error'}}}}}}}}
      '415': {{description: 'Body is not JSON', content: {{application/json: {{schema: {{$ref: '#/components/schemas/Error'}}}}}}}}
      '500': {{description: 'The model raised (sync); the record carries the error', content: {{application/json: {{schema: {{$ref: '#/components/schemas/{record}'}}}}}}}}
      '503':
        description: Queue full or model not ready; retry after `Retry-After` seconds
        headers: {{Retry-After: {{schema: {{type: integer}}}}}}
        content: {{application/json: {{schema: {{$ref: '#/components/schemas/Error'}}}}}}
    """


_NAME = """
      - {name: name, in: path, required: true, description: 'a model served here (GET /models)', schema: {type: string}}"""
_VERSION = """
      - {name: version, in: path, required: true, description: 'one of its versions', schema: {type: string}}"""
_MODEL_NOT_FOUND = """
      '404': {description: 'No such model or version (model_not_found)', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}"""


# The predict routes are documented by aiohttp-swagger3 but not wrapped by it (app.py): its per-request
# wrapper cost about 8% of the loop for POST /predict, to check an envelope that predict_envelope checks in
# the same words. The service validates `input` against the model's full schema either way.


async def predict(request: web.Request) -> web.StreamResponse:
    return await _predict(request, await predict_envelope(request), None, None)


async def predict_model(request: web.Request) -> web.StreamResponse:
    return await _predict(request, await predict_envelope(request), request.match_info["name"], None)


async def predict_model_version(request: web.Request) -> web.StreamResponse:
    info = request.match_info
    return await _predict(request, await predict_envelope(request), info["name"], info["version"])


predict.__doc__ = _predict_operation(
    "Submit a prediction to the default model", request="PredictRequest", record="DefaultPrediction"
)
predict_model.__doc__ = _predict_operation(
    "Submit a prediction to a model (its default version)", _NAME, _MODEL_NOT_FOUND,
    request="AnyModelRequest", record="Prediction",
)  # fmt: skip
predict_model_version.__doc__ = _predict_operation(
    "Submit a prediction to one version of a model", _NAME + _VERSION, _MODEL_NOT_FOUND,
    request="AnyModelRequest", record="Prediction",
)  # fmt: skip


def wants_events(request: web.Request) -> bool:
    """`Accept: text/event-stream`: a sync request answered by the prediction's event stream."""
    accept = request.headers.getall("Accept", ())
    return bool(accept) and any("text/event-stream" in value.lower() for value in accept)


def _flag(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"`{name}` must be true or false")
    return value


async def _predict(
    request: web.Request, body: dict[str, Any], name: str | None, version: str | None
) -> web.StreamResponse:
    service = request.app[SERVICE]
    request.app[LIMITER].check(client_address(request))
    run_async = wants_async(request)
    key = idempotency_key(request.headers.get("Idempotency-Key"))
    webhook = requested(body)
    parameters = body.get("parameters")
    stream, cancel_on_disconnect = _flag(body, "stream"), _flag(body, "cancel_on_disconnect")
    events = not run_async and wants_events(request)
    if stream is None:  # asking for an event stream asks a model that streams to stream
        stream = events and service.model(name, version).streams
    if run_async:
        prediction = await service.submit(
            body["input"], model=name, version=version, idempotency_key=key, webhook=webhook, parameters=parameters,
            stream=stream,
        )  # fmt: skip
        return record_response(prediction, 202)
    if events:
        # An event stream, however it began, counts toward --ws-max-per-client: checked before anything runs.
        # It lasts until the prediction ends, --sync-timeout or not.
        with request.app[LIVE_CLIENTS].hold(client_address(request)):
            prediction = await service.submit(
                body["input"], model=name, version=version, idempotency_key=key, webhook=webhook,
                parameters=parameters, stream=stream,
            )  # fmt: skip
            answer = EventStream(request, cancel_on_disconnect=bool(cancel_on_disconnect))
            await answer.watch(prediction.prediction_id)
            response = await answer.serve({"Location": f"/predict/{prediction.prediction_id}"})
        response[PREDICTION_ID] = prediction.prediction_id
        return response
    prediction = await service.run(
        body["input"], model=name, version=version, idempotency_key=key, timeout=service.settings.sync_timeout,
        webhook=webhook, parameters=parameters, stream=stream,
    )  # fmt: skip
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
    service = request.app[SERVICE]
    prediction = await service.get(prediction_id)
    response = json_response(await service.shown(prediction))
    response[PREDICTION_ID] = prediction.prediction_id
    return response


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
    """Describe the default model.

    ---
    summary: The default model and its schemas
    tags: [models]
    responses:
      '200': {description: 'Name, version, input and output JSON Schemas', content: {application/json: {schema: {$ref: '#/components/schemas/ModelInfo'}}}}
    """
    service = request.app[SERVICE]
    return json_response(_metadata(service, service.model()))


async def list_models(request: web.Request) -> web.Response:
    """Every model served, with its versions.

    ---
    summary: The models served
    description: >
      Each model with its versions: runtime, state (`loading`, `ready`, or `failed` with the reason in
      `error`), whether it is the default, and how many predictions wait in its queue.
    tags: [models]
    responses:
      '200': {description: 'The models', content: {application/json: {schema: {$ref: '#/components/schemas/ModelList'}}}}
    """
    service = request.app[SERVICE]
    depths = await _queue_depths(service)
    models = []
    for name in service.models.names():
        versions = service.models.versions(name)
        served = service.model(name)
        listed = [{**d.to_dict(), "queue": {"depth": depths.get(d), "max": d.queue.maxsize}} for d in versions]
        models.append({"name": name, "default_version": served.version, "versions": listed})
    default = service.models.default
    return json_response({"default": {"name": default.name, "version": default.version}, "models": models})


async def model_metadata(request: web.Request, name: str) -> web.Response:
    """Describe a model: its default version's metadata and schemas.

    ---
    summary: A model and its schemas
    tags: [models]
    parameters:
      - {name: name, in: path, required: true, schema: {type: string}}
    responses:
      '200': {description: 'Its default version, its schemas and its versions', content: {application/json: {schema: {$ref: '#/components/schemas/ModelInfo'}}}}
      '404': {description: 'No such model (model_not_found)', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
    """
    service = request.app[SERVICE]
    return json_response(_metadata(service, service.model(name)))


async def model_version_metadata(request: web.Request, name: str, version: str) -> web.Response:
    """Describe one version of a model.

    ---
    summary: One version of a model and its schemas
    tags: [models]
    parameters:
      - {name: name, in: path, required: true, schema: {type: string}}
      - {name: version, in: path, required: true, schema: {type: string}}
    responses:
      '200': {description: 'Its metadata and schemas', content: {application/json: {schema: {$ref: '#/components/schemas/ModelInfo'}}}}
      '404': {description: 'No such model or version (model_not_found)', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
    """
    service = request.app[SERVICE]
    return json_response(_metadata(service, service.model(name, version)))


def _metadata(service: PredictionService, deployment: Deployment) -> dict[str, Any]:
    versions = [d.version for d in service.models.versions(deployment.name)]
    return {**deployment.metadata(), "versions": versions}


async def _queue_depths(service: PredictionService) -> dict[Deployment, int | None]:
    try:
        return dict(await service.queue_depths())
    except ZypherError:
        return {}  # the backend is away: list the models without it


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
      '503': {description: 'Model not loaded, backend unavailable, no model served by any worker or every queue full', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
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
    for deployment, depth in (await _queue_depths(request.app[SERVICE])).items():
        if depth is not None:
            m.set_queue_depth(deployment.name, deployment.version, depth)
    return web.Response(body=m.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
