"""Where records, the queue and status events live, chosen by the URL's scheme from one registry.

`memory://` and `sqlite:///path` are embedded (this process holds the queue and the bus);
`redis://` is shared by many API and worker processes. A new backend is one module and one line here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import Checks, DefersWrites, EventBus, KeepsWebhooks, Recovers, Store, Sweeps, WorkQueue

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..settings import Settings

__all__ = [
    "Backend",
    "Checks",
    "DefersWrites",
    "EventBus",
    "KeepsWebhooks",
    "Kind",
    "QueueOpener",
    "Recovers",
    "Store",
    "Sweeps",
    "WorkQueue",
    "is_shared",
    "open_backend",
]


QueueOpener = Callable[[str, str, int, int], Awaitable[WorkQueue]]
"""(model name, model version, maxsize, priority levels) -> that model version's own work queue (one
level per priority; 0: priorities off), closed with the backend."""


@dataclass(frozen=True)
class Backend:
    store: Store
    bus: EventBus
    open_queue: QueueOpener
    """Each model version has a queue of its own, so a slow model cannot fill a fast one's."""
    catalog: Catalog | None = None
    """Where workers announce the model versions they serve (a shared backend; catalog.py)."""


Opener = Callable[["Settings", str, bool, int], AbstractAsyncContextManager[Backend]]


@dataclass(frozen=True)
class Kind:
    open: Opener  # (settings, url, listen, readers) -> the backend, open for as long as the context lasts
    shared: bool  # many processes use it at once, so workers may run elsewhere (--workers 0)


@asynccontextmanager
async def _embedded(settings: Settings, url: str, listen: bool, readers: int) -> AsyncIterator[Backend]:
    from .memory import LocalEventBus, MemoryQueue, MemoryStore

    store: Store
    if url.startswith("sqlite:"):
        from .sqlite import SQLiteStore, path_from_url

        sqlite = SQLiteStore(path_from_url(url), ttl=settings.result_ttl, synchronous=settings.sqlite_synchronous)
        await sqlite.open()
        store = sqlite
    else:
        store = MemoryStore(ttl=settings.result_ttl, max_finished=settings.memory_max_results)
    queues: list[MemoryQueue] = []

    async def open_queue(name: str, version: str, maxsize: int, levels: int = 0) -> WorkQueue:
        queues.append(MemoryQueue(maxsize, levels))
        return queues[-1]

    try:
        yield Backend(store, LocalEventBus(), open_queue)
    finally:
        for queue in queues:
            await queue.close()
        await store.close()


def _redis(settings: Settings, url: str, listen: bool, readers: int) -> AbstractAsyncContextManager[Backend]:
    from .redis import open_redis  # redis-py is loaded only by those who use it

    return open_redis(settings, url, listen=listen, readers=readers)


SCHEMES: dict[str, Kind] = {
    "memory": Kind(_embedded, shared=False),
    "sqlite": Kind(_embedded, shared=False),
    "redis": Kind(_redis, shared=True),
    "rediss": Kind(_redis, shared=True),
    "unix": Kind(_redis, shared=True),  # redis-py's unix:///path/redis.sock
}


def kind_of(url: str) -> Kind:
    scheme, sep, _ = url.partition("://")
    kind = SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        raise ValueError(f"no backend for {url!r}: use one of {', '.join(s + '://' for s in SCHEMES)}")
    return kind


def is_shared(url: str) -> bool:
    """Whether the backend at `url` is shared by many processes (so a process may run no workers)."""
    return kind_of(url).shared


def open_backend(
    settings: Settings, *, listen: bool = True, readers: int | None = None
) -> AbstractAsyncContextManager[Backend]:
    """Open the configured backend; `listen=False` skips receiving events (a worker-only process).

    `readers` is how many workers will wait on queues at once (default --workers), so a backend that
    blocks a connection per waiting worker (Redis) can size its pool."""
    url = settings.backend_url
    return kind_of(url).open(settings, url, listen, settings.workers if readers is None else readers)
