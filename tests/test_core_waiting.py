"""Coarse deadlines (waiting.Deadlines): the sync waits' shared timers are never early, each wait is
settled by its tick, and a wait that ended is left alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fakes import WAIT
from zypher_ws.waiting import COARSE_FROM, Deadlines


def recorded(monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop, method: str) -> list[float]:
    """The first argument (a time or a delay) of every call of the loop's timer `method`, which still runs."""
    calls: list[float] = []
    original = getattr(loop, method)

    def counted(at: float, *args: Any, **named: Any) -> asyncio.TimerHandle:
        calls.append(at)
        handle: asyncio.TimerHandle = original(at, *args, **named)
        return handle

    monkeypatch.setattr(loop, method, counted)
    return calls


async def test_waits_due_in_one_tick_share_its_timer_and_none_ends_early(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    timers = recorded(monkeypatch, loop, "call_at")
    deadlines = Deadlines(tick=0.5)  # wide: every wait armed below falls in one tick, or two at a boundary
    armed_at = loop.time()
    waits = [loop.create_future() for _ in range(100)]
    for wait in waits:
        deadlines.arm(wait, COARSE_FROM)
    assert 1 <= len(timers) <= 2 and all(when >= armed_at + COARSE_FROM for when in timers)
    await asyncio.wait_for(asyncio.gather(*waits), WAIT)
    assert loop.time() >= armed_at + COARSE_FROM  # never early


async def test_a_disarmed_wait_is_not_settled_by_its_tick() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(tick=1.0)  # one tick for both: the timer that settles one would settle the other
    left, kept = loop.create_future(), loop.create_future()
    disarm = deadlines.arm(left, COARSE_FROM)
    deadlines.arm(kept, COARSE_FROM)
    disarm()
    await asyncio.wait_for(kept, WAIT)
    assert not left.done()


async def test_a_short_wait_keeps_an_exact_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    exact = recorded(monkeypatch, loop, "call_later")
    wait = loop.create_future()
    disarm = Deadlines().arm(wait, COARSE_FROM / 10)
    assert exact == [COARSE_FROM / 10]
    await asyncio.wait_for(wait, WAIT)
    disarm()  # after the timer: changes nothing
