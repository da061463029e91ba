"""The Redis queue and event bus stop when told to, even when redis-py loses the cancel of a command in
flight (lost_cancels.py makes it lose every one): on a real Redis, in one process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis

import lost_cancels
from fakes import WAIT, GatedModel, ScriptedModel, StepExecutor, make_settings
from helpers import eventually
from zypher_ws.backends import open_backend
from zypher_ws.backends.base import Interrupted
from zypher_ws.backends.memory import LocalEventBus
from zypher_ws.backends.redis.events import RedisEventBus
from zypher_ws.backends.redis.keys import RedisKeys
from zypher_ws.backends.redis.queue import RedisQueue
from zypher_ws.backends.redis.store import RedisStore
from zypher_ws.deployments import Deployer, deploy
from zypher_ws.metrics import Metrics
from zypher_ws.models import spec_of
from zypher_ws.records import Job, Prediction, Status
from zypher_ws.runner import ModelRunner
from zypher_ws.workers import WorkerPool


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
async def reader(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The queue's own client: its connections carry a name of their own (CLIENT SETNAME), so a test
    sees its own reads on a Redis other tests share."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, client_name=f"zypher-test-{uuid.uuid4().hex}")
    yield client
    await client.aclose()


@pytest.fixture
async def queue(reader: aioredis.Redis, keys: RedisKeys) -> AsyncIterator[RedisQueue]:
    queue = RedisQueue(
        reader, keys, stream=keys.queue("m", "1"), store=RedisStore(reader, keys), bus=LocalEventBus(),
        maxsize=100, consumer="c1", claim_idle=30, max_attempts=3,
    )  # fmt: skip
    await queue.ensure_group()
    yield queue
    await asyncio.wait_for(queue.close(), WAIT)


async def blocked_in_xreadgroup(client: aioredis.Redis, reader: aioredis.Redis) -> bool:
    """Whether one of `reader`'s connections waits in a blocking XREADGROUP on the server (by its
    connections' name: other tests' servers may share this Redis)."""
    name = reader.get_connection_kwargs()["client_name"]
    clients: list[dict[str, Any]] = await client.client_list()
    return any(c["name"] == name and c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in clients)


async def cancel_lost(task: asyncio.Task[Any], lost_before: int) -> None:
    """Cancel `task`, then wait until redis-py (lost_cancels) has lost that cancel."""
    task.cancel()

    async def lost() -> bool:
        return lost_cancels.lost > lost_before

    await eventually(lost, "the cancel lost")
    assert not task.done()


async def test_an_interrupt_ends_a_wait_on_the_queue_whose_cancel_was_lost(
    queue: RedisQueue, client: aioredis.Redis, reader: aioredis.Redis, losing_cancels: None
) -> None:
    lost_before = lost_cancels.lost
    waiting = asyncio.create_task(queue.get_batch(4, 0))
    await eventually(lambda: blocked_in_xreadgroup(client, reader), "a blocking read under way")
    await cancel_lost(waiting, lost_before)
    queue.interrupt()
    with pytest.raises(Interrupted):  # not a CancelledError, which would say the caller was cancelled
        await asyncio.wait_for(waiting, WAIT)
    # Only the calls under way: the next one takes work as ever.
    await queue.put(Job("later"))
    (job,) = await asyncio.wait_for(queue.get_batch(4, 0), WAIT)
    assert job.prediction_id == "later"


async def test_an_interrupt_while_a_batch_fills_keeps_what_was_taken_for_the_next_call(
    queue: RedisQueue, client: aioredis.Redis, reader: aioredis.Redis
) -> None:
    """The first read delivered an entry; the read waiting for company (a long --max-batch-delay-ms) is
    interrupted within one bounded read, and the entry is not lost: the next call returns it."""
    await queue.put(Job("first"))
    filling = asyncio.create_task(queue.get_batch(4, max_delay=60.0))
    await eventually(lambda: blocked_in_xreadgroup(client, reader), "the read waiting for company")
    queue.interrupt()
    with pytest.raises(Interrupted):
        await asyncio.wait_for(filling, WAIT)
    # It waits here, to be run next (a draining pool counts it); the shared depth counts it as taken.
    assert queue.backlog() == 1 and await queue.depth() == 0
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


# -- a pool stopping loses nothing Redis delivered -------------------------------------------------


class HoldingProxy:
    """A TCP proxy to the Redis at `redis_url` that holds a reply carrying `marker` until `release` is
    set: a reply on its way when the test acts. `url` is the proxy's."""

    def __init__(self, redis_url: str, marker: bytes) -> None:
        self._target = urlsplit(redis_url)
        self.marker = marker
        self.held, self.release = asyncio.Event(), asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = urlunsplit(self._target._replace(netloc=f"127.0.0.1:{port}"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: bool) -> None:
        try:
            while data := await reader.read(65536):
                if hold and self.marker in data and not self.release.is_set():
                    self.held.set()
                    await self.release.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        target = (self._target.hostname or "127.0.0.1", self._target.port or 6379)
        server_reader, server_writer = await asyncio.open_connection(*target)
        await asyncio.gather(
            self._pipe(client_reader, server_writer, False),
            self._pipe(server_reader, client_writer, True),
            return_exceptions=True,
        )


def pool_on(queue: RedisQueue, store: RedisStore, **settings: Any) -> WorkerPool:
    """A pool of one worker over `queue`; its model is never called in these tests."""
    return WorkerPool(
        settings=make_settings(workers=1, **settings), queue=queue, store=store, bus=LocalEventBus(),
        runner=ModelRunner(ScriptedModel(), StepExecutor()), metrics=Metrics(),
    )  # fmt: skip


async def test_a_pool_stopping_as_a_read_answers_keeps_the_job_delivered_and_hands_it_back(
    redis_url: str, client: aioredis.Redis, keys: RedisKeys
) -> None:
    """XREADGROUP has delivered an entry to this consumer, its reply on the way, when the pool stops: the
    waiting worker is interrupted, not cancelled (a cancel would drop the reply, and the entry would stay
    pending on this consumer with nobody to run it). The queue keeps it, and closing hands it back."""
    pid = f"job-{uuid.uuid4().hex}"
    async with HoldingProxy(redis_url, pid.encode()) as proxy:
        proxied = aioredis.Redis.from_url(proxy.url, decode_responses=True)
        stream = keys.queue("m", "1")
        store = RedisStore(client, keys)
        queue = RedisQueue(
            proxied, keys, stream=stream, store=store, bus=LocalEventBus(),
            maxsize=100, consumer="c1", claim_idle=30, max_attempts=3,
        )  # fmt: skip
        await queue.ensure_group()
        pool = pool_on(queue, store)
        pool.start()
        await client.xadd(stream, {"id": pid})
        await asyncio.wait_for(proxy.held.wait(), WAIT)  # delivered in Redis, the reply held on its way
        stopping = asyncio.create_task(pool.stop(0))

        async def stop_begun() -> bool:
            return pool._stopping

        await eventually(stop_begun, "the pool stopping")
        proxy.release.set()
        await asyncio.wait_for(stopping, WAIT)
        assert [job.prediction_id for job in queue._reclaimed] == [pid] and queue.backlog() == 1
        await asyncio.wait_for(queue.close(), WAIT)
        assert queue.backlog() == 0 and not queue._held
        (entry,) = await client.xpending_range(stream, keys.group, "-", "+", 10)
        assert entry["time_since_delivered"] >= 30_000  # handed back: idle, for the next claims turn to take
        await proxied.aclose()


async def test_closing_the_queue_hands_back_what_it_took_over(client: aioredis.Redis, keys: RedisKeys) -> None:
    """Entries taken over from a lost worker and not run yet go back idle, and another consumer's next
    claims turn takes them (not after another --claim-idle)."""
    stream = keys.queue("m", "1")
    store = RedisStore(client, keys)
    queue = RedisQueue(
        client, keys, stream=stream, store=store, bus=LocalEventBus(),
        maxsize=100, consumer="closing", claim_idle=0.05, max_attempts=3,
    )  # fmt: skip
    await queue.ensure_group()
    prediction = Prediction.new({"x": 1}, model_name="m", model_version="1")
    await store.add(prediction)
    await queue.put(Job(prediction.prediction_id))
    await client.xreadgroup(keys.group, "dead-worker", {stream: ">"}, count=1)
    queue._maintenance = asyncio.create_task(queue._maintain())  # as get_batch starts it

    async def taken_over() -> bool:
        return queue.backlog() == 1

    await eventually(taken_over, "the lost worker's entry taken over")
    await asyncio.wait_for(queue.close(), WAIT)
    assert queue.backlog() == 0 and not queue._held
    _, claimed, _ = await client.xautoclaim(stream, keys.group, "other", min_idle_time=50, start_id="0-0")
    assert [fields["id"] for _, fields in claimed] == [prediction.prediction_id]


async def test_an_unloaded_model_leaves_a_lost_workers_entry_to_the_workers_still_serving_it(
    redis_settings: dict[str, str], client: aioredis.Redis
) -> None:
    """Once unloaded (drained), a model's queue is closed: its claims loop no longer takes over entries
    other consumers left idle, to hold them with no worker to run them. The process still serving the
    version (whose claims turn is slower here, so that the unloaded one would win) runs the entry."""
    unloaded_model, serving_model = GatedModel(gated=False), GatedModel(gated=False)
    loop = asyncio.get_running_loop()
    unloaded_model.bind(loop)
    serving_model.bind(loop)
    here = make_settings(**redis_settings, workers=1, claim_idle=0.2)
    elsewhere = make_settings(**redis_settings, workers=1, claim_idle=2.0)
    keys = RedisKeys(redis_settings["redis_prefix"])
    stream = keys.queue(unloaded_model.name, unloaded_model.version)
    async with open_backend(here) as backend, open_backend(elsewhere) as other_backend:
        deployer = Deployer(settings=here, backend=backend, metrics=Metrics(), run_here=True)
        try:
            deployment = await deployer.make(spec_of(unloaded_model), unloaded_model)
            await asyncio.wait_for(deployer.start_loading(deployment), WAIT)
            await asyncio.wait_for(deployer.unload(deployment), WAIT)
            # A worker elsewhere takes a prediction of this version and dies.
            prediction = Prediction.new({"x": 1}, model_name=unloaded_model.name, model_version=unloaded_model.version)
            await backend.store.add(prediction)
            await deployment.queue.put(Job(prediction.prediction_id))
            await client.xreadgroup(keys.group, "dead-worker", {stream: ">"}, count=1)
            models = [(spec_of(serving_model), serving_model)]
            async with deploy(models, settings=elsewhere, backend=other_backend, metrics=Metrics()):

                async def run() -> bool:
                    return (await backend.store.get(prediction.prediction_id)).status is Status.SUCCEEDED

                await eventually(run, "the lost worker's prediction run elsewhere", timeout=2 * WAIT)
        finally:
            await deployer.close()
    assert len(serving_model.batches) == 1 and not unloaded_model.batches
