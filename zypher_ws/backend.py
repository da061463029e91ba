"""Where records, the queue and status events live: this process (embedded) or a Redis server."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .errors import BackendUnavailable
from .events import EventBus, LocalEventBus
from .settings import Settings
from .sqlite_store import SQLiteStore, path_from_url
from .store import MemoryStore, Store
from .work_queue import MemoryQueue, WorkQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    store: Store
    queue: WorkQueue
    bus: EventBus


@asynccontextmanager
async def open_backend(settings: Settings, *, listen: bool = True) -> AsyncIterator[Backend]:
    """Open the configured backend; `listen=False` skips receiving events (a worker-only process)."""
    if settings.backend == "redis":
        async with _redis_backend(settings, listen=listen) as backend:
            yield backend
        return
    store = await open_store(settings)
    queue = MemoryQueue(settings.max_queue)
    try:
        yield Backend(store, queue, LocalEventBus())
    finally:
        await queue.close()
        await store.close()


async def open_store(settings: Settings) -> Store:
    if settings.store == "memory://":
        return MemoryStore(ttl=settings.result_ttl, max_finished=settings.memory_max_results)
    sqlite = SQLiteStore(
        path_from_url(settings.store), ttl=settings.result_ttl, synchronous=settings.sqlite_synchronous
    )
    await sqlite.open()
    return sqlite


@asynccontextmanager
async def _redis_backend(settings: Settings, *, listen: bool) -> AsyncIterator[Backend]:
    # Imported here so the embedded default does not need redis-py loaded.
    import redis.asyncio as aioredis
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    from .redis_events import RedisEventBus
    from .redis_keys import RedisKeys
    from .redis_queue import RedisQueue
    from .redis_store import RedisStore

    keys = RedisKeys(settings.redis_prefix)
    # A bounded pool: past it a command waits (up to 5 s) for a free connection instead of opening more.
    # The socket timeout sits well above the longest blocking read (1 s), so a hung server is noticed.
    # Commands retry twice on a broken connection: after Redis restarts, pooled connections are stale.
    # A retried XADD can add an entry twice; a worker skips the second, as its record is no longer queued.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        max_connections=settings.redis_connections + settings.workers + 1,  # + blocking reads, + pub/sub
        timeout=5.0,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
    )
    client = aioredis.Redis.from_pool(pool)
    store = RedisStore(client, keys, ttl=settings.result_ttl)
    bus = RedisEventBus(client, keys, store.get_many)
    queue = RedisQueue(
        client,
        keys,
        store=store,
        bus=bus,
        maxsize=settings.max_queue,
        consumer=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        claim_idle=settings.claim_idle,
        max_attempts=settings.max_attempts,
    )
    try:
        await queue.ensure_group()
    except BackendUnavailable as exc:
        # Start anyway: /readyz says not ready, and everything recovers once Redis answers.
        log.warning("%s; starting anyway", exc)
    listener = asyncio.create_task(bus.listen(), name="zypher-redis-events") if listen else None
    try:
        yield Backend(store, queue, bus)
    finally:
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        await queue.close()
        await client.aclose()
