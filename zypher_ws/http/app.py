"""The application factory, and `serve`. No I/O in the factory: resources start and stop in cleanup contexts."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import warnings
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp_swagger3 import SwaggerDocs, SwaggerInfo, SwaggerUiSettings

from .. import __version__
from ..backends import open_backend
from ..catalog import CatalogFollower, publishing
from ..deployments import Deployments, deploy, total_workers
from ..metrics import Metrics
from ..models import Model, ModelSpec, build_models, spec_of
from ..repository import ModelRepository
from ..runner import exit_past_stuck_model_calls
from ..service import PredictionService
from ..settings import Settings
from ..webhooks.delivery import delivering
from . import live, oip, openapi, views
from .access import RateLimiter, SocketCounter
from .access_log import AccessLogger, log_malformed_requests_at_info
from .connections import GuardedSite, quiet_resource_errors
from .keys import (
    CATALOG,
    DRAIN,
    LIMITER,
    LIVE_CLIENTS,
    METRICS,
    MODELS,
    OPENAPI,
    REPOSITORY,
    SERVICE,
    SETTINGS,
    SOCKETS,
    STREAMS,
    WEBHOOKS,
    WS_AUTHENTICATING,
)  # fmt: skip
from .middleware import front, parse_json_body
from .pages import add_page_routes

log = logging.getLogger(__name__)

SPEC_URL = "/swagger/swagger.json"


def create_app(
    settings: Settings, *, model: Model | None = None, models: list[tuple[ModelSpec, Model]] | None = None
) -> web.Application:
    """Build the app; `model` (one model object, the only one served) or `models` (specs with their
    models) override the models the settings name (tests pass fakes here)."""
    if model is not None:
        if settings.executor == "process":
            raise ValueError("--executor process builds the model named by --model; it cannot take a model object")
        models = [(spec_of(model), model)]
    app = web.Application(
        client_max_size=settings.max_body,
        middlewares=[front],
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[LIMITER] = RateLimiter(settings.rate_limit, settings.rate_burst)
    app[LIVE_CLIENTS] = SocketCounter(settings.ws_max_per_client, "WebSockets and event streams")
    app[WS_AUTHENTICATING] = SocketCounter(settings.ws_max_authenticating, "WebSockets still authenticating")
    app[MODELS] = models if models is not None else build_models(settings)
    app[SOCKETS] = set()
    app[STREAMS] = set()
    app.cleanup_ctx.append(service_ctx)
    # On SIGTERM aiohttp stops accepting, then runs these in order: new predictions are refused and
    # waiting sync requests answer 202 with their Location at once; running batches get
    # --shutdown-timeout to finish (and are pushed); then streams and sockets get a `shutdown` message
    # and close. Queued predictions stay in the durable store for the next start.
    app.on_shutdown.append(_stop_service)
    app.on_shutdown.append(_drain_workers)
    app.on_shutdown.append(live.close_live)
    _add_routes(app)
    app.router.add_get("/ws", live.websocket)
    oip.add_routes(app)
    add_page_routes(app)
    return app


async def service_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, models = app[SETTINGS], app[MODELS]
    async with (
        open_backend(settings, readers=total_workers(models, settings)) as backend,
        delivering(settings, backend.store, app[METRICS]) as webhooks,
        deploy(
            models, settings=settings, backend=backend, metrics=app[METRICS], run_here=settings.workers > 0
        ) as served,
        publishing(backend.catalog, served, settings),  # the models whose workers run here
    ):
        if webhooks is not None:
            app[WEBHOOKS] = webhooks
        service = PredictionService(settings=settings, models=served, store=backend.store, bus=backend.bus)
        app[SERVICE] = service
        app[REPOSITORY] = ModelRepository(settings=settings, models=served)
        openapi.document_models(app[OPENAPI], served)
        recovered = await service.recover()
        if recovered:
            log.info("queued again %d predictions accepted before the last stop", recovered)
        app[DRAIN] = lambda: served.stop(settings.shutdown_timeout)
        if not settings.workers:
            log.info("no workers in this process (--workers 0): predictions run in `zypher-ws worker` processes")
        # Models load in the background, so /healthz answers at once and /readyz reports progress.
        tasks = [asyncio.create_task(_document_when_loaded(app, served), name="zypher-document-models")]
        tasks.append(asyncio.create_task(service.sweep_forever(), name="zypher-sweeper"))
        tasks.append(asyncio.create_task(service.positions.run_forever(), name="zypher-queue-positions"))
        if backend.catalog is not None:
            # Models that worker processes publish are served here too, described by them (no files).
            follower = CatalogFollower(
                settings=settings,
                models=served,
                catalog=backend.catalog,
                store=backend.store,
                bus=backend.bus,
                metrics=app[METRICS],
                on_change=lambda: openapi.document_again(app[OPENAPI], served),
            )
            app[CATALOG] = follower
            tasks.append(asyncio.create_task(follower.follow_forever(), name="zypher-catalog"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _document_when_loaded(app: web.Application, served: Deployments) -> None:
    """Each model's schemas go into the OpenAPI document as soon as it has loaded."""

    async def one(deployment: Any) -> None:
        await deployment.loaded.wait()
        openapi.describe_model(app[OPENAPI], deployment)

    await asyncio.gather(*(one(d) for d in served))


async def _stop_service(app: web.Application) -> None:
    if SERVICE in app:
        app[SERVICE].stop()


async def _drain_workers(app: web.Application) -> None:
    if DRAIN in app:
        await app[DRAIN]()


def _add_routes(app: web.Application) -> None:
    with warnings.catch_warnings():
        # aiohttp-swagger3 0.10 stores its spec under string app keys, when created and again on every
        # route added; that is its business, not ours (a string key of our own still warns).
        warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module=r"aiohttp_swagger3\.")
        _add_documented_routes(app, app[MODELS])


def _add_documented_routes(app: web.Application, models: list[tuple[ModelSpec, Model]]) -> None:
    default = next((model for spec, model in models if spec.is_default), models[0][1])
    swagger = _swagger(app, default)
    swagger.register_media_type_handler("application/json", parse_json_body)
    components = openapi.components(default.name, default.version)
    swagger.spec["components"] = components
    # Documented, not wrapped: the predict routes check their envelope themselves (views.py says why).
    swagger.add_route("POST", "/predict", views.predict, validate=False)
    swagger.add_route("POST", "/models/{name}/predict", views.predict_model, validate=False)
    swagger.add_route("POST", "/models/{name}/versions/{version}/predict", views.predict_model_version, validate=False)
    swagger.add_route("GET", "/predict/{prediction_id}", views.get_prediction)
    swagger.add_route("DELETE", "/predict/{prediction_id}", views.cancel_prediction)
    swagger.add_route("GET", "/model", views.model_info)
    swagger.add_route("GET", "/models", views.list_models)
    swagger.add_route("GET", "/models/{name}", views.model_metadata)
    swagger.add_route("GET", "/models/{name}/versions/{version}", views.model_version_metadata)
    swagger.add_route("GET", "/healthz", views.healthz)
    swagger.add_route("GET", "/readyz", views.readyz)
    swagger.add_route("GET", "/metrics", views.metrics)
    swagger.add_route("GET", "/predict/{prediction_id}/events", live.prediction_events)
    app[OPENAPI] = swagger.spec


def _swagger(app: web.Application, model: Model) -> SwaggerDocs:
    return SwaggerDocs(
        app,
        info=SwaggerInfo(
            title="zypher-ws",
            version=__version__,
            description=f"ML inference over HTTP and WebSocket; `POST /predict` runs `{model.name}` {model.version}. "
            f"The OpenAPI document is at `{SPEC_URL}`.\n\n" + openapi.WEBSOCKET_PROTOCOL,
        ),
        swagger_ui_settings=SwaggerUiSettings(path="/swagger"),
    )


def serve(settings: Settings) -> None:
    """`zypher-ws serve`: run the app until SIGINT or SIGTERM."""
    app = create_app(settings)
    log_malformed_requests_at_info()
    app.on_startup.append(_freeze_startup_objects)  # after the cleanup contexts have started
    _raise_open_file_limit()
    asyncio.run(_run(app, settings))
    if SERVICE in app:
        exit_past_stuck_model_calls([d.runner for d in app[SERVICE].models if d.runner is not None])


async def _run(app: web.Application, settings: Settings) -> None:
    """What web.run_app does, with every connection guarded (http/connections.py)."""
    loop = asyncio.get_running_loop()
    quiet_resource_errors(loop)
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=settings.shutdown_timeout)
    await runner.setup()
    try:
        limits = SocketCounter(settings.max_connections_per_client, "connections")
        site = GuardedSite(runner, settings.host, settings.port, limits=limits, head_timeout=settings.read_timeout)
        await site.start()
        logging.getLogger("zypher_ws").info("Running on %s (Ctrl-C or SIGTERM to stop)", site.name)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _raise_open_file_limit() -> None:
    """Every connection is a file descriptor: take the hard limit the system allows, not the soft 1024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open file limit: %s", exc)


# A request leaves almost nothing for the collector (reference counting frees it), so the youngest
# generation can wait for 10,000 survivors instead of 700. With 700, sync c=32 on `mock` ran about 70
# young collections a second, some of them several milliseconds long: the tail of the latency. The
# oldest generation keeps its default pace (10): garbage only the collector frees (a traceback holding a
# batch's inputs through a future) then waits about 2 million allocations, not 20 million.
GC_THRESHOLDS = (10_000, 20, 10)


async def _freeze_startup_objects(app: web.Application) -> None:
    """Modules, the app and its services live as long as the process: take them out of the garbage
    collector's sight (gc.freeze), so a full collection walks only what came later. Without this one
    stalled the event loop for up to 70 ms under load (the p99 of /healthz). Then collect less often
    (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
