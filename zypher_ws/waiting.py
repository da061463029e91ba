"""Waiting on the event loop with a bare future and a timer: cheaper than asyncio.wait/wait_for, which
build a task or a set of callbacks per call, on paths taken once per request or per batch."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from functools import partial


def settle(future: asyncio.Future[None]) -> None:
    """Wake whoever awaits `future`; a second call (or the timer after it) changes nothing."""
    if not future.done():
        future.set_result(None)


async def settled_within(future: asyncio.Future[None], timeout: float | None) -> None:
    """Until `future` is settled, or `timeout` seconds (None: no limit) run out first."""
    if timeout is None:
        await future
        return
    timer = asyncio.get_running_loop().call_later(timeout, settle, future)
    try:
        await future
    finally:
        timer.cancel()


TICK = 0.05  # seconds: how late a coarse deadline may be
COARSE_FROM = 1.0  # seconds: shorter waits get a timer of their own, exact


class Deadlines:
    """Waits of one event loop whose deadlines are seconds away (a sync request's --sync-timeout), each
    settled at its deadline rounded up to the next TICK, by one timer per tick that has any.

    A timer per wait is a TimerHandle pushed onto the loop's heap and cancelled when the wait ends early,
    as nearly all do; each push and pop compares TimerHandles in Python, and the cancelled ones stay in
    the heap until they surface. Here a wait costs a set insertion and removal, and the loop's heap holds
    one timer per tick with waits due (a --sync-timeout of 30 s: 600 at most), however many there are."""

    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        self._due: dict[int, set[asyncio.Future[None]]] = {}  # by tick number: the futures due then

    def arm(self, future: asyncio.Future[None], timeout: float) -> Callable[[], None]:
        """Settle `future` once `timeout` seconds have passed (late by less than a tick for a timeout of
        COARSE_FROM or more, never early); returns what disarms it, to call once the wait ends."""
        loop = asyncio.get_running_loop()
        if timeout < COARSE_FROM:
            return loop.call_later(timeout, settle, future).cancel
        slot = math.ceil((loop.time() + timeout) / self.tick)  # rounded up: never early
        due = self._due.get(slot)
        if due is None:
            due = self._due[slot] = set()
            loop.call_at(slot * self.tick, self._expire, slot)
        due.add(future)
        return partial(due.discard, future)

    def _expire(self, slot: int) -> None:
        for future in self._due.pop(slot, ()):
            settle(future)
