"""`memory://`: records, queue and events in this process. Fast, and gone when the process ends.

The queue and the bus are also the embedded parts of `sqlite:///`, whose records alone are durable.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .. import lifecycle
from ..errors import QueueFull
from ..queue_policy import LevelPicker
from ..records import COMMITTED, DEAD_LETTERED, OUTPUT, IdempotencyKey, Job, Outcome, Prediction, StreamEvent
from ..waiting import settle, settled_within
from ..webhooks.schedule import Delivery, Settlement, scheduled_by
from .base import Listener, StreamListener

log = logging.getLogger(__name__)


class MemoryStore:
    """Records in a dict: fast, and gone when the process ends.

    At most `max_finished` finished records are kept (the oldest finished go first, before their TTL):
    the heap is the only place they live. Unfinished ones are bounded by the queue. Pending webhook
    deliveries are bounded by the same number (past it the oldest is given up, and its record says so).
    """

    def __init__(self, *, ttl: float = 86400.0, max_finished: int = 50_000) -> None:
        self.ttl = ttl
        self.max_finished = max_finished
        self._records: dict[str, Prediction] = {}
        # Ids of finished records, oldest first. An OrderedDict, not a dict: popping a plain dict's first
        # key again and again leaves holes that the next iter() must scan past (quadratic at load).
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._keys: dict[str, tuple[str, IdempotencyKey]] = {}
        # Pending webhook deliveries by webhook id, oldest scheduled first; a heap of (due_at, id) finds the
        # due ones (entries whose delivery moved on are skipped when they surface); ids being attempted.
        self._webhooks: OrderedDict[str, Delivery] = OrderedDict()
        self._due: list[tuple[float, str]] = []
        self._leased: set[str] = set()
        self._on_scheduled: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._records)

    async def add(self, prediction: Prediction, idempotency: IdempotencyKey | None = None) -> Prediction:
        if idempotency is not None:
            pid, stored = self._keys.get(idempotency.key, (None, None))
            existing = self._records.get(pid) if pid else None
            lifecycle.check_idempotency(existing, stored, idempotency)
            if existing is not None:
                return existing
            self._keys[idempotency.key] = (prediction.prediction_id, idempotency)
        self._records[prediction.prediction_id] = prediction
        self._schedule([prediction])
        return prediction

    async def get(self, prediction_id: str) -> Prediction | None:
        return self._records.get(prediction_id)

    async def delete(self, prediction_id: str) -> None:
        self._records.pop(prediction_id, None)
        self._finished.pop(prediction_id, None)

    async def start(self, prediction_ids: Sequence[str], *, now: float | None = None) -> list[Prediction]:
        n = len(prediction_ids)
        return self._apply(lifecycle.start(self._records.get(pid), n, now, self.ttl) for pid in prediction_ids)

    async def fail_queued(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        return self._apply(lifecycle.fail_queued(self._records.get(o.prediction_id), o, self.ttl) for o in outcomes)

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        return self._apply(lifecycle.finish(self._records.get(o.prediction_id), o, self.ttl) for o in outcomes)

    async def cancel(self, prediction_id: str) -> Prediction:
        return self._apply([lifecycle.cancel(self._records.get(prediction_id), prediction_id, self.ttl)])[0]

    async def commit_stream(
        self, prediction_id: str, start: int, chunks: list[Any], progress: dict[str, Any] | None
    ) -> Prediction | None:
        changed = lifecycle.append_chunks(self._records.get(prediction_id), start, chunks, progress)
        if changed is not None:
            self._records[prediction_id] = changed
            self._schedule([changed])  # new chunks may make a webhook's `output` due
        return changed

    async def sweep(self, now: float) -> int:
        expired = [p.prediction_id for p in self._records.values() if p.expires_at is not None and p.expires_at <= now]
        for pid in expired:
            del self._records[pid]
            self._finished.pop(pid, None)
        self._keys = {k: v for k, v in self._keys.items() if v[0] in self._records}
        return len(expired)

    async def close(self) -> None:
        pass

    def _apply(self, updates: Iterable[Prediction | None]) -> list[Prediction]:
        changed = [p for p in updates if p is not None]
        for p in changed:
            self._records[p.prediction_id] = p
            if p.status.terminal:
                self._finished[p.prediction_id] = None
        while len(self._finished) > self.max_finished:
            oldest, _ = self._finished.popitem(last=False)
            self._records.pop(oldest, None)
        self._schedule(changed)
        return changed

    # -- webhooks (KeepsWebhooks) ----------------------------------------------------------------------

    def on_webhooks_scheduled(self, callback: Callable[[], None]) -> None:
        self._on_scheduled = callback

    def _schedule(self, changed: Iterable[Prediction]) -> None:
        scheduled = False
        for p in changed:
            if p.webhook is not None and (delivery := scheduled_by(p)) is not None:
                if delivery.webhook_id not in self._webhooks:
                    self._webhooks[delivery.webhook_id] = delivery
                    heapq.heappush(self._due, (delivery.due_at, delivery.webhook_id))
                scheduled = True
        if not scheduled:
            return
        while len(self._webhooks) > self.max_finished:
            _, dropped = self._webhooks.popitem(last=False)
            log.warning(
                "memory:// keeps at most %d pending webhook deliveries: gave up the %s event of %s",
                self.max_finished, dropped.event, dropped.prediction_id,
            )  # fmt: skip
            record = self._records.get(dropped.prediction_id)
            if record is not None and record.webhook is not None and record.webhook.event == dropped.event:
                given_up = record.webhook.attempted(
                    state=DEAD_LETTERED, last_error="too_many_pending", next_attempt_at=None
                )
                self._records[record.prediction_id] = record.with_webhook(given_up)
        if self._on_scheduled is not None:
            self._on_scheduled()

    async def due_webhooks(
        self, now: float, limit: int, *, per_host: int | None = None, in_flight: Mapping[str, int] | None = None
    ) -> list[Delivery]:
        taken: list[Delivery] = []
        hosts = Counter(in_flight or {})
        passed: list[tuple[float, str]] = []  # due, but to a host with its share: back on the heap afterwards
        while self._due and self._due[0][0] <= now and len(taken) < limit:
            due_at, wid = heapq.heappop(self._due)
            delivery = self._webhooks.get(wid)
            if delivery is None or delivery.due_at != due_at or wid in self._leased:
                continue  # delivered, given up or rescheduled since this entry was pushed
            if per_host is not None and hosts[delivery.host] >= per_host:
                passed.append((due_at, wid))
                continue
            hosts[delivery.host] += 1
            self._leased.add(wid)
            taken.append(delivery)
        for entry in passed:
            heapq.heappush(self._due, entry)
        return taken

    async def settle_webhook(self, settlement: Settlement) -> None:
        delivery = settlement.delivery
        wid = delivery.webhook_id
        self._leased.discard(wid)
        if wid in self._webhooks:  # not given up meanwhile
            if settlement.retry is not None:
                self._webhooks[wid] = settlement.retry
                heapq.heappush(self._due, (settlement.retry.due_at, wid))
            else:
                del self._webhooks[wid]
        p = self._records.get(delivery.prediction_id)
        if p is not None and p.webhook is not None and settlement.applies_to(p):
            self._records[p.prediction_id] = p.with_webhook(settlement.apply(p.webhook))

    async def pending_webhooks(self) -> int:
        return len(self._webhooks)


class MemoryQueue:
    """An in-process queue with a hard bound. `force` lets recovery requeue past the bound.

    With `levels` (a model's priority_levels) it is one deque per level, taken from as
    queue_policy.LevelPicker says: the highest level first, and none starved.
    """

    def __init__(self, maxsize: int, levels: int = 0) -> None:
        self.maxsize = maxsize
        self._levels = [deque[Job]() for _ in range(max(1, levels))]
        self._count = 0
        # Positions without a scan: each job's ticket is (its level, its number in that level's order of
        # arrival), and each level counts the jobs taken off its head. Canceled jobs still in line count
        # until a worker takes and skips them.
        self._tickets: dict[str, tuple[int, int]] = {}
        self._added = [0] * len(self._levels)
        self._head = [0] * len(self._levels)
        self._taken_total = 0
        self._picker = LevelPicker(levels) if levels > 1 else None
        self._waiters: set[asyncio.Future[None]] = set()

    async def depth(self) -> int:
        return self._count

    async def put(self, job: Job, *, force: bool = False) -> None:
        if not force and self._count >= self.maxsize:
            raise QueueFull()
        index = self._index_of(job)
        self._levels[index].append(job)
        self._tickets[job.prediction_id] = (index, self._added[index])
        self._added[index] += 1
        self._count += 1
        for waiter in self._waiters:
            settle(waiter)

    def _index_of(self, job: Job) -> int:
        # 0 (priorities off, or a record from before they were on) and levels since removed: the lowest.
        return job.priority - 1 if 1 <= job.priority <= len(self._levels) else len(self._levels) - 1

    async def positions(self, prediction_ids: Sequence[str]) -> tuple[dict[str, int], int]:
        found = {}
        for pid in prediction_ids:
            ticket = self._tickets.get(pid)
            if ticket is not None:
                index, number = ticket
                # Ahead: the higher levels' jobs (a level is taken from first, starvation aside) and its own.
                found[pid] = sum(len(level) for level in self._levels[:index]) + number - self._head[index]
        return found, self._taken_total

    async def get_batch(self, max_size: int, max_delay: float) -> list[Job]:
        while not self._count:
            await self._wait(None)
        batch = self._take(max_size)
        if len(batch) < max_size and max_delay > 0:
            # A lone request waits at most max_delay for company; under load batches fill at once.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max_delay
            while len(batch) < max_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if not self._count:
                    try:
                        await self._wait(remaining)
                    except asyncio.CancelledError:
                        for job in reversed(batch):  # a stopping worker loses nothing
                            index = self._index_of(job)
                            self._levels[index].appendleft(job)
                            self._head[index] -= 1
                            self._tickets[job.prediction_id] = (index, self._head[index])
                            self._taken_total -= 1
                            self._count += 1
                        raise
                    if not self._count:
                        break
                batch.extend(self._take(max_size - len(batch)))
        return batch

    async def _wait(self, timeout: float | None) -> None:
        """Until a job is put or `timeout` runs out."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await settled_within(waiter, timeout)
        finally:
            self._waiters.discard(waiter)

    async def ack(self, jobs: Sequence[Job]) -> None:
        pass  # taken off the deque when read; a crash loses the deque, and the durable store recovers

    async def close(self) -> None:
        pass

    def _take(self, n: int) -> list[Job]:
        n = min(n, self._count)
        self._count -= n
        self._taken_total += n
        if self._picker is None:
            items = self._levels[0]
            self._head[0] += n
            taken = [items.popleft() for _ in range(n)]
        else:
            levels = self._levels
            taken = []
            for _ in range(n):
                level = self._picker.pick(lambda number: bool(levels[number - 1]))
                assert level is not None  # n is at most what waits
                taken.append(levels[level - 1].popleft())
                self._head[level - 1] += 1
        for job in taken:
            self._tickets.pop(job.prediction_id, None)
        return taken


MAX_TAILS = 10_000  # streams whose uncommitted chunks a bus remembers (each is at most a commit's worth)


class _Tail:
    """The chunks of one stream seen since the commit before the last one: a store read is at least that
    fresh in practice, so the tail joins it without a gap (a Watch mends one that is left)."""

    __slots__ = ("chunks", "start", "trim_to")

    def __init__(self, start: int, chunk: Any) -> None:
        self.start = start
        self.chunks = [chunk]
        self.trim_to = 0  # the previous commit's count: the next commit trims up to it

    def add(self, index: int, chunk: Any) -> None:
        end = self.start + len(self.chunks)
        if index == end:
            self.chunks.append(chunk)
        elif index > end:  # missed some (a reconnect): start again from here
            self.start, self.chunks = index, [chunk]
        # index < end: seen already (a rerun after a crash yields them again)

    def committed(self, count: int) -> None:
        drop = min(self.trim_to - self.start, len(self.chunks))
        if drop > 0:
            del self.chunks[:drop]
            self.start += drop
        self.trim_to = max(self.trim_to, count)


class LocalEventBus:
    """Delivers to listeners in this process, synchronously, in publish order."""

    def __init__(self) -> None:
        self._listeners: dict[str, set[Listener]] = {}
        self._stream_listeners: dict[str, set[StreamListener]] = {}
        self._tails: OrderedDict[str, _Tail] = OrderedDict()

    def listener_count(self) -> int:
        return sum(len(s) for s in self._listeners.values()) + sum(len(s) for s in self._stream_listeners.values())

    def watched_ids(self) -> list[str]:
        return list(self._listeners)

    async def publish(self, predictions: list[Prediction]) -> None:
        self.dispatch(predictions)

    def dispatch(self, predictions: list[Prediction]) -> None:
        for prediction in predictions:
            if prediction.stream:
                # A stream's status changes only where a run begins or ends, before its first chunk or
                # after its last. Terminal: its record has every chunk now. Queued again, or running again
                # (a worker lost, its job taken over): the lost run's chunks not committed are not this
                # run's, which yields them afresh; joined onto a record they would show what may change.
                self._tails.pop(prediction.prediction_id, None)
            for listener in tuple(self._listeners.get(prediction.prediction_id, ())):
                listener(prediction)

    async def publish_stream(self, events: list[StreamEvent]) -> None:
        self.dispatch_stream(events)

    def dispatch_stream(self, events: list[StreamEvent]) -> None:
        tails = self._tails
        for event in events:
            pid = event.prediction_id
            if event.kind == OUTPUT:
                tail = tails.get(pid)
                if tail is None:
                    tails[pid] = _Tail(event.index, event.chunk)
                    if len(tails) > MAX_TAILS:
                        tails.popitem(last=False)  # a stream whose end this process never heard of
                else:
                    tail.add(event.index, event.chunk)
            elif event.kind == COMMITTED and (tail := tails.get(pid)) is not None:
                tail.committed(event.index)
            for listener in tuple(self._stream_listeners.get(pid, ())):
                listener(event)

    def subscribe_stream(self, prediction_id: str, listener: StreamListener) -> None:
        self._stream_listeners.setdefault(prediction_id, set()).add(listener)

    def unsubscribe_stream(self, prediction_id: str, listener: StreamListener) -> None:
        listeners = self._stream_listeners.get(prediction_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._stream_listeners[prediction_id]

    def uncommitted(self, prediction_id: str) -> tuple[int, list[Any]]:
        tail = self._tails.get(prediction_id)
        return (tail.start, list(tail.chunks)) if tail is not None else (0, [])

    def subscribe(self, prediction_id: str, listener: Listener) -> None:
        self._listeners.setdefault(prediction_id, set()).add(listener)

    def unsubscribe(self, prediction_id: str, listener: Listener) -> None:
        listeners = self._listeners.get(prediction_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[prediction_id]
