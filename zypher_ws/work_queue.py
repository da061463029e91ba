"""The bounded queue between request handlers and model workers, with dynamic batching on the way out."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from .errors import QueueFull
from .records import Job
from .waiting import settle, settled_within


class WorkQueue(Protocol):
    maxsize: int

    async def depth(self) -> int:
        """How many jobs wait to be taken (not counting ones being run)."""
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


class MemoryQueue:
    """An in-process deque with a hard bound. `force` lets recovery requeue past the bound."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Job] = deque()
        self._waiters: set[asyncio.Future[None]] = set()

    async def depth(self) -> int:
        return len(self._items)

    async def put(self, job: Job, *, force: bool = False) -> None:
        if not force and len(self._items) >= self.maxsize:
            raise QueueFull()
        self._items.append(job)
        for waiter in self._waiters:
            settle(waiter)

    async def get_batch(self, max_size: int, max_delay: float) -> list[Job]:
        while not self._items:
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
                if not self._items:
                    try:
                        await self._wait(remaining)
                    except asyncio.CancelledError:
                        self._items.extendleft(reversed(batch))  # a stopping worker loses nothing
                        raise
                    if not self._items:
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
        items = self._items
        return [items.popleft() for _ in range(min(n, len(items)))]
