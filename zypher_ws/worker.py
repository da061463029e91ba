"""`zypher-ws worker`: model workers without HTTP, taking work from the shared (Redis) queues."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
from typing import Any

from prometheus_client import start_http_server

from .backends import open_backend
from .catalog import publishing
from .deployments import ModelState, deploy, total_workers
from .metrics import Metrics
from .models import Model, ModelSetupError, ModelSpec, build_models
from .runner import exit_past_stuck_model_calls
from .settings import Settings
from .webhooks.delivery import delivering

log = logging.getLogger(__name__)


class WorkerFailed(ModelSetupError):
    """A model of this worker failed to load: the worker exits non-zero, naming it."""


async def run_worker(settings: Settings, *, models: list[tuple[ModelSpec, Model]] | None = None) -> None:
    """Serve the models the settings name (each from its own queue) until SIGTERM or SIGINT; then finish
    running batches within --shutdown-timeout."""
    # A worker has no default model (it serves no /predict): a --default-model shared by every process's
    # environment must not refuse a worker given another subset of the repository.
    models = models if models is not None else build_models(dataclasses.replace(settings, default_model=""))
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
        async with (
            delivering(settings, backend.store, metrics),
            deploy(models, settings=settings, backend=backend, metrics=metrics) as deployments,
            publishing(backend.catalog, deployments, settings),  # what API processes serve, described
        ):
            runners = [d.runner for d in deployments if d.runner is not None]
            # Every model loaded (or failed), or a stop meanwhile: a long load does not hold a SIGTERM.
            waits = [asyncio.create_task(event.wait()) for event in (stop, *(d.loaded for d in deployments))]
            first: list[asyncio.Future[Any]] = [waits[0], asyncio.gather(*waits[1:])]
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            failed = [d for d in deployments if d.state is ModelState.FAILED]
            if failed:
                # No /readyz here to report it: exit, so that a supervisor sees the failure and says why.
                raise WorkerFailed("; ".join(d.error or "" for d in failed))
            if not stop.is_set():
                gc.collect()
                gc.freeze()  # what startup made lives as long as the process: keep full collections short
                served = ", ".join(f"{d.name} version {d.version} ({d.state.value})" for d in deployments)
                log.info("worker serving %s from %s (prefix %r)", served, settings.backend_url, settings.redis_prefix)
                await stop.wait()
            log.info("stopping: running batches get %.0f s to finish", settings.shutdown_timeout)
            await deployments.stop(settings.shutdown_timeout)
    exit_past_stuck_model_calls(runners)
