"""Waiting on the event loop with a bare future and a timer: cheaper than asyncio.wait/wait_for, which
build a task or a set of callbacks per call, on paths taken once per request or per batch."""

from __future__ import annotations

import asyncio


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
