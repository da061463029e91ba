"""Watches: a bus's status changes turned into an ordered, gap-free stream per prediction and consumer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .backends.base import EventBus
from .records import COMMITTED, OUTPUT, PROGRESS, Prediction, StreamEvent
from .validation import is_prediction_id

log = logging.getLogger(__name__)

MAX_HELD = 10_000  # chunks held past a gap, waiting for the store to fill it (more: the oldest go)


class Watch:
    """Follows one prediction for one consumer: a snapshot first, then each later state exactly once.

    It subscribes before it reads the snapshot, buffers what arrives meanwhile, and drops any state
    that is not past the last one delivered. So a prediction that finishes while the watch starts
    still yields exactly one terminal state, and states never go backwards.

    With `on_stream`, a streaming prediction's chunks follow the snapshot's by index: each index once,
    in order, none missing. One that arrives past a gap (it was pushed before this watch subscribed, or
    while the bus was away, and is not committed yet) is held until the store has the gap's chunks: the
    watch reads the record again when the stream says it committed more, and a terminal state carries
    them all. Every chunk is delivered before the terminal state.
    """

    def __init__(
        self,
        bus: EventBus,
        prediction_id: str,
        deliver: Callable[[Prediction, bool], None],
        *,
        on_stream: Callable[[StreamEvent], None] | None = None,
        from_index: int | None = None,
    ) -> None:
        self._bus = bus
        self.prediction_id = prediction_id
        self._deliver = deliver  # (prediction, is_snapshot)
        self._on_stream = on_stream
        self._from_index = from_index
        self._pending: list[Prediction | StreamEvent] | None = []
        self._last_rank = -1
        self._next_index = 0  # the index of the next chunk to deliver
        self._held: dict[int, StreamEvent] = {}
        self._read: Callable[[str], Awaitable[Prediction | None]] | None = None
        self._mending: asyncio.Task[None] | None = None
        self._stopped: list[Callable[[], None]] = []
        self.closed = False

    async def start(self, read: Callable[[str], Awaitable[Prediction | None]]) -> Prediction | None:
        """Subscribe, then read the current state. Returns None (and stops) if the id is unknown."""
        if not is_prediction_id(self.prediction_id):
            self.closed = True
            return None
        self._read = read
        self._bus.subscribe(self.prediction_id, self._on_state)
        if self._on_stream is not None:
            self._bus.subscribe_stream(self.prediction_id, self._on_event)
        try:
            snapshot = await read(self.prediction_id)
        except BaseException:
            self.stop()
            raise
        if snapshot is None:
            self.stop()
            return None
        pending, self._pending = self._pending or [], None
        self._emit(snapshot, True)
        for event in pending:
            self._on_event(event)
        return snapshot

    @property
    def rank(self) -> int:
        """The lifecycle rank of the last state delivered (0: queued; -1 before the snapshot)."""
        return self._last_rank

    def stop(self) -> None:
        if not self.closed:
            self.closed = True
            self._bus.unsubscribe(self.prediction_id, self._on_state)
            if self._on_stream is not None:
                self._bus.unsubscribe_stream(self.prediction_id, self._on_event)
            if self._mending is not None:
                self._mending.cancel()
            stopped, self._stopped = self._stopped, []
            for callback in stopped:
                callback()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when the watch stops (at once if it has): what hangs off a watch goes
        with it, rather than outliving the consumer."""
        if self.closed:
            callback()
        else:
            self._stopped.append(callback)

    def _on_state(self, prediction: Prediction) -> None:
        """The bus's listener for status changes: _on_event without its type test, as a terminal state
        watched by 1,000 sockets comes here 1,000 times in one go."""
        if self._pending is not None:
            self._pending.append(prediction)
        else:
            self._emit(prediction, False)

    def _on_event(self, event: Any) -> None:
        if self._pending is not None:
            self._pending.append(event)
        elif isinstance(event, StreamEvent):
            self._stream_event(event)
        else:
            self._emit(event, False)

    def _emit(self, prediction: Prediction, snapshot: bool) -> None:
        if self.closed or prediction.status.rank <= self._last_rank:
            return
        if self._on_stream is not None and prediction.stream:
            chunks = prediction.result or []
            if snapshot:
                # The snapshot carries chunks 0..k; a resume from `from_index` has them replayed after it.
                # A resumer that holds chunks not committed yet (the run was lost) gets none of them again.
                self._next_index = len(chunks) if self._from_index is None else self._from_index + 1
            elif len(chunks) > self._next_index:
                self._fill(chunks)  # a state carrying chunks not delivered yet (the end of the stream): them first
        self._last_rank = prediction.status.rank
        if prediction.status.terminal:
            self.stop()
        self._deliver(prediction, snapshot)
        if snapshot and self._on_stream is not None and prediction.stream:
            self._fill(prediction.result or [])  # a resume's replay, after its snapshot

    # -- streams -------------------------------------------------------------------------------------

    def _stream_event(self, event: StreamEvent) -> None:
        if self.closed or self._on_stream is None:
            return
        if event.kind == OUTPUT:
            if event.index < self._next_index:
                return  # delivered already (in the snapshot, or from a record read to mend a gap)
            if event.index > self._next_index:
                self._held[event.index] = event
                if len(self._held) > MAX_HELD:
                    del self._held[min(self._held)]
                return
            self._next_index += 1
            self._on_stream(event)
            self._release_held()
        elif event.kind == PROGRESS:
            self._on_stream(event)
        elif event.kind == COMMITTED and self._held and event.index > self._next_index:
            self._mend()  # the store has chunks this watch is missing: read them

    def _fill(self, chunks: list[Any]) -> None:
        """Deliver chunks from the next index up to the end of `chunks` (a record's), then what was held."""
        assert self._on_stream is not None
        while self._next_index < len(chunks):
            index = self._next_index
            self._next_index += 1
            self._held.pop(index, None)
            self._on_stream(StreamEvent(self.prediction_id, OUTPUT, index, chunk=chunks[index]))
        self._release_held()

    def _release_held(self) -> None:
        assert self._on_stream is not None
        while self._held:
            event = self._held.pop(self._next_index, None)
            if event is None:
                for index in [i for i in self._held if i < self._next_index]:
                    del self._held[index]
                return
            self._next_index += 1
            self._on_stream(event)

    def _mend(self) -> None:
        if self._mending is None and self._read is not None:
            self._mending = asyncio.create_task(self._mend_from(self._read))

    async def _mend_from(self, read: Callable[[str], Awaitable[Prediction | None]]) -> None:
        try:
            record = await read(self.prediction_id)
        except Exception as exc:  # a later commit (or the end) tries again
            log.info("could not read %s to fill a gap in its stream: %s", self.prediction_id, exc)
            record = None
        finally:
            self._mending = None
        if record is not None and not self.closed and record.stream:
            self._fill(record.result or [])
