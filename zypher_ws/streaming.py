"""Streaming predictions: the model's generator off the loop, its chunks pushed in order and committed in
batches, its limits, its cancel.

Two halves. `iterate` runs in the executor (a thread, or a process of --executor process): it walks the
generator, measures and bounds each chunk, and hands items to `emit`. `StreamRun` lives on the loop: it
keeps the chunks, publishes each on the event bus (a batch per loop turn), commits them to the store at
most every --stream-commit-ms and at the end, and stops the generator when the prediction is canceled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .backends import EventBus, Store
from .errors import ModelError, RetryLater, StreamLimitExceeded
from .json_codec import dumps
from .progress import Progress
from .records import COMMITTED, OUTPUT, PROGRESS, Outcome, Prediction, Status, StreamEvent
from .settings import Settings

log = logging.getLogger(__name__)

Item = tuple[str, Any, Any]
"""What `iterate` emits: (OUTPUT, index, chunk) or (PROGRESS, fraction, message)."""

StartStream = Callable[[Callable[[Item], None]], Awaitable[tuple["asyncio.Future[Any]", Callable[[], None]]]]
"""Begins a stream in the executor whose items go to the callable given; returns its call and its cancel."""


MAX_PROGRESS_MESSAGE = 1_000
"""Characters of a progress message kept: it is pushed and stored, and counts toward no limit."""


def iterate(
    generator: Iterable[Any],
    emit: Callable[[Item], None],
    cancelled: Callable[[], bool],
    *,
    skip: int,
    max_chunks: int,
    max_bytes: int,
) -> dict[str, str] | None:
    """Walk a model's stream in the executor; the error that ended it, or None (done, or canceled).

    The first `skip` chunks are not emitted: a rerun after a crash yields again the chunks its record
    already holds (they count toward the limits all the same). A cancel is seen at the next yield: what
    that yield produced is dropped and the generator is closed.
    """
    index = 0
    size = 0
    iterator = iter(generator)
    try:
        for value in iterator:
            if cancelled():
                return None
            if isinstance(value, Progress):
                message = None if value.message is None else str(value.message)[:MAX_PROGRESS_MESSAGE]
                emit((PROGRESS, _fraction(value.fraction), message))
                continue
            size += len(dumps(value))  # also: a chunk that is not JSON fails here, in the model's name
            if index >= max_chunks:
                too_many = f"the model yielded more than --max-stream-chunks {max_chunks} chunks"
                return StreamLimitExceeded(too_many).to_dict()
            if size > max_bytes:
                return StreamLimitExceeded(
                    f"the model yielded more than --max-stream-bytes {max_bytes} bytes of chunks"
                ).to_dict()
            if index >= skip:
                emit((OUTPUT, index, value))
            index += 1
    except Exception as exc:
        log.info("streaming model raised after %d chunks: %r", index, exc)
        return ModelError(f"{type(exc).__name__}: {exc}").to_dict()
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()  # a generator stopped early runs its finally blocks now
            except Exception:
                log.exception("a streaming model's generator raised on close")
    return None


class ToLoop:
    """The executor's side of `emit`: items to the loop in order, each batch of them in one callback, and
    of progress reported faster than the loop takes it only the latest (no chunk between is lost). So a
    model yielding a million progress steps does not schedule a million callbacks on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, emit: Callable[[Item], None]) -> None:
        self._loop = loop
        self._emit = emit
        self._lock = threading.Lock()
        self._items: list[Item] = []
        self._scheduled = False

    def __call__(self, item: Item) -> None:
        with self._lock:
            items = self._items
            if item[0] == PROGRESS and items and items[-1][0] == PROGRESS:
                items[-1] = item  # the loop has not taken the last one yet: this one replaces it
            else:
                items.append(item)
            if self._scheduled:
                return  # the callback scheduled takes this one too
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for item in items:
            self._emit(item)


PROCESS_QUEUE_ITEMS = 256
"""Items of one stream waiting in the manager's queue between a worker process (--executor process) and
the API process's forwarding thread. A chunk waits for room; the stream's limits bound the chunks anyway."""

PROGRESS_RETRY_S = 0.01
"""While that queue is full, a progress report waits this long before it tries the queue again."""


class ToQueue:
    """A worker process's side of `emit`: items into the bounded queue the forwarding thread reads.

    A chunk waits for room. A progress report never does: while the queue is full only the latest report
    is kept, and it goes ahead of the next chunk (and of the end), so a model that reports progress a
    million times sends a bounded number of reports, the last one always among them, and every chunk."""

    def __init__(self, items: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._items = items  # a manager's Queue(PROCESS_QUEUE_ITEMS) proxy, or a queue.Queue in tests
        self._clock = clock
        self._pending: Item | None = None
        self._retry_at = 0.0

    def __call__(self, item: Item) -> None:
        if item[0] != PROGRESS:
            self.flush()
            self._items.put(item)
            return
        self._pending = item
        if self._clock() < self._retry_at:
            return  # full a moment ago: no call to the manager per report while it stays full
        try:
            self._items.put_nowait(item)
        except queue.Full:
            self._retry_at = self._clock() + PROGRESS_RETRY_S
            return
        self._pending = None

    def flush(self) -> None:
        """The report kept back, if any, waiting for room: before a chunk and at the end of the stream."""
        if self._pending is not None:
            item, self._pending = self._pending, None
            self._items.put(item)


def _fraction(value: Any) -> float:
    fraction = float(value)
    return min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0


def progress_dict(fraction: float, message: str | None) -> dict[str, Any]:
    return {"fraction": fraction, "message": message}


class StreamRun:
    """One streaming prediction being run in this process, on the loop's side."""

    def __init__(self, prediction: Prediction, *, settings: Settings, store: Store, bus: EventBus) -> None:
        self.prediction_id = prediction.prediction_id
        self.chunks: list[Any] = list(prediction.result or ())
        self.skip = len(self.chunks)  # committed by an earlier run: the rerun does not push them again
        self.committed = len(self.chunks)
        self.progress = prediction.progress
        self.canceled = False
        self._settings = settings
        self._store = store
        self._bus = bus
        self._events: list[StreamEvent] = []  # to publish, in order
        self._wake = asyncio.Event()
        self._publishing = False
        self._drained = asyncio.Event()  # set after each publish
        self._commit_timer: asyncio.TimerHandle | None = None
        self._commit: asyncio.Task[None] | None = None
        self._cancel_model: Callable[[], None] = lambda: None

    # -- the executor's items, on the loop --------------------------------------------------------------

    def on_item(self, item: Item) -> None:
        if self.canceled:
            # What the generator yields after the cancel was heard (it stops at its next yield, and over
            # processes or Redis the cancel reaches it a moment late) is neither pushed nor kept.
            return
        kind, a, b = item
        if kind == OUTPUT:
            self.chunks.append(b)
            self._events.append(StreamEvent(self.prediction_id, OUTPUT, a, chunk=b))
        else:
            self.progress = progress_dict(a, b)
            self._events.append(StreamEvent(self.prediction_id, PROGRESS, len(self.chunks), fraction=a, message=b))
        self._wake.set()
        if self._commit_timer is None and self._commit is None:
            self._commit_timer = asyncio.get_running_loop().call_later(
                self._settings.stream_commit_ms / 1000.0, self._start_commit
            )

    def _on_status(self, prediction: Prediction) -> None:
        if prediction.status is Status.CANCELED and not self.canceled:
            self.canceled = True  # the chunks so far are the record's last: one commit at the end keeps them
            if self._commit_timer is not None:
                self._commit_timer.cancel()
                self._commit_timer = None
            self._cancel_model()

    # -- publishing and committing ---------------------------------------------------------------------

    async def _pump(self) -> None:
        """Publish what arrived since the last turn, in one message: under load, many chunks at a time."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            events, self._events = self._events, []
            self._publishing = True
            try:
                await self._bus.publish_stream(events)
            except RetryLater as exc:  # best effort, like status changes: the chunks are committed anyway
                log.warning("could not push %d stream events of %s (%s)", len(events), self.prediction_id, exc)
            finally:
                self._publishing = False
                self._drained.set()

    async def _flush(self) -> None:
        """Until every event so far is published: the end is announced after the last chunk."""
        while self._events or self._publishing:
            self._drained.clear()
            self._wake.set()
            await self._drained.wait()

    def _start_commit(self) -> None:
        self._commit_timer = None
        self._commit = asyncio.create_task(self._commit_now(), name=f"zypher-commit-{self.prediction_id}")

    async def _commit_now(self) -> None:
        try:
            await self.commit()
        finally:
            self._commit = None
        if len(self.chunks) > self.committed and self._commit_timer is None and not self.canceled:  # more came
            self._commit_timer = asyncio.get_running_loop().call_later(
                self._settings.stream_commit_ms / 1000.0, self._start_commit
            )

    async def commit(self) -> None:
        start = self.committed
        fresh = self.chunks[start:]
        try:
            await self._store.commit_stream(self.prediction_id, start, fresh, self.progress)
        except RetryLater as exc:
            log.warning("could not commit %d chunks of %s (%s); trying again", len(fresh), self.prediction_id, exc)
            return
        self.committed = start + len(fresh)
        self._events.append(StreamEvent(self.prediction_id, COMMITTED, self.committed))
        self._wake.set()

    # -- the run -----------------------------------------------------------------------------------------

    async def run(self, start: StartStream) -> Outcome:
        """Run the stream `start` begins in the executor (it returns the call and how to cancel it); the
        outcome, with every chunk, once it ends. The chunks yielded before a cancel was seen are committed
        to the canceled record."""
        self._bus.subscribe(self.prediction_id, self._on_status)
        pump = asyncio.create_task(self._pump(), name=f"zypher-stream-{self.prediction_id}")
        try:
            call, self._cancel_model = await start(self.on_item)
            if self.canceled:
                self._cancel_model()
            error: dict[str, str] | None = await call
            # Every item the executor emitted was scheduled on the loop before its call returned.
            if self._commit_timer is not None:
                self._commit_timer.cancel()
                self._commit_timer = None
            if self._commit is not None:
                await asyncio.gather(self._commit, return_exceptions=True)
            if self.canceled and len(self.chunks) > self.committed:
                await self.commit()
            await self._flush()
        except asyncio.CancelledError:
            # The pool is stopping past --shutdown-timeout: stop the generator too. The record stays
            # running with what was committed, and the next start reruns it from there.
            self._cancel_model()
            raise
        finally:
            self._bus.unsubscribe(self.prediction_id, self._on_status)
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            if self._commit_timer is not None:
                self._commit_timer.cancel()
        return Outcome(self.prediction_id, result=list(self.chunks), error=error, progress=self.progress)


async def collect(prediction_id: str, bus: EventBus, start: StartStream) -> Outcome:
    """A stream run for its whole answer (a stream-only model asked not to stream): its chunks, kept
    here and pushed nowhere, under the same limits, stopped at the next yield once canceled."""
    chunks: list[Any] = []
    canceled = False
    stops: list[Callable[[], None]] = []  # the call's cancel, once it has begun

    def on_item(item: Item) -> None:
        if item[0] == OUTPUT:
            chunks.append(item[2])

    def on_status(prediction: Prediction) -> None:
        nonlocal canceled
        if prediction.status is Status.CANCELED and not canceled:
            canceled = True
            for stop in stops:
                stop()

    bus.subscribe(prediction_id, on_status)
    try:
        call, cancel_model = await start(on_item)
        stops.append(cancel_model)
        if canceled:
            cancel_model()
        error: dict[str, str] | None = await call
    except asyncio.CancelledError:
        for stop in stops:
            stop()  # the pool is stopping past --shutdown-timeout: the generator stops too
        raise
    finally:
        bus.unsubscribe(prediction_id, on_status)
    return Outcome(prediction_id, result=chunks, error=error)
