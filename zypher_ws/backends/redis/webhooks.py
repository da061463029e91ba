"""Pending webhook deliveries in Redis: a stream of the ones due now, read through one consumer group so
that each attempt is made by exactly one process, and a sorted set of the ones waiting for a retry.

A state change that sends an event adds its delivery to the stream in the MULTI that writes the record
(store.py). A process takes due entries with XREADGROUP and, after the attempt, acknowledges and deletes
the entry and (for a retry) adds the delivery to the sorted set, in one MULTI with the record's webhook
state. Retries that come due move back to the stream in one script, so only one process moves each. The
entries of a process that died mid-attempt are taken over after the claim time (XAUTOCLAIM) and sent
again, under the same webhook-id.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from ...records import Prediction
from ...webhooks.schedule import Delivery, Settlement, scheduled_by
from .keys import RedisKeys

BUSY_HOST_DELAY = 1.0  # seconds a delivery due to a host with enough in flight waits before it is due again

_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'd', member)
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


class RedisWebhooks:
    def __init__(self, client: aioredis.Redis, keys: RedisKeys, *, consumer: str, claim_idle: float) -> None:
        self._redis = client
        self._keys = keys
        self.consumer = consumer
        self.claim_idle = claim_idle
        self._promote = client.register_script(_PROMOTE)
        self._group_ready = False
        self._claimed_at = 0.0  # monotonic time of the last look for entries a dead process held
        self._claim_cursor = "0-0"
        self._held: set[str] = set()  # entry ids this process is attempting

    def schedule(self, pipe: Any, written: Sequence[tuple[Prediction | None, Prediction]]) -> bool:
        """Add the deliveries these writes (each the record before and after) cause to a MULTI; whether
        there were any. A stream rewrites its record at every commit of its chunks: an XADD each time
        its event is still pending would deliver it again and again (XADD keeps no id to dedupe on)."""
        scheduled = [d for b, p in written if p.webhook is not None and (d := scheduled_by(p, b)) is not None]
        for delivery in scheduled:
            pipe.xadd(self._keys.webhooks, {"d": delivery.to_json()})
        return bool(scheduled)

    def settle(self, pipe: Any, settlement: Settlement) -> None:
        """Add an attempt's outcome to a MULTI: the entry done with, and the retry (if any) waiting."""
        receipt = settlement.delivery.receipt
        if receipt is not None:
            pipe.xack(self._keys.webhooks, self._keys.webhook_group, receipt)
            pipe.xdel(self._keys.webhooks, receipt)
        if settlement.retry is not None:
            pipe.zadd(self._keys.webhooks_later, {settlement.retry.to_json(): settlement.retry.due_at})

    def settled(self, settlement: Settlement) -> None:
        self._held.discard(settlement.delivery.receipt or "")

    async def due(self, now: float, limit: int, per_host: int | None, in_flight: Mapping[str, int]) -> list[Delivery]:
        await self._ensure_group()
        await self._promote(keys=[self._keys.webhooks_later, self._keys.webhooks], args=[now, limit])
        try:
            entries = await self._take(limit)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False  # Redis lost the group (restarted without persistence): made again next time
            return []
        taken: list[Delivery] = []
        postponed: list[Delivery] = []  # to a host with its share in flight: due again in a moment
        hosts = Counter(in_flight)
        for entry_id, fields in entries:
            delivery = Delivery.from_json(fields["d"], receipt=entry_id)
            if per_host is not None and hosts[delivery.host] >= per_host:
                postponed.append(delivery)
            else:
                hosts[delivery.host] += 1
                taken.append(delivery)
        if postponed:
            async with self._redis.pipeline(transaction=True) as pipe:
                for delivery in postponed:
                    receipt = delivery.receipt or ""
                    pipe.xack(self._keys.webhooks, self._keys.webhook_group, receipt)
                    pipe.xdel(self._keys.webhooks, receipt)
                    pipe.zadd(self._keys.webhooks_later, {_again(delivery, now): now + BUSY_HOST_DELAY})
                await pipe.execute()
        self._held.update(d.receipt for d in taken if d.receipt)
        return taken

    async def _take(self, limit: int) -> list[tuple[str, dict[str, str]]]:
        """Entries a dead process held (looked for now and then), then new ones, up to `limit`."""
        entries: list[tuple[str, dict[str, str]]] = []
        if time.monotonic() - self._claimed_at >= self.claim_idle / 4:
            self._claimed_at = time.monotonic()
            cursor, claimed, _ = await self._redis.xautoclaim(
                self._keys.webhooks, self._keys.webhook_group, self.consumer,
                min_idle_time=int(self.claim_idle * 1000), start_id=self._claim_cursor, count=limit,
            )  # fmt: skip
            self._claim_cursor = str(cursor)
            entries += [(entry_id, fields) for entry_id, fields in claimed if entry_id not in self._held]
        if len(entries) < limit:
            reply: Any = await self._redis.xreadgroup(
                self._keys.webhook_group, self.consumer, {self._keys.webhooks: ">"}, count=limit - len(entries)
            )
            entries += [entry for _, stream_entries in reply or () for entry in stream_entries]
        return entries

    async def pending(self) -> int:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self._keys.webhooks)
            pipe.zcard(self._keys.webhooks_later)
            ready, later = await pipe.execute()
        return int(ready) + int(later)

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self._keys.webhooks, self._keys.webhook_group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True


def _again(delivery: Delivery, now: float) -> str:
    """The delivery as the sorted set holds it, due again (its attempts unchanged: none was made)."""
    return Delivery(
        delivery.webhook_id, delivery.prediction_id, delivery.event, delivery.url, delivery.body,
        delivery.event_at, now + BUSY_HOST_DELAY, delivery.attempts,
    ).to_json()  # fmt: skip
