"""Not a test module: imported into a process (or patched in by a test) to make every cancel of a Redis
command in flight go missing, the worst case of what redis-py can do (redis/redis-py#2028, #2551: a
cancel that lands while a command finishes, or while its read timeout fires, is swallowed, and the
command returns as if it had never come; 4.5.4 shielded every command, so no cancel reached one at all).

The command runs to its end and returns its real answer; the caller's task carries on. Code that stops
only by being cancelled never stops under it, so it shows what ends a loop by a flag instead.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio.client

Command = Callable[..., Coroutine[Any, Any, Any]]

lost = 0  # cancels lost so far in this process


def losing_cancels(command: Command) -> Command:
    @functools.wraps(command)
    async def run(*args: Any, **kwargs: Any) -> Any:
        task = asyncio.ensure_future(command(*args, **kwargs))
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():  # the command itself was cancelled from inside redis-py: pass it on
                    raise
                global lost
                lost += 1  # the cancel is lost: wait on for the answer

    return run


ORIGINALS: list[tuple[type, str, Command]] = [
    (redis.asyncio.client.Redis, "execute_command", redis.asyncio.client.Redis.execute_command),
    (redis.asyncio.client.PubSub, "parse_response", redis.asyncio.client.PubSub.parse_response),
]


def install() -> None:
    for owner, name, original in ORIGINALS:
        setattr(owner, name, losing_cancels(original))


def uninstall() -> None:
    for owner, name, original in ORIGINALS:
        setattr(owner, name, original)
