"""`redis://`: records, the work stream and status events in a Redis server shared by many processes."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ...errors import BackendUnavailable
from .. import Backend
from ..base import WorkQueue
from .catalog import RedisCatalog
from .events import RedisEventBus
from .keys import RedisKeys
from .queue import RedisQueue, move_legacy_entries
from .store import RedisStore

if TYPE_CHECKING:
    from ...settings import Settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_redis(settings: Settings, url: str, *, listen: bool, readers: int) -> AsyncIterator[Backend]:
    keys = RedisKeys(settings.redis_prefix)
    # A bounded pool: past it a command waits (up to 5 s) for a free connection instead of opening more.
    # The socket timeout sits well above the longest blocking read (1 s), so a hung server is noticed.
    # Commands retry twice on a broken connection: after Redis restarts, pooled connections are stale.
    # A retried XADD can add an entry twice; a worker skips the second, as its record is no longer queued.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        max_connections=settings.redis_connections + readers + 1,  # + blocking reads, + pub/sub
        timeout=5.0,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
    )
    client = aioredis.Redis.from_pool(pool)
    consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    # A webhook entry is held for one attempt (at most --webhook-timeout): past that and a margin its
    # process is taken to be dead, and another sends it again.
    webhook_claim_idle = max(settings.claim_idle, settings.webhook_timeout + 5.0)
    store = RedisStore(client, keys, ttl=settings.result_ttl, consumer=consumer, webhook_claim_idle=webhook_claim_idle)
    bus = RedisEventBus(client, keys, store.get_many)
    queues: list[RedisQueue] = []

    async def open_queue(name: str, version: str, maxsize: int, levels: int = 0) -> WorkQueue:
        queue = RedisQueue(
            client,
            keys,
            stream=keys.queue(name, version),
            store=store,
            bus=bus,
            maxsize=maxsize,
            consumer=consumer,
            claim_idle=settings.claim_idle,
            max_attempts=settings.max_attempts,
            levels=levels,
        )
        queues.append(queue)
        try:
            await queue.ensure_group()
        except BackendUnavailable as exc:
            # Start anyway: /readyz says not ready, and everything recovers once Redis answers.
            log.warning("%s; starting anyway", exc)
        return queue

    try:
        await move_legacy_entries(client, keys)
    except BackendUnavailable as exc:
        log.warning("%s; predictions of the single stream of earlier versions are moved at the next start", exc)
    listener = asyncio.create_task(bus.listen(), name="zypher-redis-events") if listen else None
    try:
        yield Backend(store, bus, open_queue, RedisCatalog(client, keys, consumer=consumer))
    finally:
        if listener is not None:
            bus.stop()  # a cancel alone can be lost in redis-py (events.py)
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        for queue in queues:
            await queue.close()
        await client.aclose()
