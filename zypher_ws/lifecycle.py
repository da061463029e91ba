"""The lifecycle rules every store applies: which transitions are allowed and what they produce.

Pure functions of the current record; each store runs them atomically (a dict on the loop, a SQLite
transaction, a Redis WATCH/MULTI), so the rules live once and no store can drift from the others.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import AlreadyFinished, DeadlineExceeded, IdempotencyConflict, NotFound, WorkerLost
from .records import IdempotencyKey, Outcome, Prediction, Status


def start(current: Prediction | None, batch_size: int, now: float | None = None, ttl: float = 0.0) -> Prediction | None:
    """queued -> running; None for anything else (canceled meanwhile, or gone).

    With `now`, one whose deadline has passed goes queued -> failed (deadline_exceeded) instead: it never
    ran, so it gets no attempt and no start time."""
    if current is None or current.status is not Status.QUEUED:
        return None
    if now is not None and current.deadline is not None and current.deadline < now:
        error = DeadlineExceeded(
            f"waited {now - current.created_at:.3f} s in the queue, past its timeout of "
            f"{current.deadline - current.created_at:.3f} s; not run"
        ).to_dict()
        return current.finished(Status.FAILED, ttl=ttl, error=error)
    return current.started(batch_size=batch_size)


def fail_queued(current: Prediction | None, outcome: Outcome, ttl: float) -> Prediction | None:
    """queued -> failed, for work that will never run (its model is no longer served); None for anything
    else. No attempt is counted and no start time set: nothing started."""
    if current is None or current.status is not Status.QUEUED or not outcome.error:
        return None
    return current.finished(Status.FAILED, ttl=ttl, error=outcome.error)


def finish(current: Prediction | None, outcome: Outcome, ttl: float) -> Prediction | None:
    """running -> succeeded | failed; None if it is no longer running (a cancel keeps its state)."""
    if current is None or current.status is not Status.RUNNING:
        return None
    status = Status.FAILED if outcome.error else Status.SUCCEEDED
    done = current.finished(status, ttl=ttl, result=outcome.result, error=outcome.error)
    if outcome.progress is not None:
        return done.streamed(done.result, outcome.progress)
    return done


def cancel(current: Prediction | None, prediction_id: str, ttl: float) -> Prediction:
    if current is None:
        raise NotFound(f"no prediction {prediction_id}")
    if current.status.terminal:
        raise AlreadyFinished(f"prediction {prediction_id} already {current.status.value}")
    # A stream keeps the chunks it had produced: they were pushed, and may have been read.
    return current.finished(Status.CANCELED, ttl=ttl, result=current.chunks_so_far())


def append_chunks(
    current: Prediction | None,
    start: int,
    chunks: list[Any],
    progress: dict[str, Any] | None,
    *,
    now: float | None = None,
) -> Prediction | None:
    """A running stream's chunks from index `start` committed (and its progress); None if nothing changes.

    A canceled one takes them too: the chunks its generator yielded before it saw the cancel stay. Chunks
    already stored (a commit retried) are not stored twice. New chunks may make a webhook's `output`
    event pending (Webhook.on_output, at `now`), in the same write; a canceled one's do not (no `output`
    after the end: without `completed` in its filter the record would show an event nothing sends).
    """
    if current is None or not current.stream or current.status not in (Status.RUNNING, Status.CANCELED):
        return None
    have = list(current.result or ())
    if start > len(have):
        return None  # a gap: commits run in order, so this is a record from before a rerun; keep it
    fresh = chunks[len(have) - start :]
    if not fresh and progress == current.progress:
        return None
    changed = current.streamed(have + fresh, progress)
    if fresh and changed.webhook is not None and current.status is Status.RUNNING:
        at = time.time() if now is None else now
        changed = changed.with_webhook(changed.webhook.on_output(len(changed.result), at))
    return changed


def recover(current: Prediction, max_attempts: int, ttl: float) -> Prediction:
    """A prediction found queued or running at start: queue it again, or give up after max_attempts."""
    if current.status is Status.RUNNING:
        if current.attempts >= max_attempts:
            error = WorkerLost(f"the worker running it stopped {current.attempts} times").to_dict()
            return current.finished(Status.FAILED, ttl=ttl, error=error, result=current.chunks_so_far())
        return current.requeued()
    return current


def check_idempotency(existing: Prediction | None, stored: IdempotencyKey | None, asked: IdempotencyKey) -> None:
    if existing is not None and stored is not None and stored.fingerprint != asked.fingerprint:
        raise IdempotencyConflict(f"Idempotency-Key {asked.key!r} was already used with a different body")
