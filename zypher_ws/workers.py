"""Worker tasks: take batches off the queue, run them, record and announce every state change."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from . import logs
from .backends import EventBus, Store, WorkQueue
from .backends.base import Interrupted, Interrupts, Releases
from .errors import RetryLater
from .metrics import Metrics
from .records import Job, Outcome, Prediction
from .runner import ModelRunner
from .settings import Settings
from .streaming import StreamRun, collect

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_FIRST = 0.05  # seconds before a failed store write is tried again; doubling up to RETRY_MAX
RETRY_MAX = 2.0


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
        # Asked once: an isinstance of a runtime-checkable Protocol looks at every one of its members.
        self._releases = queue if isinstance(queue, Releases) else None
        self._store = store
        self._bus = bus
        self._runner = runner
        self._metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._waiting: set[asyncio.Task[None] | None] = set()
        self._stopping = False
        self._draining = False
        self._idle = asyncio.Event()  # set when the last running batch ends
        self.busy = 0
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # tests pass a fake clock's
        self.clock: Callable[[], float] = time.time  # for deadlines, which are wall-clock times

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"zypher-worker-{i}") for i in range(self._settings.workers)
        ]

    async def stop(self, timeout: float = 0.0) -> None:
        """Take no new batches; give running ones `timeout` seconds to finish, then cancel them."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        # A queue that can be interrupted (Redis) is: a cancel of its wait can be lost, and one landing as
        # a read's reply arrives drops entries delivered to this consumer, which an interrupt keeps for the
        # queue to hand back. Others' waits are cancelled (the in-process queue puts back what it held).
        within = self._queue.interrupt() if isinstance(self._queue, Interrupts) else None
        waits_end_by = loop.time() + (within or 0.0)
        if within is None:
            for task in self._tasks:
                if task in self._waiting:
                    task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                if task not in self._waiting:  # a batch past its time
                    task.cancel()
            if pending and within is not None:
                _, pending = await asyncio.wait(pending, timeout=max(0.0, waits_end_by - loop.time()))
                for task in pending:  # a read not back in its bound (Redis hung): cancelled after all
                    if task in self._waiting:
                        log.warning("a worker's read of the queue did not end when interrupted; cancelling it")
                    task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def drain(self) -> None:
        """Run every job queued, then stop (an unloaded model, which nothing new is queued for).

        Once no batch runs, the workers are all waiting on the queue: stopping them puts back what one
        was gathering into a batch, and if anything is back, they start again (now without waiting to
        fill batches) and it goes round until the queue is empty."""
        self._draining = True
        while True:
            while self.busy:
                self._idle.clear()
                await self._idle.wait()
            await self.stop(0)
            # What the queue holds here for its next batch (put back by the interrupt) is not in the
            # shared depth, but is this pool's to run.
            backlog = self._queue.backlog() if isinstance(self._queue, Interrupts) else 0
            if not backlog and not await self._queue.depth():
                return
            self._stopping = False
            self.start()

    async def _work(self) -> None:
        s = self._settings
        me = asyncio.current_task()
        while not self._stopping:
            self._waiting.add(me)
            try:
                # On an idle pool a lone request runs at once; while other batches run, more requests
                # are arriving, so waiting up to the delay to fill this batch pays for itself.
                delay = s.max_batch_delay if self.busy and not self._draining else 0.0
                jobs = await self._queue.get_batch(s.max_batch_size, delay)
            except Interrupted:
                return  # stopping; what it had taken the queue keeps
            finally:
                self._waiting.discard(me)
            self.busy += 1
            try:
                await self.run_batch(jobs)
            except Exception:  # a store or bus failure must not kill the worker
                log.exception("worker failed on a batch of %d", len(jobs))
                if self._releases is not None:
                    await self._releases.release(jobs)  # let a live worker take them over
            finally:
                self.busy -= 1
                if not self.busy:
                    self._idle.set()

    async def run_batch(self, jobs: list[Job]) -> None:
        ids = [job.prediction_id for job in jobs]
        if self._releases is not None:
            try:
                started = await self._store.start(ids, now=self.clock())
            except RetryLater as exc:
                # Redis may have applied the start before the connection broke: retrying would find the
                # records running and start nothing, stranding them. Release the batch instead; the
                # takeover after --claim-idle queues again what is running (an attempt) or still queued.
                log.warning("could not record the start of a batch (%s); releasing it for takeover", exc.message)
                await self._releases.release(jobs)
                return
        else:  # embedded: a failed transaction changed nothing, so trying again is exact
            started = await self._until_done(lambda: self._store.start(ids, now=self.clock()), "the start of a batch")
        started = await self._expired(started)
        if started:
            self._metrics.batch_started(started)
            logs.state_changes(started)
            finished: list[Prediction] = []
            try:
                await self._announce(started)
                # Inputs come from the records (canceled ones are not in `started`), not from the queue.
                outcomes = await self._run(started)
                finished = await self._until_done(lambda: self._store.finish(outcomes), "a batch's outcomes")
            finally:
                self._metrics.batch_finished(started, finished)
            logs.state_changes(finished)
            await self._announce(finished)
        # Only now, with outcomes stored: a worker dying before this leaves the jobs to be taken over.
        await self._until_done(lambda: self._queue.ack(jobs), "the acknowledgement of a batch")

    async def _run(self, started: list[Prediction]) -> list[Outcome]:
        """The batch's outcomes: streams each through the model's predict_stream, side by side with one
        model call for the rest."""
        runner = self._runner
        streams = [p for p in started if runner.streams and (p.stream or runner.stream_only)]
        if not streams:
            return await runner.run_predictions(started, self._settings.max_batch_size)
        rest = [p for p in started if not (runner.streams and (p.stream or runner.stream_only))]
        runs: list[Awaitable[Outcome | list[Outcome]]] = [self._stream(p) for p in streams]
        if rest:
            runs.append(self._runner.run_predictions(rest, self._settings.max_batch_size))
        done = await asyncio.gather(*runs)
        outcomes = [o for part in done for o in (part if isinstance(part, list) else [part])]
        order = {p.prediction_id: i for i, p in enumerate(started)}
        return sorted(outcomes, key=lambda o: order[o.prediction_id])

    async def _stream(self, prediction: Prediction) -> Outcome:
        s = self._settings
        if not prediction.stream:  # a stream-only model asked for its answer: the chunks, within the limits
            return await collect(
                prediction.prediction_id,
                self._bus,
                lambda emit: self._runner.start_stream(
                    prediction.input, emit, skip=0, max_chunks=s.max_stream_chunks, max_bytes=s.max_stream_bytes
                ),
            )
        run = StreamRun(prediction, settings=s, store=self._store, bus=self._bus)
        return await run.run(
            lambda emit: self._runner.start_stream(
                prediction.input, emit, skip=run.skip, max_chunks=s.max_stream_chunks, max_bytes=s.max_stream_bytes
            )
        )

    async def _expired(self, changed: list[Prediction]) -> list[Prediction]:
        """Those started; the ones whose deadline passed while they waited went from queued to failed,
        deadline_exceeded, without a model call (queue_policy.py): counted and announced here."""
        late = [p for p in changed if p.status.terminal]
        if not late:
            return changed
        self._metrics.finished(late)
        logs.state_changes(late)
        await self._announce(late)
        return [p for p in changed if not p.status.terminal]

    async def _until_done(self, write: Callable[[], Awaitable[T]], what: str) -> T:
        """Retry a write that failed for a passing reason (Redis away, the disk full) until it succeeds.

        Giving up would strand the batch: its records would stay queued or running, and its entries look
        held, until a restart (and a restart would run finished work again). The outcome is in hand, so
        it is kept and written once the store is back. Only a stopping pool gives up: what it leaves is
        recovered at the next start or taken over by a live worker.
        """
        delay, failing = RETRY_FIRST, False
        while True:
            try:
                result = await write()
            except RetryLater as exc:
                if self._stopping:
                    raise
                if not failing:
                    log.warning("could not record %s (%s); retrying until it succeeds", what, exc.message)
                    failing = True
                await self.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if failing:
                log.info("recorded %s once the store answered again", what)
            return result

    async def _announce(self, predictions: list[Prediction]) -> None:
        """Publish state changes. Best effort: they are stored already, and subscribers elsewhere read
        the records again when their event channel comes back."""
        try:
            await self._bus.publish(predictions)
        except RetryLater as exc:
            log.warning("could not announce %d state changes (%s)", len(predictions), exc.message)
