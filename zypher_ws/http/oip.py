"""The Open Inference Protocol's REST routes under /v2 (what Triton, KServe and MLServer serve), over
the same service as the native routes. The codec lives in zypher_ws/oip; errors on these routes take
the protocol's shape, `{"error": "message"}` (envelopes.oip_error_response, chosen in middleware.py)."""

from __future__ import annotations

from aiohttp import web

from .. import __version__, oip
from ..deployments import Deployment
from ..errors import AlreadyFinished, ModelNotFound, ZypherError, error_class_for_code
from ..records import Prediction, Status
from ..validation import idempotency_key
from .access import client_address
from .access_log import PREDICTION_ID
from .envelopes import json_response, oip_error_response
from .keys import LIMITER, METRICS, SERVICE
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
    response = _answer(prediction, parsed)
    response[PREDICTION_ID] = prediction.prediction_id
    return response


def _answer(prediction: Prediction, parsed: oip.InferRequest) -> web.Response:
    location = f"/predict/{prediction.prediction_id}"
    if not prediction.status.terminal:
        message = f"the inference is still {prediction.status.value}; its record is at {location}"
        return json_response(
            {"error": message, "prediction_id": prediction.prediction_id, "status": prediction.status.value},
            status=202,
            headers={"Location": location},
        )
    if prediction.status is not Status.SUCCEEDED:
        return oip_error_response(_recorded_error(prediction))
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


def _recorded_error(prediction: Prediction) -> ZypherError:
    """The error a finished, unsuccessful prediction records, as an error of its class (its status)."""
    if prediction.status is Status.CANCELED:
        return AlreadyFinished(f"prediction {prediction.prediction_id} was canceled")
    error = prediction.error or {}
    return error_class_for_code(error.get("code", ""))(error.get("message", "the inference failed"))
