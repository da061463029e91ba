"""The Open Inference Protocol's REST routes under /v2 (what Triton, KServe and MLServer serve), over
the same service as the native routes. The codec lives in zypher_ws/oip; errors on these routes take
the protocol's shape, `{"error": "message"}` (envelopes.oip_error_response, chosen in middleware.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import __version__, oip
from ..deployments import Deployment
from ..errors import (
    AlreadyFinished,
    Forbidden,
    InvalidInferenceRequest,
    ModelNotFound,
    ModelUnavailable,
    ZypherError,
    error_class_for_code,
)
from ..json_codec import loads
from ..records import Prediction, Status
from ..validation import idempotency_key
from . import openapi
from .access import client_address
from .access_log import PREDICTION_ID
from .envelopes import json_response, oip_error_response
from .keys import LIMITER, METRICS, OPENAPI, REPOSITORY, SERVICE, SETTINGS
from .middleware import OIP_PREFIX, read_body
from .views import record_response, wants_async

PREFIX = OIP_PREFIX
SERVER_NAME = "zypher-ws"


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get(PREFIX, server_metadata)
    router.add_get(f"{PREFIX}/health/live", live)
    router.add_get(f"{PREFIX}/health/ready", ready)
    router.add_get(f"{PREFIX}/models/stats", statistics)  # before {model}: a model named `stats` is shadowed
    router.add_post(f"{PREFIX}/repository/index", repository_index)
    router.add_post(f"{PREFIX}/repository/models/{{model}}/load", load_model)
    router.add_post(f"{PREFIX}/repository/models/{{model}}/unload", unload_model)
    for model in (f"{PREFIX}/models/{{model}}", f"{PREFIX}/models/{{model}}/versions/{{version}}"):
        router.add_get(model, model_metadata)
        router.add_get(f"{model}/ready", model_ready)
        router.add_get(f"{model}/stats", statistics)
        router.add_post(f"{model}/infer", infer)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": SERVER_NAME, "version": __version__, "extensions": list(oip.EXTENSIONS)})


async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    await request.app[SERVICE].check_ready()
    return json_response({"ready": True})


def _deployment(request: web.Request) -> Deployment:
    """The model version the path names. Its 404 says "Request for unknown model", as Triton's does:
    clients match that prefix."""
    try:
        return request.app[SERVICE].model(request.match_info["model"], request.match_info.get("version"))
    except ModelNotFound as exc:
        raise ModelNotFound(f"Request for unknown model: {exc.message}") from None


async def model_metadata(request: web.Request) -> web.Response:
    deployment = _deployment(request)
    deployment.check_ready()
    assert deployment.description is not None
    service = request.app[SERVICE]
    versions = [d.version for d in service.models.versions(deployment.name)]
    if "version" in request.match_info:
        versions = [deployment.version]
    metadata = oip.model_metadata(deployment.name, versions, deployment.spec.runtime, deployment.description.tensors)
    return json_response(metadata)


async def model_ready(request: web.Request) -> web.Response:
    deployment = _deployment(request)
    deployment.check_ready()
    deployment.check_served()  # no worker serves it (redis): it would take nothing
    return json_response({"name": deployment.name, "version": deployment.version, "ready": True})


async def statistics(request: web.Request) -> web.Response:
    """The statistics extension, from this process's metrics (where the workers run, their figures)."""
    service, metrics = request.app[SERVICE], request.app[METRICS]
    if "model" in request.match_info:
        chosen = [_deployment(request)]
        if "version" not in request.match_info:
            chosen = service.models.versions(chosen[0].name)
    else:
        chosen = list(service.models)
    stats = [oip.statistics(d.name, d.version, metrics.figures(d.name, d.version)) for d in chosen]
    return json_response({"model_stats": stats})


async def repository_index(request: web.Request) -> web.Response:
    """The repository extension's index: every version served, being unloaded, or in the repository."""
    body = await _json_body(request)
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidInferenceRequest("ready must be true or false")
    return json_response(request.app[REPOSITORY].index(ready_only=ready_only))


async def load_model(request: web.Request) -> web.Response:
    """Serve the model's versions from --model-repository; answers once they have loaded."""
    _check_model_control(request)
    parameters = (await _json_body(request)).get("parameters") or {}
    if not isinstance(parameters, dict) or parameters:
        raise InvalidInferenceRequest("a load takes no parameters: the model's folder in --model-repository is loaded")
    loaded = await request.app[REPOSITORY].load(request.match_info["model"])
    for deployment in loaded:
        openapi.describe_model(request.app[OPENAPI], deployment)
    return web.Response()


async def unload_model(request: web.Request) -> web.Response:
    """Serve no version of the model; what it had accepted runs first (waited for up to --sync-timeout)."""
    _check_model_control(request)
    await _json_body(request)  # parameters.unload_dependents: a model here has no dependents
    service = request.app[SERVICE]
    try:
        await request.app[REPOSITORY].unload(request.match_info["model"], service.settings.sync_timeout)
    except ModelNotFound as exc:
        raise ModelNotFound(f"Request for unknown model: {exc.message}") from None
    return web.Response()


def _check_model_control(request: web.Request) -> None:
    """Loading and unloading change what the server runs: only with API tokens (then checked for
    every /v2 route but health by the token middleware)."""
    if not request.app[SETTINGS].api_tokens:
        raise Forbidden("loading and unloading models needs API tokens (--api-token)")


async def _json_body(request: web.Request) -> dict[str, Any]:
    body = await read_body(request)
    if not body.strip():
        return {}
    try:
        value = loads(body)
    except ValueError as exc:
        raise InvalidInferenceRequest(f"the request's JSON is not valid: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInferenceRequest("the request must be a JSON object")
    return value


async def infer(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    request.app[LIMITER].check(client_address(request))
    run_async = wants_async(request)
    key = idempotency_key(request.headers.get("Idempotency-Key"))
    deployment = _deployment(request)
    body = await read_body(request)
    parsed = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH))
    name, version = deployment.name, deployment.version
    if run_async:
        prediction = await service.submit(
            parsed, model=name, version=version, idempotency_key=key, protocol=oip.PROTOCOL
        )
        return record_response(prediction, 202)
    prediction = await service.run(
        parsed,
        model=name,
        version=version,
        idempotency_key=key,
        protocol=oip.PROTOCOL,
        timeout=service.settings.sync_timeout,
    )
    response = _answer(prediction, parsed, deployment)
    response[PREDICTION_ID] = prediction.prediction_id
    return response


def _answer(prediction: Prediction, parsed: oip.InferRequest, deployment: Deployment) -> web.Response:
    location = f"/predict/{prediction.prediction_id}"
    if not prediction.status.terminal:
        message = f"the inference is still {prediction.status.value}; its record is at {location}"
        return json_response(
            {"error": message, "prediction_id": prediction.prediction_id, "status": prediction.status.value},
            status=202,
            headers={"Location": location},
        )
    if prediction.status is not Status.SUCCEEDED:
        return oip_error_response(_recorded_error(prediction, deployment))
    answer = prediction.result
    binary = parsed.binary_outputs([o["name"] for o in answer["outputs"]])
    body, header_length = oip.encode(answer, binary)
    if header_length is None:
        return web.Response(body=body, content_type="application/json")
    return web.Response(
        body=body,
        content_type="application/octet-stream",
        headers={oip.HEADER_LENGTH: str(header_length)},
    )


def _recorded_error(prediction: Prediction, deployment: Deployment) -> ZypherError:
    """The error a finished, unsuccessful prediction records, as an error of its class (its status)."""
    if prediction.status is Status.CANCELED:
        return AlreadyFinished(f"prediction {prediction.prediction_id} was canceled")
    error = prediction.error or {}
    kind = error_class_for_code(error.get("code", ""))
    message = error.get("message", "the inference failed")
    if issubclass(kind, ModelUnavailable):  # its Retry-After as a refused submit's: one rule
        return deployment.unavailable_error(message)
    return kind(message)
