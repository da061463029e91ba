"""The seams between the core and where records, work and events live.

A backend is three small parts: a `Store` of records, a `WorkQueue` of jobs and an `EventBus` of state
changes. Capabilities only some stores have (recovery after a restart, sweeping expired records,
a health check of a remote server) are protocols of their own, so no store carries no-op methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ..records import IdempotencyKey, Job, Outcome, Prediction, StreamEvent
from ..webhooks.schedule import Delivery, Settlement

Listener = Callable[[Prediction], None]
"""Called on the event loop with each new state. Must not block: put it in a queue and return."""

StreamListener = Callable[[StreamEvent], None]
"""Called on the event loop with each chunk, progress and commit of a streaming prediction, in order."""


class Store(Protocol):
    async def add(self, prediction: Prediction, idempotency: IdempotencyKey | None = None) -> Prediction:
        """Store a new prediction, or return the one already stored under the same idempotency key.

        Raises IdempotencyConflict when that key was used with a different body.
        """
        ...

    async def get(self, prediction_id: str) -> Prediction | None: ...

    async def delete(self, prediction_id: str) -> None: ...

    async def start(self, prediction_ids: Sequence[str], *, now: float | None = None) -> list[Prediction]:
        """Move the still-queued ones to running; return those (canceled ones are skipped).

        With `now`, a queued one whose deadline has passed goes straight to failed (deadline_exceeded)
        instead, and is returned too, failed (lifecycle.start)."""
        ...

    async def fail_queued(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        """Fail still-queued predictions with the outcomes' errors, without starting them (work that will
        never run); return those (any other state is kept)."""
        ...

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        """Record outcomes of running predictions; return the updated ones (canceled ones keep their state)."""
        ...

    async def cancel(self, prediction_id: str) -> Prediction:
        """Cancel a queued or running prediction. Raises NotFound or AlreadyFinished."""
        ...

    async def commit_stream(
        self, prediction_id: str, start: int, chunks: list[Any], progress: dict[str, Any] | None
    ) -> Prediction | None:
        """Append a running (or canceled) stream's chunks from index `start`, with its latest progress
        (lifecycle.append_chunks); the record if it changed."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Recovers(Protocol):
    """A store whose records outlive the process: what was unfinished is found again at start."""

    async def recover(self, max_attempts: int) -> tuple[list[Prediction], list[Prediction]]:
        """(predictions to queue again in their original order, ones failed as worker_lost)."""
        ...


@runtime_checkable
class DefersWrites(Protocol):
    """A durable store that can hold a new prediction in this process and write it once, finished.

    For a sync request without an Idempotency-Key, whose client has had no answer yet: a crash before
    the write loses only a request that gets a connection error (and can be retried), never a 202.
    """

    async def add_deferred(self, prediction: Prediction) -> Prediction:
        """Like `add` without a key, but written only when it finishes (or `persist` is called)."""
        ...

    async def persist(self, prediction_id: str) -> None:
        """Make a deferred prediction durable as it stands now (before a 202 is sent for it)."""
        ...


@runtime_checkable
class Sweeps(Protocol):
    """A store that deletes expired records itself, when asked (others let their server expire them)."""

    async def sweep(self, now: float) -> int:
        """Delete finished predictions whose expires_at has passed; return how many."""
        ...


@runtime_checkable
class KeepsWebhooks(Protocol):
    """A store that keeps pending webhook deliveries with the records: each is written in the same
    transaction as the state change that causes it (webhooks/schedule.py's `scheduled_by`), and waits
    there, not in memory, until it is delivered or given up."""

    def on_webhooks_scheduled(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the loop after a commit that scheduled deliveries (to wake the delivery loop)."""
        ...

    async def due_webhooks(
        self, now: float, limit: int, *, per_host: int | None = None, in_flight: Mapping[str, int] | None = None
    ) -> list[Delivery]:
        """Up to `limit` deliveries due by `now`, earliest first, and with `per_host`, at most that many to
        one host ("name:port") counting the ones `in_flight` there. Each is this process's alone until
        settled: no other caller gets it meanwhile."""
        ...

    async def settle_webhook(self, settlement: Settlement) -> None:
        """Record an attempt in one transaction: the delivery again at its new due time (or gone), and
        the record's webhook state, if the record still shows that event."""
        ...

    async def pending_webhooks(self) -> int:
        """Deliveries not yet delivered or given up (being attempted included)."""
        ...


@runtime_checkable
class Checks(Protocol):
    """A store on a server that can be away."""

    async def check(self) -> None:
        """Raise BackendUnavailable if the store cannot be reached."""
        ...


class WorkQueue(Protocol):
    maxsize: int

    async def depth(self) -> int:
        """How many jobs wait to be taken (not counting ones being run). Shared backends: the figure
        every process sees, the one the bounded put checks (Interrupts.backlog is this process's own)."""
        ...

    async def put(self, job: Job, *, force: bool = False) -> None:
        """Enqueue, or raise QueueFull at once: callers never wait for room.

        `force` goes past the bound (recovery must not drop what was accepted).
        """
        ...

    async def get_batch(self, max_size: int, max_delay: float) -> list[Job]:
        """Wait for one job, then gather up to max_size, waiting at most max_delay for more."""
        ...

    async def ack(self, jobs: Sequence[Job]) -> None:
        """The jobs' outcomes are stored: they need not be delivered again."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class TellsPositions(Protocol):
    """A queue that can say where a job stands in line, in O(1) per job asked about."""

    async def positions(self, prediction_ids: Sequence[str]) -> tuple[dict[str, int], int]:
        """(each id still waiting -> how many jobs wait before it, 0 for the next; how many jobs were
        taken off the queue so far in all, for its throughput). Ids not waiting are left out."""
        ...


@runtime_checkable
class ListsEntries(Protocol):
    """A queue whose entries can be read without taking them (Redis: to fail the work of a model no one
    serves any more)."""

    async def entries(self, limit: int) -> list[Job]:
        """Up to `limit` of its jobs, oldest first, whether waiting or held by a worker (`ack` removes them)."""
        ...

    async def unheld(self, jobs: Sequence[Job]) -> list[Job]:
        """Those of `jobs` (from `entries`) no live worker holds: waiting, or held by a worker that has
        not touched them for the queue's claim idle time (lost)."""
        ...


@runtime_checkable
class Releases(Protocol):
    """A queue whose taken jobs stay assigned to this process until acknowledged (Redis)."""

    async def release(self, jobs: Sequence[Job]) -> None:
        """Stop holding these jobs: a live worker takes them over after the queue's idle time."""
        ...


class Interrupted(Exception):
    """get_batch was interrupted (Interrupts.interrupt): the pool is stopping. Not a CancelledError, which
    would say the caller's own task was cancelled (and confuse asyncio.wait_for or a TaskGroup around it)."""


@runtime_checkable
class Interrupts(Protocol):
    """A queue whose get_batch may carry on past a cancel: redis-py can lose the cancel of a command in
    flight (redis/redis-py#2028), and a worker would then wait on the queue for ever. A pool stops its
    waiting workers by interrupting them instead of cancelling them: a cancel landing as a read's reply
    arrives would drop entries Redis has delivered to this consumer, which an interrupt keeps."""

    def interrupt(self) -> float:
        """End every get_batch under way with Interrupted at its next turn (its reads are bounded); what
        one had taken it keeps for the next call (see `backlog`). Later calls are not affected. Returns
        the seconds within which the calls under way end, while the backend answers."""
        ...

    def backlog(self) -> int:
        """Jobs this queue holds in this process for its next get_batch (taken over from a lost worker,
        or put back by an interrupt): not in `depth()`, which is the figure every process shares."""
        ...


class EventBus(Protocol):
    async def publish(self, predictions: list[Prediction]) -> None: ...

    def subscribe(self, prediction_id: str, listener: Listener) -> None: ...

    def unsubscribe(self, prediction_id: str, listener: Listener) -> None: ...

    async def publish_stream(self, events: list[StreamEvent]) -> None:
        """Chunks, progress and commits of streaming predictions: every subscriber, in any process, gets
        one prediction's events in the order they were published, and in order with its status changes."""
        ...

    def subscribe_stream(self, prediction_id: str, listener: StreamListener) -> None: ...

    def unsubscribe_stream(self, prediction_id: str, listener: StreamListener) -> None: ...

    def uncommitted(self, prediction_id: str) -> tuple[int, list[Any]]:
        """The chunks of a stream this process has seen go by and that may not be in the store yet:
        (the index of the first, the chunks). Joined to a record read from the store, they fill it up to
        the last chunk dispatched here, so that a subscriber's snapshot leaves no gap."""
        ...

    def listener_count(self) -> int:
        """Listeners held in this process (sockets, event streams and sync requests waiting)."""
        ...
