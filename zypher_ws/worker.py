"""`zypher-ws worker`: model workers without HTTP, taking work from the shared (Redis) queue."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from prometheus_client import start_http_server

from .backends import open_backend
from .metrics import Metrics
from .models import Model, build_model
from .runner import ModelRunner, exit_past_stuck_model_calls, make_executor
from .settings import Settings
from .webhooks.delivery import delivering
from .workers import WorkerPool

log = logging.getLogger(__name__)


async def run_worker(settings: Settings, *, model: Model | None = None) -> None:
    """Serve until SIGTERM or SIGINT; then finish running batches within --shutdown-timeout."""
    model = model if model is not None else build_model(settings)
    executor = make_executor(settings)
    runner = ModelRunner(model, executor)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics()
    if settings.metrics_port:
        # prometheus-client's own HTTP server, on a thread: this process has no aiohttp app.
        start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    try:
        async with open_backend(settings, listen=False) as backend, delivering(settings, backend.store, metrics):
            await runner.load()
            gc.collect()
            gc.freeze()  # what startup made lives as long as the process: keep full collections short
            pool = WorkerPool.over(backend, settings=settings, runner=runner, metrics=metrics)
            pool.start()
            log.info("worker taking predictions from %s (prefix %r)", settings.backend_url, settings.redis_prefix)
            await stop.wait()
            log.info("stopping: running batches get %.0f s to finish", settings.shutdown_timeout)
            await pool.stop(settings.shutdown_timeout)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    exit_past_stuck_model_calls(runner)
