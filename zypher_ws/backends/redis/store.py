"""Prediction records in Redis, shared by every API and worker process.

Each record is one JSON string. State changes read, apply the rules of `lifecycle` and write
back inside WATCH/MULTI, so a cancel on one process and a start on another cannot both win.
Finished records carry a TTL and Redis deletes them itself, so there is nothing to sweep.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from ... import lifecycle
from ...errors import BackendUnavailable
from ...json_codec import dumps_str
from ...records import IdempotencyKey, Outcome, Prediction, Status
from ...webhooks.schedule import Delivery, Settlement
from .keys import RedisKeys
from .webhooks import RedisWebhooks

P = ParamSpec("P")
T = TypeVar("T")
Rule = Callable[[Prediction | None, str], Prediction | None]

# Sets the idempotency key and the record together, or returns what the key already points to.
_ADD_WITH_KEY = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[2])
  return false
end
local stored = redis.call('GET', KEYS[1])
return {stored, redis.call('GET', ARGV[4] .. cjson.decode(stored)[1])}
"""

UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def translate_errors(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Redis being down is a 503 `backend_unavailable` to clients, not a 500."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except UNAVAILABLE as exc:
            raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc

    return wrapper


def dump(prediction: Prediction) -> str:
    return dumps_str(prediction.to_row())


def load(raw: str | bytes) -> Prediction:
    return Prediction.from_row(json.loads(raw))


class RedisStore:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: RedisKeys,
        *,
        ttl: float = 86400.0,
        consumer: str = "zypher",
        webhook_claim_idle: float = 60.0,
    ) -> None:
        self.ttl = ttl
        self._redis = client
        self._keys = keys
        self._add_with_key = client.register_script(_ADD_WITH_KEY)
        self._webhooks = RedisWebhooks(client, keys, consumer=consumer, claim_idle=webhook_claim_idle)
        self._on_scheduled: Callable[[], None] | None = None

    @translate_errors
    async def add(self, prediction: Prediction, idempotency: IdempotencyKey | None = None) -> Prediction:
        record_key = self._keys.record(prediction.prediction_id)
        if idempotency is None:
            await self._redis.set(record_key, dump(prediction))
            return prediction
        claim = json.dumps([prediction.prediction_id, idempotency.fingerprint])
        found = await self._add_with_key(
            keys=[self._keys.idempotency(idempotency.key), record_key],
            args=[claim, dump(prediction), int(self.ttl * 1000), self._keys.record("")],
        )
        if found is None:
            return prediction
        stored_claim, raw = found
        existing = load(raw) if raw else None
        stored = IdempotencyKey(idempotency.key, json.loads(stored_claim)[1])
        lifecycle.check_idempotency(existing, stored, idempotency)
        if existing is not None:
            return existing
        # The key outlived its prediction (taken back after a full queue, or expired): claim it afresh.
        await self._redis.set(self._keys.idempotency(idempotency.key), claim, px=int(self.ttl * 1000))
        await self._redis.set(record_key, dump(prediction))
        return prediction

    @translate_errors
    async def get(self, prediction_id: str) -> Prediction | None:
        raw = await self._redis.get(self._keys.record(prediction_id))
        return load(raw) if raw else None

    @translate_errors
    async def get_many(self, prediction_ids: Sequence[str]) -> list[Prediction]:
        if not prediction_ids:
            return []
        raws = await self._redis.mget([self._keys.record(pid) for pid in prediction_ids])
        return [load(raw) for raw in raws if raw]

    @translate_errors
    async def delete(self, prediction_id: str) -> None:
        await self._redis.delete(self._keys.record(prediction_id))

    async def start(self, prediction_ids: Sequence[str], *, now: float | None = None) -> list[Prediction]:
        n = len(prediction_ids)
        return _changed(
            await self._transact(prediction_ids, lambda current, _: lifecycle.start(current, n, now, self.ttl))
        )

    async def fail_queued(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        by_id = {o.prediction_id: o for o in outcomes}
        return _changed(
            await self._transact(list(by_id), lambda current, pid: lifecycle.fail_queued(current, by_id[pid], self.ttl))
        )

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        by_id = {o.prediction_id: o for o in outcomes}
        return _changed(
            await self._transact(list(by_id), lambda current, pid: lifecycle.finish(current, by_id[pid], self.ttl))
        )

    async def cancel(self, prediction_id: str) -> Prediction:
        changes = await self._transact([prediction_id], lambda current, pid: lifecycle.cancel(current, pid, self.ttl))
        after = changes[0][1]
        assert after is not None  # the rule raises rather than return nothing
        return after

    async def commit_stream(
        self, prediction_id: str, start: int, chunks: list[Any], progress: dict[str, Any] | None
    ) -> Prediction | None:
        changes = await self._transact(
            [prediction_id], lambda current, _: lifecycle.append_chunks(current, start, chunks, progress)
        )
        return changes[0][1]

    async def reclaim(
        self, prediction_ids: Sequence[str], max_attempts: int
    ) -> tuple[list[Prediction], list[Prediction]]:
        """For entries taken over from a lost worker: (ones to run again, ones now failed as worker_lost).

        Ones already finished, or gone, are in neither list: their entries only need acknowledging.
        """

        def rule(current: Prediction | None, _: str) -> Prediction | None:
            if current is None or current.status.terminal:
                return None
            return lifecycle.recover(current, max_attempts, self.ttl)

        changed = _changed(await self._transact(prediction_ids, rule))
        return [p for p in changed if p.status is Status.QUEUED], [p for p in changed if p.status.terminal]

    @translate_errors
    async def check(self) -> None:
        await self._redis.ping()

    # -- webhooks (KeepsWebhooks; the stream and its retries are in webhooks.py) --------------------------

    def on_webhooks_scheduled(self, callback: Callable[[], None]) -> None:
        self._on_scheduled = callback

    @translate_errors
    async def due_webhooks(
        self, now: float, limit: int, *, per_host: int | None = None, in_flight: Mapping[str, int] | None = None
    ) -> list[Delivery]:
        return await self._webhooks.due(now, limit, per_host, in_flight or {})

    async def settle_webhook(self, settlement: Settlement) -> None:
        def rule(current: Prediction | None, _: str) -> Prediction | None:
            if current is None or current.webhook is None or not settlement.applies_to(current):
                return None  # gone (expired), or showing a later event
            return current.with_webhook(settlement.apply(current.webhook))

        await self._transact(
            [settlement.delivery.prediction_id], rule, also=lambda pipe: self._webhooks.settle(pipe, settlement)
        )
        self._webhooks.settled(settlement)

    @translate_errors
    async def pending_webhooks(self) -> int:
        return await self._webhooks.pending()

    async def close(self) -> None:
        pass  # the client belongs to whoever opened the backend

    @translate_errors
    async def _transact(
        self, prediction_ids: Sequence[str], rule: Rule, also: Callable[[Any], None] | None = None
    ) -> list[tuple[Prediction | None, Prediction | None]]:
        """Apply `rule` to each record atomically; returns (before, after) per id, after None if unchanged.

        The webhook deliveries the changes send are added in the same MULTI, and so is whatever `also` adds.
        """
        if not prediction_ids:
            return []  # WATCH takes at least one key
        keys = [self._keys.record(pid) for pid in prediction_ids]
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*keys)
                    raws = await pipe.mget(keys)
                    before = [load(raw) if raw else None for raw in raws]
                    after = [rule(current, pid) for current, pid in zip(before, prediction_ids, strict=True)]
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for key, p in zip(keys, after, strict=True):
                        if p is not None:
                            pipe.set(key, dump(p), pxat=_expiry_ms(p))
                    written = [(b, a) for b, a in zip(before, after, strict=True) if a is not None]
                    scheduled = self._webhooks.schedule(pipe, written)
                    if also is not None:
                        also(pipe)
                    await pipe.execute()
                    if scheduled and self._on_scheduled is not None:
                        self._on_scheduled()
                    return list(zip(before, after, strict=True))
                except redis.exceptions.WatchError:
                    continue  # another process changed one of them meanwhile: read again


def _changed(changes: list[tuple[Prediction | None, Prediction | None]]) -> list[Prediction]:
    return [after for _, after in changes if after is not None]


def _expiry_ms(prediction: Prediction) -> Any:
    return int(prediction.expires_at * 1000) if prediction.expires_at is not None else None
