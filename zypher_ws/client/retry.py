"""How long to wait before trying again: `Retry-After` when the server says, else exponential backoff."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class RetryPolicy:
    """What the client retries by itself, and for how long.

    A `503` or `429` answer, and a connection that fails or drops, are tried again for at most `total`
    seconds from the first attempt (0: never), waiting `Retry-After` when the server sends it and
    otherwise `initial`, doubling up to `maximum`, each with up to half of it taken off at random so that
    many clients do not come back at once. The same schedule paces WebSocket reconnects (an outage may
    last `total` seconds before watchers fail) and polling where WebSocket is unavailable.
    """

    total: float = 30.0
    initial: float = 0.1
    maximum: float = 5.0

    def __post_init__(self) -> None:
        if self.total < 0 or self.initial <= 0 or self.maximum < self.initial:
            raise ValueError("RetryPolicy needs total >= 0 and 0 < initial <= maximum")

    def backoff(self, clock: Clock) -> Backoff:
        return Backoff(self, clock)


class Backoff:
    """One run of attempts: the delay before each next one, until the policy's total runs out."""

    def __init__(self, policy: RetryPolicy, clock: Clock) -> None:
        self.policy = policy
        self._clock = clock
        self._started = clock()
        self._next = policy.initial

    def reset(self) -> None:
        """Progress was made: the next delay starts small again, and the total counts from now."""
        self._started = self._clock()
        self._next = self.policy.initial

    def delay(self, retry_after: float | None = None) -> float | None:
        """Seconds to wait before the next attempt, or None when that would end past the total."""
        if retry_after is not None:
            delay = max(0.0, retry_after)
        else:
            delay = self._next * (1 - random.random() / 2)
            self._next = min(self.policy.maximum, self._next * 2)
        if self._clock() + delay - self._started > self.policy.total:
            return None
        return delay

    def poll_delay(self) -> float:
        """The next pause between polls: the same doubling, never giving up (the caller has a deadline)."""
        delay = self._next * (1 - random.random() / 2)
        self._next = min(self.policy.maximum, self._next * 2)
        return delay


def parse_retry_after(value: str | None, now: Callable[[], datetime] | None = None) -> float | None:
    """`Retry-After` in seconds (RFC 9110: a number of seconds, or an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = now() if now is not None else datetime.now(timezone.utc)
    return max(0.0, (when - current).total_seconds())
