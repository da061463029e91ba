"""The delivery loop: takes due deliveries from the store, a bounded number at once, sends them signed,
and writes what each attempt led to back to the store.

Nothing waits in memory: the store holds every pending delivery, and the loop reads only as many as it
has room for (`--webhook-concurrency`, at most a quarter of it to one host), so a dead receiver costs
rows, not RAM, and a slow one holds up neither the model nor the other receivers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

from ..backends.base import KeepsWebhooks, Store
from ..errors import RetryLater, ZypherError
from ..records import DEAD_LETTERED, DELIVERED, GONE, url_shown
from ..waiting import settle, settled_within
from . import schedule
from .schedule import CONNECTION_ERROR, Attempt, Delivery, Settlement
from .signing import Signer
from .target import AddressPolicy

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..settings import Settings

log = logging.getLogger(__name__)

POLL = 1.0  # longest the loop sleeps between looks at the store (retries come due; other processes' events)
STORE_RETRY_FIRST = 0.05  # seconds before a failed store write is tried again, doubling up to STORE_RETRY_MAX
STORE_RETRY_MAX = 2.0


class Transport(Protocol):
    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Attempt:
        """POST once, following no redirect; what it got (never raises for the receiver's failures)."""
        ...


class Dispatcher:
    def __init__(
        self,
        *,
        outbox: KeepsWebhooks,
        transport: Transport,
        signer: Signer,
        delays: Sequence[float],
        concurrency: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.signer = signer
        self.delays = tuple(delays)
        self.concurrency = concurrency
        self.per_host = max(1, concurrency // 4)
        self.metrics = metrics
        # When deliveries are due (tests pass a clock they move, then call wake()); the webhook-timestamp
        # header is always the real time of the attempt, which receivers check against their own clock.
        self.clock: Callable[[], float] = time.time
        self.jitter: Callable[[], float] = schedule.jitter
        self.observers: list[Callable[[Settlement], None]] = []  # called after each attempt is recorded
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: Counter[str] = Counter()  # by host
        self._wakeup: asyncio.Future[None] | None = None
        self._woken = False
        # Set by stop(): the loop ends at its next turn even if a cancel was lost (redis-py can swallow
        # the CancelledError of a command in flight, and the loop would carry on as if it never came).
        self._stopping = False
        self.idle = asyncio.Event()  # set while the loop sleeps, having taken all it could
        outbox.on_webhooks_scheduled(self.wake)

    def wake(self) -> None:
        """Look at the store again now (an event was scheduled, a slot freed, or the clock moved)."""
        self._woken = True
        if self._wakeup is not None:
            settle(self._wakeup)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        """Until stopped (or cancelled)."""
        failing = False
        while not self._stopping:
            self._woken = False
            free = self.concurrency - len(self._tasks)
            if free > 0:
                try:
                    due = await self.outbox.due_webhooks(
                        self.clock(), free, per_host=self.per_host, in_flight=self._in_flight
                    )
                except RetryLater as exc:
                    if not failing:
                        log.warning("cannot read pending webhooks (%s); trying again", exc.message)
                    failing, due = True, []
                except Exception:
                    log.exception("reading pending webhooks failed; trying again")
                    due = []
                else:
                    if failing:
                        log.info("reading pending webhooks again")
                    failing = False
                for delivery in due:
                    self._start(delivery)
                if len(due) == free:
                    continue  # there may be more due already
            if not self._woken:
                self._wakeup = asyncio.get_running_loop().create_future()
                self.idle.set()
                try:
                    await settled_within(self._wakeup, POLL)
                finally:
                    self._wakeup = None
                    self.idle.clear()

    async def stop(self) -> None:
        """End the loop and abandon attempts in flight: they stay pending in the store and are made again
        (same webhook-id)."""
        self._stopping = True
        self.wake()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, delivery: Delivery) -> None:
        self._in_flight[delivery.host] += 1
        task = asyncio.create_task(self._deliver(delivery), name=f"zypher-webhook-{delivery.webhook_id}")
        self._tasks.add(task)
        if self.metrics is not None:
            self.metrics.webhook_in_flight.inc()

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._in_flight[delivery.host] -= 1
            if self._in_flight[delivery.host] <= 0:
                del self._in_flight[delivery.host]
            if self.metrics is not None:
                self.metrics.webhook_in_flight.dec()
            if not task.cancelled() and task.exception() is not None:
                log.error("webhook %s: %r", delivery.webhook_id, task.exception())
            self.wake()  # a slot is free

        task.add_done_callback(done)

    async def _deliver(self, delivery: Delivery) -> None:
        headers = self.signer.headers(delivery.webhook_id, int(time.time()), delivery.body)
        try:
            attempt = await self.transport.post(delivery.url, delivery.body, headers)
        except Exception as exc:  # our bug, not the receiver's: the event is tried again like any failure
            log.error("webhook %s to %s: %s", delivery.webhook_id, url_shown(delivery.url), type(exc).__name__)
            attempt = Attempt(error=CONNECTION_ERROR)
        settlement = schedule.settle(delivery, attempt, now=self.clock(), delays=self.delays, jitter=self.jitter)
        await self._record(settlement)
        self._report(settlement)
        for observer in tuple(self.observers):
            observer(settlement)

    async def _record(self, settlement: Settlement) -> None:
        """Write the outcome until the store takes it: the attempt was made, and must not be made again
        only because the store was away for a moment (the delivery stays this process's meanwhile)."""
        delay, failing = STORE_RETRY_FIRST, False
        while True:
            try:
                await self.outbox.settle_webhook(settlement)
                return
            except RetryLater as exc:
                if self._stopping:
                    return  # left pending in the store: made again after the restart
                if not failing:
                    wid = settlement.delivery.webhook_id
                    log.warning("could not record webhook %s (%s); retrying until it is", wid, exc.message)
                    failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)

    def _report(self, s: Settlement) -> None:
        d, attempt = s.delivery, s.attempt
        what = f"webhook {d.webhook_id} ({d.event} of {d.prediction_id}) to {url_shown(d.url)}"
        got = f"HTTP {attempt.status}" if attempt.status is not None else attempt.error
        made = d.attempts + 1
        if s.outcome == DELIVERED:
            log.debug("%s delivered on attempt %d", what, made)
        elif s.outcome == GONE:
            log.info("%s: the receiver answered 410 Gone on attempt %d; no more attempts", what, made)
        elif s.outcome == DEAD_LETTERED:
            log.warning("%s dead-lettered: %s on attempt %d, the last", what, got, made)
        elif s.retry is not None:
            log.info("%s: %s on attempt %d; next in %.0f s", what, got, made, s.retry.due_at - s.at)
        if self.metrics is not None:
            self.metrics.webhook_attempted(s)


async def _warn_if_any_wait(store: KeepsWebhooks) -> None:
    try:
        waiting = await store.pending_webhooks()
    except ZypherError:
        return  # the store is away: nothing to say yet
    if waiting:
        log.warning("%d webhook deliveries wait in the store; without --webhook-secret none is sent", waiting)


@asynccontextmanager
async def delivering(settings: Settings, store: Store, metrics: Metrics | None) -> AsyncIterator[Dispatcher | None]:
    """Deliver the store's pending webhooks while the block runs (none without a --webhook-secret, or on a
    store that keeps none)."""
    if not isinstance(store, KeepsWebhooks):
        yield None
        return
    if not settings.webhook_secrets:
        await _warn_if_any_wait(store)
        yield None
        return
    from .transport import HttpTransport  # aiohttp's client, loaded only where webhooks are delivered

    policy = AddressPolicy(allow_private=settings.webhook_allow_private, allowed_hosts=settings.webhook_allowed_hosts)
    transport = HttpTransport(policy, timeout=settings.webhook_timeout, connections=settings.webhook_concurrency)
    async with transport as http:
        dispatcher = Dispatcher(
            outbox=store,
            transport=http,
            signer=Signer(settings.webhook_secrets),
            delays=settings.retry_delays,
            concurrency=settings.webhook_concurrency,
            metrics=metrics,
        )
        loop = asyncio.create_task(dispatcher.run(), name="zypher-webhooks")
        try:
            yield dispatcher
        finally:
            await dispatcher.stop()
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
