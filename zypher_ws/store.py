"""Where prediction records live. Transitions are conditional, so the lifecycle is enforced in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import AlreadyFinished, NotFound
from .records import Prediction, Status


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a worker learned about one prediction: a result, or an error."""

    prediction_id: str
    result: Any = None
    error: dict[str, str] | None = None


class Store(Protocol):
    async def add(self, prediction: Prediction) -> None: ...

    async def get(self, prediction_id: str) -> Prediction | None: ...

    async def delete(self, prediction_id: str) -> None: ...

    async def start(self, prediction_ids: Sequence[str]) -> list[Prediction]:
        """Move the still-queued ones to running; return those (canceled ones are skipped)."""
        ...

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        """Record outcomes of running predictions; return the updated ones (canceled ones keep their state)."""
        ...

    async def cancel(self, prediction_id: str) -> Prediction:
        """Cancel a queued or running prediction. Raises NotFound or AlreadyFinished."""
        ...


class MemoryStore:
    """Records in a dict: fast, and gone when the process ends."""

    def __init__(self) -> None:
        self._records: dict[str, Prediction] = {}

    def __len__(self) -> int:
        return len(self._records)

    async def add(self, prediction: Prediction) -> None:
        self._records[prediction.prediction_id] = prediction

    async def get(self, prediction_id: str) -> Prediction | None:
        return self._records.get(prediction_id)

    async def delete(self, prediction_id: str) -> None:
        self._records.pop(prediction_id, None)

    async def start(self, prediction_ids: Sequence[str]) -> list[Prediction]:
        started = []
        for pid in prediction_ids:
            current = self._records.get(pid)
            if current is not None and current.status is Status.QUEUED:
                self._records[pid] = current = current.started(batch_size=len(prediction_ids))
                started.append(current)
        return started

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        finished = []
        for outcome in outcomes:
            current = self._records.get(outcome.prediction_id)
            if current is None or current.status is not Status.RUNNING:
                continue
            status = Status.FAILED if outcome.error else Status.SUCCEEDED
            current = current.finished(status, result=outcome.result, error=outcome.error)
            self._records[outcome.prediction_id] = current
            finished.append(current)
        return finished

    async def cancel(self, prediction_id: str) -> Prediction:
        current = check_cancelable(self._records.get(prediction_id), prediction_id)
        self._records[prediction_id] = current = current.finished(Status.CANCELED)
        return current


def check_cancelable(current: Prediction | None, prediction_id: str) -> Prediction:
    if current is None:
        raise NotFound(f"no prediction {prediction_id}")
    if current.status.terminal:
        raise AlreadyFinished(f"prediction {prediction_id} already {current.status.value}")
    return current
