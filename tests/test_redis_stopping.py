"""The Redis queue and event bus stop when told to, even when redis-py loses the cancel of a command in
flight (lost_cancels.py makes it lose every one): on a real Redis, in one process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

import lost_cancels
from fakes import WAIT
from helpers import eventually
from zypher_ws.backends.memory import LocalEventBus
from zypher_ws.backends.redis.events import RedisEventBus
from zypher_ws.backends.redis.keys import RedisKeys
from zypher_ws.backends.redis.queue import RedisQueue
from zypher_ws.backends.redis.store import RedisStore
from zypher_ws.records import Job, Prediction, Status


@pytest.fixture
def losing_cancels() -> Iterator[None]:
    lost_cancels.install()
    try:
        yield
    finally:
        lost_cancels.uninstall()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def keys(client: aioredis.Redis) -> AsyncIterator[RedisKeys]:
    keys = RedisKeys(f"zypher-test-{uuid.uuid4().hex[:12]}")
    yield keys
    found = [key async for key in client.scan_iter(match=f"{keys.prefix}:*")]
    if found:
        await client.delete(*found)


@pytest.fixture
async def queue(client: aioredis.Redis, keys: RedisKeys) -> AsyncIterator[RedisQueue]:
    queue = RedisQueue(
        client, keys, stream=keys.queue("m", "1"), store=RedisStore(client, keys), bus=LocalEventBus(),
        maxsize=100, consumer="c1", claim_idle=30, max_attempts=3,
    )  # fmt: skip
    await queue.ensure_group()
    yield queue
    await asyncio.wait_for(queue.close(), WAIT)


async def blocked_in_xreadgroup(client: aioredis.Redis) -> bool:
    """Whether a connection waits in a blocking XREADGROUP on the server (each test has its own keys,
    and its queue is the only reader of them, but other tests' servers may share this Redis)."""
    clients: list[dict[str, Any]] = await client.client_list()
    return any(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in clients)


async def cancel_lost(task: asyncio.Task[Any], lost_before: int) -> None:
    """Cancel `task`, then wait until redis-py (lost_cancels) has lost that cancel."""
    task.cancel()

    async def lost() -> bool:
        return lost_cancels.lost > lost_before

    await eventually(lost, "the cancel lost")
    assert not task.done()


async def test_an_interrupt_ends_a_wait_on_the_queue_whose_cancel_was_lost(
    queue: RedisQueue, client: aioredis.Redis, losing_cancels: None
) -> None:
    lost_before = lost_cancels.lost
    waiting = asyncio.create_task(queue.get_batch(4, 0))
    await eventually(lambda: blocked_in_xreadgroup(client), "a blocking read under way")
    await cancel_lost(waiting, lost_before)
    queue.interrupt()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, WAIT)
    # Only the calls under way: the next one takes work as ever.
    await queue.put(Job("later"))
    (job,) = await asyncio.wait_for(queue.get_batch(4, 0), WAIT)
    assert job.prediction_id == "later"


async def test_an_interrupt_while_a_batch_fills_keeps_what_was_taken_for_the_next_call(
    queue: RedisQueue, client: aioredis.Redis
) -> None:
    """The first read delivered an entry; the read waiting for company (a long --max-batch-delay-ms) is
    interrupted within one bounded read, and the entry is not lost: the next call returns it."""
    await queue.put(Job("first"))
    filling = asyncio.create_task(queue.get_batch(4, max_delay=60.0))
    await eventually(lambda: blocked_in_xreadgroup(client), "the read waiting for company")
    queue.interrupt()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(filling, WAIT)
    assert await queue.depth() == 1  # it waits here, to be run next (a draining pool counts it)
    (job,) = await asyncio.wait_for(queue.get_batch(4, 0), WAIT)
    assert job.prediction_id == "first"
    await queue.ack([job])
    assert await queue.depth() == 0 and not queue._held


async def test_closing_the_queue_ends_its_claims_loop_whose_cancel_was_lost(
    client: aioredis.Redis, keys: RedisKeys, losing_cancels: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = RedisQueue(
        client, keys, stream=keys.queue("m", "1"), store=RedisStore(client, keys), bus=LocalEventBus(),
        maxsize=100, consumer="c1", claim_idle=0.04, max_attempts=3,
    )  # fmt: skip
    await queue.ensure_group()
    # The claims loop's first command waits on the test, so that the cancel surely lands in it.
    in_command, answer = asyncio.Event(), asyncio.get_running_loop().create_future()

    async def touch() -> None:
        in_command.set()
        await answer

    monkeypatch.setattr(queue, "_touch", lost_cancels.losing_cancels(touch))
    waiting = asyncio.create_task(queue.get_batch(4, 0))  # starts the claims loop
    await asyncio.wait_for(in_command.wait(), WAIT)
    lost_before = lost_cancels.lost
    closing = asyncio.create_task(queue.close())

    async def lost() -> bool:
        return lost_cancels.lost > lost_before

    await eventually(lost, "the claims loop's cancel lost")
    answer.set_result(None)  # the command answers; the loop carries on, as if not cancelled
    await asyncio.wait_for(closing, WAIT)
    assert queue._maintenance is not None and queue._maintenance.done()
    queue.interrupt()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


async def test_the_event_bus_stops_listening_when_its_cancel_was_lost(
    client: aioredis.Redis, keys: RedisKeys, losing_cancels: None
) -> None:
    async def read_many(ids: Any) -> list[Prediction]:
        return []

    bus = RedisEventBus(client, keys, read_many)
    listening = asyncio.create_task(bus.listen())

    async def subscribed() -> bool:
        counts = dict(await client.pubsub_numsub(keys.events))
        return bool(counts.get(keys.events))

    await eventually(subscribed, "the channel subscribed")
    # It serves as before: a change published arrives.
    heard: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
    prediction = Prediction.new({"x": 1}, model_name="m", model_version="1")

    def listener(state: Prediction) -> None:
        if not heard.done():
            heard.set_result(state)

    bus.subscribe(prediction.prediction_id, listener)
    await bus.publish([prediction])
    assert (await asyncio.wait_for(heard, WAIT)).status is Status.QUEUED
    await cancel_lost(listening, lost_cancels.lost)
    bus.stop()
    await asyncio.wait_for(listening, WAIT)
