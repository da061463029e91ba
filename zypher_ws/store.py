"""Where prediction records live. The lifecycle rules are functions here, shared by every store,
and each store applies them atomically (a dict in one thread, a transaction in SQLite)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import AlreadyFinished, IdempotencyConflict, NotFound
from .records import Prediction, Status

WORKER_LOST = "worker_lost"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a worker learned about one prediction: a result, or an error."""

    prediction_id: str
    result: Any = None
    error: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    key: str
    fingerprint: str  # hash of the request body: one key, one body


class Store(Protocol):
    async def add(self, prediction: Prediction, idempotency: IdempotencyKey | None = None) -> Prediction:
        """Store a new prediction, or return the one already stored under the same idempotency key.

        Raises IdempotencyConflict when that key was used with a different body.
        """
        ...

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

    async def recover(self, max_attempts: int) -> tuple[list[Prediction], list[Prediction]]:
        """After a restart: (predictions to queue again in their original order, ones failed as worker_lost)."""
        ...

    async def sweep(self, now: float) -> int:
        """Delete finished predictions whose expires_at has passed; return how many."""
        ...

    async def check(self) -> None:
        """Raise BackendUnavailable if the store cannot be reached."""
        ...

    async def close(self) -> None: ...


# -- the lifecycle rules ------------------------------------------------------------------------------


def start(current: Prediction | None, batch_size: int) -> Prediction | None:
    if current is None or current.status is not Status.QUEUED:
        return None
    return current.started(batch_size=batch_size)


def finish(current: Prediction | None, outcome: Outcome, ttl: float) -> Prediction | None:
    if current is None or current.status is not Status.RUNNING:
        return None
    status = Status.FAILED if outcome.error else Status.SUCCEEDED
    return current.finished(status, ttl=ttl, result=outcome.result, error=outcome.error)


def cancel(current: Prediction | None, prediction_id: str, ttl: float) -> Prediction:
    if current is None:
        raise NotFound(f"no prediction {prediction_id}")
    if current.status.terminal:
        raise AlreadyFinished(f"prediction {prediction_id} already {current.status.value}")
    return current.finished(Status.CANCELED, ttl=ttl)


def recover(current: Prediction, max_attempts: int, ttl: float) -> Prediction:
    """A prediction found queued or running at start: queue it again, or give up after max_attempts."""
    if current.status is Status.RUNNING:
        if current.attempts >= max_attempts:
            error = {"code": WORKER_LOST, "message": f"the worker running it stopped {current.attempts} times"}
            return current.finished(Status.FAILED, ttl=ttl, error=error)
        return current.requeued()
    return current


def check_idempotency(existing: Prediction | None, stored: IdempotencyKey | None, asked: IdempotencyKey) -> None:
    if existing is not None and stored is not None and stored.fingerprint != asked.fingerprint:
        raise IdempotencyConflict(f"Idempotency-Key {asked.key!r} was already used with a different body")


class MemoryStore:
    """Records in a dict: fast, and gone when the process ends.

    At most `max_finished` finished records are kept (the oldest finished go first, before their TTL):
    the heap is the only place they live. Unfinished ones are bounded by the queue.
    """

    def __init__(self, *, ttl: float = 86400.0, max_finished: int = 50_000) -> None:
        self.ttl = ttl
        self.max_finished = max_finished
        self._records: dict[str, Prediction] = {}
        # Ids of finished records, oldest first. An OrderedDict, not a dict: popping a plain dict's first
        # key again and again leaves holes that the next iter() must scan past (quadratic at load).
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._keys: dict[str, tuple[str, IdempotencyKey]] = {}

    def __len__(self) -> int:
        return len(self._records)

    async def add(self, prediction: Prediction, idempotency: IdempotencyKey | None = None) -> Prediction:
        if idempotency is not None:
            pid, stored = self._keys.get(idempotency.key, (None, None))
            existing = self._records.get(pid) if pid else None
            check_idempotency(existing, stored, idempotency)
            if existing is not None:
                return existing
            self._keys[idempotency.key] = (prediction.prediction_id, idempotency)
        self._records[prediction.prediction_id] = prediction
        return prediction

    async def get(self, prediction_id: str) -> Prediction | None:
        return self._records.get(prediction_id)

    async def delete(self, prediction_id: str) -> None:
        self._records.pop(prediction_id, None)
        self._finished.pop(prediction_id, None)

    async def start(self, prediction_ids: Sequence[str]) -> list[Prediction]:
        return self._apply(start(self._records.get(pid), len(prediction_ids)) for pid in prediction_ids)

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        return self._apply(finish(self._records.get(o.prediction_id), o, self.ttl) for o in outcomes)

    async def cancel(self, prediction_id: str) -> Prediction:
        return self._apply([cancel(self._records.get(prediction_id), prediction_id, self.ttl)])[0]

    async def recover(self, max_attempts: int) -> tuple[list[Prediction], list[Prediction]]:
        return [], []  # nothing survives a restart here

    async def sweep(self, now: float) -> int:
        expired = [p.prediction_id for p in self._records.values() if p.expires_at is not None and p.expires_at <= now]
        for pid in expired:
            del self._records[pid]
            self._finished.pop(pid, None)
        self._keys = {k: v for k, v in self._keys.items() if v[0] in self._records}
        return len(expired)

    async def check(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _apply(self, updates: Any) -> list[Prediction]:
        changed = [p for p in updates if p is not None]
        for p in changed:
            self._records[p.prediction_id] = p
            if p.status.terminal:
                self._finished[p.prediction_id] = None
        while len(self._finished) > self.max_finished:
            oldest, _ = self._finished.popitem(last=False)
            self._records.pop(oldest, None)
        return changed
