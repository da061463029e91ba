"""Worker tasks: take batches off the queue, run them, record and announce every state change."""

from __future__ import annotations

import asyncio
import logging

from . import logs
from .backends import Backend, EventBus, Store, WorkQueue
from .metrics import Metrics
from .records import Job, Prediction
from .runner import ModelRunner
from .settings import Settings

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(
        self,
        *,
        settings: Settings,
        queue: WorkQueue,
        store: Store,
        bus: EventBus,
        runner: ModelRunner,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._store = store
        self._bus = bus
        self._runner = runner
        self._metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._waiting: set[asyncio.Task[None] | None] = set()
        self._stopping = False
        self.busy = 0

    @classmethod
    def over(cls, backend: Backend, *, settings: Settings, runner: ModelRunner, metrics: Metrics) -> WorkerPool:
        """A pool taking work from a backend's queue, recording in its store and announcing on its bus."""
        return cls(
            settings=settings, queue=backend.queue, store=backend.store, bus=backend.bus, runner=runner, metrics=metrics
        )

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"zypher-worker-{i}") for i in range(self._settings.workers)
        ]

    async def stop(self, timeout: float = 0.0) -> None:
        """Take no new batches; give running ones `timeout` seconds to finish, then cancel them."""
        self._stopping = True
        for task in self._tasks:
            if task in self._waiting:
                task.cancel()
        if self._tasks:
            _, still_running = await asyncio.wait(self._tasks, timeout=timeout)
            for task in still_running:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _work(self) -> None:
        s = self._settings
        me = asyncio.current_task()
        while not self._stopping:
            self._waiting.add(me)
            try:
                # On an idle pool a lone request runs at once; while other batches run, more requests
                # are arriving, so waiting up to the delay to fill this batch pays for itself.
                delay = s.max_batch_delay if self.busy else 0.0
                jobs = await self._queue.get_batch(s.max_batch_size, delay)
            finally:
                self._waiting.discard(me)
            self.busy += 1
            try:
                await self.run_batch(jobs)
            except Exception:  # a store or bus failure must not kill the worker
                log.exception("worker failed on a batch of %d", len(jobs))
            finally:
                self.busy -= 1

    async def run_batch(self, jobs: list[Job]) -> None:
        started = await self._store.start([job.prediction_id for job in jobs])
        if started:
            self._metrics.batch_started(started)
            logs.state_changes(started)
            finished: list[Prediction] = []
            try:
                await self._bus.publish(started)
                # Inputs come from the records (canceled ones are not in `started`), not from the queue.
                outcomes = await self._runner.run([p.prediction_id for p in started], [p.input for p in started])
                finished = await self._store.finish(outcomes)
            finally:
                self._metrics.batch_finished(len(started), finished)
            logs.state_changes(finished)
            await self._bus.publish(finished)
        # Only now, with outcomes stored: a worker dying before this leaves the jobs to be taken over.
        await self._queue.ack(jobs)
