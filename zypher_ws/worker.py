"""`zypher-ws worker`: model workers without HTTP, taking work from the shared (Redis) queues."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from prometheus_client import start_http_server

from .backends import open_backend
from .deployments import deploy, total_workers
from .metrics import Metrics
from .models import Model, ModelSpec, build_models
from .runner import exit_past_stuck_model_calls
from .settings import Settings

log = logging.getLogger(__name__)


async def run_worker(settings: Settings, *, models: list[tuple[ModelSpec, Model]] | None = None) -> None:
    """Serve the models the settings name (each from its own queue) until SIGTERM or SIGINT; then finish
    running batches within --shutdown-timeout."""
    models = models if models is not None else build_models(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics()
    if settings.metrics_port:
        # prometheus-client's own HTTP server, on a thread: this process has no aiohttp app.
        start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    runners = []
    async with open_backend(settings, listen=False, readers=total_workers(models, settings)) as backend:
        async with deploy(models, settings=settings, backend=backend, metrics=metrics) as deployments:
            runners = [d.runner for d in deployments if d.runner is not None]
            await asyncio.gather(*(d.loaded.wait() for d in deployments))
            gc.collect()
            gc.freeze()  # what startup made lives as long as the process: keep full collections short
            served = ", ".join(f"{d.name} version {d.version} ({d.state.value})" for d in deployments)
            log.info("worker serving %s from %s (prefix %r)", served, settings.backend_url, settings.redis_prefix)
            await stop.wait()
            log.info("stopping: running batches get %.0f s to finish", settings.shutdown_timeout)
            await deployments.stop(settings.shutdown_timeout)
    exit_past_stuck_model_calls(runners)
