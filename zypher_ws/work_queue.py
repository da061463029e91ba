"""The bounded queue between request handlers and model workers, with dynamic batching on the way out."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from .errors import QueueFull
from .records import Job


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
        self._nonempty = asyncio.Event()

    async def depth(self) -> int:
        return len(self._items)

    async def put(self, job: Job, *, force: bool = False) -> None:
        if not force and len(self._items) >= self.maxsize:
            raise QueueFull()
        self._items.append(job)
        self._nonempty.set()

    async def get_batch(self, max_size: int, max_delay: float) -> list[Job]:
        while not self._items:
            self._nonempty.clear()
            await self._nonempty.wait()
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
                    self._nonempty.clear()
                    try:
                        await asyncio.wait_for(self._nonempty.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
                    except asyncio.CancelledError:
                        self._items.extendleft(reversed(batch))  # a stopping worker loses nothing
                        raise
                batch.extend(self._take(max_size - len(batch)))
        return batch

    async def ack(self, jobs: Sequence[Job]) -> None:
        pass  # taken off the deque when read; a crash loses the deque, and the durable store recovers

    async def close(self) -> None:
        pass

    def _take(self, n: int) -> list[Job]:
        items = self._items
        return [items.popleft() for _ in range(min(n, len(items)))]
