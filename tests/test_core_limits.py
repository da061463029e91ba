"""Per-client limits, on a clock the test moves: the token bucket and the socket counter."""

from __future__ import annotations

import pytest

from fakes import ManualClock
from zypher_ws.errors import RateLimited, TooManySockets
from zypher_ws.http import access
from zypher_ws.http.access import RateLimiter, SocketCounter


def take(limiter: RateLimiter, client: str, n: int) -> None:
    for _ in range(n):
        limiter.check(client)


def test_a_burst_passes_then_the_next_is_refused_saying_when_to_retry() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rate=0.25, burst=3, clock=clock)
    take(limiter, "a", 3)
    clock.advance(1.0)  # a quarter of a token back
    with pytest.raises(RateLimited) as refused:
        limiter.check("a")
    assert refused.value.headers["Retry-After"] == "3"  # the other three quarters take 3 s
    assert "more than 0.25 predictions per second from a" in refused.value.message


def test_tokens_come_back_at_the_rate() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rate=0.5, burst=1, clock=clock)
    limiter.check("a")
    clock.advance(1.0)  # half a token
    with pytest.raises(RateLimited) as refused:
        limiter.check("a")
    assert refused.value.headers["Retry-After"] == "1"  # the other half takes another second
    clock.advance(0.5)  # the refused request took nothing: half a token at 1.0 s, a whole one at 2.0 s
    with pytest.raises(RateLimited):
        limiter.check("a")
    clock.advance(0.5)
    limiter.check("a")


def test_a_long_idle_refills_no_more_than_the_burst() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rate=10.0, burst=2, clock=clock)
    take(limiter, "a", 2)
    clock.advance(3600)
    take(limiter, "a", 2)
    with pytest.raises(RateLimited):
        limiter.check("a")


def test_each_client_has_its_own_bucket() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=ManualClock())
    limiter.check("a")
    limiter.check("b")
    with pytest.raises(RateLimited):
        limiter.check("a")


def test_the_default_burst_is_twice_the_rate_and_at_least_one() -> None:
    assert RateLimiter(rate=5.0, burst=0).burst == 10
    assert RateLimiter(rate=0.1, burst=0).burst == 1
    assert RateLimiter(rate=5.0, burst=3).burst == 3


def test_a_rate_of_zero_never_limits() -> None:
    take(RateLimiter(rate=0.0, burst=0, clock=ManualClock()), "a", 10_000)


def test_the_least_recently_seen_clients_are_forgotten_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access, "MAX_TRACKED_CLIENTS", 2)
    limiter = RateLimiter(rate=1.0, burst=1, clock=ManualClock())
    limiter.check("a")
    limiter.check("b")
    with pytest.raises(RateLimited):
        limiter.check("a")  # seen again (refused): now the most recent
    limiter.check("c")  # a third client: b, seen least recently, is forgotten
    limiter.check("b")  # a full bucket again
    with pytest.raises(RateLimited):
        limiter.check("c")


# -- sockets per client ------------------------------------------------------------------------------


def test_sockets_are_counted_per_client_up_to_the_limit() -> None:
    counter = SocketCounter(limit=2)
    counter.acquire("a")
    counter.acquire("a")
    counter.acquire("b")
    with pytest.raises(TooManySockets, match="a already has 2"):
        counter.acquire("a")
    counter.release("a")
    counter.acquire("a")  # a closed one frees its place


def test_a_limit_of_zero_counts_without_limiting() -> None:
    counter = SocketCounter(limit=0)
    for _ in range(1000):
        counter.acquire("a")


def test_releasing_more_than_was_acquired_leaves_nothing_behind() -> None:
    counter = SocketCounter(limit=1)
    counter.acquire("a")
    counter.release("a")
    counter.release("a")
    counter.acquire("a")
    with pytest.raises(TooManySockets):
        counter.acquire("a")
