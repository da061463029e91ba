"""Where queued predictions stand in line, told to their watchers: at most once a second each, and only
when it changed.

Each tick asks each model's queue for the positions of the predictions watched here, and nothing else:
its cost grows with the predictions watched in this process, not with the queue's length (a queue that
tells positions answers in O(1) per id: backends/base.py's TellsPositions). The estimated start comes
from the queue's recent throughput: how many jobs it handed out over the last half minute or so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .backends.base import TellsPositions, WorkQueue

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between ticks: the most often one prediction's watchers hear its position
WINDOW = 30.0  # seconds of history the throughput is measured over

Tell = Callable[[int, float | None], bool]
"""Called with (position, estimated start as epoch seconds or None); returns False to be dropped."""


@dataclass
class _Line:
    """One queue's watched predictions and its throughput history."""

    queue: WorkQueue
    watchers: dict[str, dict[Tell, int | None]] = field(default_factory=dict)  # id -> tell -> last told
    history: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, jobs taken so far)

    def rate(self) -> float:
        """Jobs taken per second over the history; 0.0 before there are two points."""
        if len(self.history) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.history[0], self.history[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class QueuePositions:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._lines: dict[int, _Line] = {}  # by id() of the queue: queues are not hashable by value

    def tells(self, queue: WorkQueue) -> bool:
        return isinstance(queue, TellsPositions)

    async def position(self, queue: WorkQueue, prediction_id: str) -> tuple[int, float | None] | None:
        """(position, estimated start) of one prediction waiting in `queue`, or None if it is not waiting
        there (or the queue cannot tell)."""
        if not isinstance(queue, TellsPositions):
            return None
        positions, _ = await queue.positions([prediction_id])
        found = positions.get(prediction_id)
        if found is None:
            return None
        line = self._lines.get(id(queue))
        return found, self._estimate(found, line.rate() if line is not None else 0.0)

    def watch(self, queue: WorkQueue, prediction_id: str, tell: Tell, told: int | None = None) -> None:
        """Tell `tell` the prediction's position on each tick where it changed (`told`: what it knows)."""
        line = self._lines.get(id(queue))
        if line is None:
            line = self._lines[id(queue)] = _Line(queue)
        line.watchers.setdefault(prediction_id, {})[tell] = told

    def unwatch(self, queue: WorkQueue, prediction_id: str, tell: Tell) -> None:
        line = self._lines.get(id(queue))
        if line is not None:
            watchers = line.watchers.get(prediction_id)
            if watchers is not None:
                watchers.pop(tell, None)
                if not watchers:
                    del line.watchers[prediction_id]

    def watched(self) -> int:
        return sum(len(w) for line in self._lines.values() for w in line.watchers.values())

    async def tick(self) -> None:
        """One round: each watched prediction's position, to its watchers whose last one differs."""
        now = self._clock()
        for line in list(self._lines.values()):
            queue = line.queue
            assert isinstance(queue, TellsPositions)
            ids = list(line.watchers)
            positions, taken = await queue.positions(ids)
            line.history.append((now, taken))
            while len(line.history) > 2 and now - line.history[1][0] >= WINDOW:
                del line.history[0]
            rate = line.rate()
            for pid in ids:
                watchers = line.watchers.get(pid)
                if watchers is None:
                    continue
                position = positions.get(pid)
                if position is None:
                    # Started (its watchers hear that as an update) or gone: who was told a place goes. One
                    # never told stays (it may not be in the queue yet) until its watch stops and unwatches.
                    for tell in [t for t, last in watchers.items() if last is not None]:
                        del watchers[tell]
                    if not watchers:
                        del line.watchers[pid]
                    continue
                estimate = self._estimate(position, rate)
                for tell, last in list(watchers.items()):
                    if last == position or tell not in watchers:
                        continue  # told already, or unwatched meanwhile (a socket dropped by a send)
                    if not tell(position, estimate):
                        watchers.pop(tell, None)
                    elif tell in watchers:  # not unwatched by its own send
                        watchers[tell] = position
                if not watchers and line.watchers.get(pid) is watchers:
                    del line.watchers[pid]

    def _estimate(self, position: int, rate: float) -> float | None:
        return self._wall() + (position + 1) / rate if rate > 0 else None

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                await self.tick()
            except Exception as exc:  # a queue away for a moment (Redis): the next tick tries again
                log.info("could not read queue positions: %s", exc)
