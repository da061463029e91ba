"""Watches: a bus's status changes turned into an ordered, gap-free stream per prediction and consumer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .backends.base import EventBus
from .records import Prediction
from .validation import is_prediction_id


class Watch:
    """Follows one prediction for one consumer: a snapshot first, then each later state exactly once.

    It subscribes before it reads the snapshot, buffers what arrives meanwhile, and drops any state
    that is not past the last one delivered. So a prediction that finishes while the watch starts
    still yields exactly one terminal state, and states never go backwards.
    """

    def __init__(
        self,
        bus: EventBus,
        prediction_id: str,
        deliver: Callable[[Prediction, bool], None],
    ) -> None:
        self._bus = bus
        self.prediction_id = prediction_id
        self._deliver = deliver  # (prediction, is_snapshot)
        self._pending: list[Prediction] | None = []
        self._last_rank = -1
        self.closed = False

    async def start(self, read: Callable[[str], Awaitable[Prediction | None]]) -> Prediction | None:
        """Subscribe, then read the current state. Returns None (and stops) if the id is unknown."""
        if not is_prediction_id(self.prediction_id):
            self.closed = True
            return None
        self._bus.subscribe(self.prediction_id, self._on_event)
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
        for prediction in pending:
            self._on_event(prediction)
        return snapshot

    def stop(self) -> None:
        if not self.closed:
            self.closed = True
            self._bus.unsubscribe(self.prediction_id, self._on_event)

    def _on_event(self, prediction: Prediction) -> None:
        if self._pending is not None:
            self._pending.append(prediction)
        else:
            self._emit(prediction, False)

    def _emit(self, prediction: Prediction, snapshot: bool) -> None:
        if self.closed or prediction.status.rank <= self._last_rank:
            return
        self._last_rank = prediction.status.rank
        if prediction.status.terminal:
            self.stop()
        self._deliver(prediction, snapshot)
