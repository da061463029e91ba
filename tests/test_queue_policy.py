"""The queue policy: priorities and timeouts, their rules, and each queue (in-process and Redis) keeping
them; end to end on the native and the OIP routes, per backend."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from fakes import WAIT, GatedTensorModel, make_settings
from zypher_ws.backends.memory import LocalEventBus, MemoryQueue
from zypher_ws.errors import InvalidInput
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.models import ModelConfig, ModelConfigError, spec_of
from zypher_ws.queue_policy import STARVATION_LIMIT, LevelPicker, QueuePolicy
from zypher_ws.records import Job

NOW = 1000.0


def clock() -> float:
    return NOW


# -- the rules ----------------------------------------------------------------------------------------


def test_priorities_off_ignore_a_requests_priority() -> None:
    assert QueuePolicy().admit({"priority": 7}, clock=clock).priority == 0


def test_a_level_is_the_requests_or_the_default_or_the_lowest() -> None:
    three = QueuePolicy(priority_levels=3)
    assert [three.admit(p, clock=clock).priority for p in ({"priority": 1}, {"priority": 0}, None)] == [1, 3, 3]
    assert QueuePolicy(priority_levels=3, default_priority_level=2).admit({}, clock=clock).priority == 2
    with pytest.raises(InvalidInput, match=r"parameters\.priority: 4, and this model has priority levels 1 to 3"):
        three.admit({"priority": 4})
    for bad in ({"priority": -1}, {"priority": 1.5}, {"timeout": "5"}, {"timeout": True}, [1]):
        with pytest.raises(InvalidInput):
            three.admit(bad)


def test_a_request_may_set_or_shorten_a_timeout_never_lengthen_it() -> None:
    free = QueuePolicy()
    assert free.admit({}, clock=clock).deadline is None
    assert free.admit({"timeout": 500_000}, clock=clock).deadline == NOW + 0.5
    capped = QueuePolicy(default_timeout_us=200_000)
    assert capped.admit({}, clock=clock).deadline == NOW + 0.2
    assert capped.admit({"timeout": 100_000}, clock=clock).deadline == NOW + 0.1
    assert capped.admit({"timeout": 900_000}, clock=clock).deadline == NOW + 0.2
    fixed = QueuePolicy(default_timeout_us=200_000, allow_timeout_override=False)
    assert fixed.admit({"timeout": 100_000}, clock=clock).deadline == NOW + 0.2
    assert QueuePolicy(allow_timeout_override=False).admit({"timeout": 5}, clock=clock).deadline is None


def test_config_json_keys() -> None:
    config = ModelConfig.from_dict(
        {"priority_levels": 2, "default_priority_level": 1, "default_timeout_us": 5, "allow_timeout_override": False},
        source="config.json",
    )
    assert config.queue_policy() == QueuePolicy(
        priority_levels=2, default_priority_level=1, default_timeout_us=5, allow_timeout_override=False
    )
    for bad, message in [
        ({"priority_levels": -1}, "priority_levels must be a whole number of at least 0"),
        ({"default_priority_level": 1}, "default_priority_level needs priority_levels"),
        ({"priority_levels": 2, "default_priority_level": 3}, "default_priority_level must be 1 to priority_levels"),
        ({"default_timeout_us": 0.5}, "default_timeout_us must be a whole number"),
        ({"allow_timeout_override": "yes"}, "allow_timeout_override must be true or false"),
    ]:
        with pytest.raises(ModelConfigError, match=message):
            ModelConfig.from_dict(bad, source="config.json")


def test_the_highest_level_goes_first_and_no_level_starves() -> None:
    picker = LevelPicker(2)
    picks = [picker.pick(lambda level: True) for _ in range(3 * (STARVATION_LIMIT + 1))]
    # Level 2 has work all along: it is passed over STARVATION_LIMIT times, then taken.
    assert picks == ([1] * STARVATION_LIMIT + [2]) * 3
    assert LevelPicker(2).pick(lambda level: level == 2) == 2
    assert LevelPicker(2).pick(lambda level: False) is None


def test_the_starvation_bound_holds_for_every_level() -> None:
    levels = 4
    picker = LevelPicker(levels)
    waited = dict.fromkeys(range(1, levels + 1), 0)
    for _ in range(500):
        chosen = picker.pick(lambda level: True)
        assert chosen is not None
        for level in waited:
            waited[level] = 0 if level == chosen else waited[level] + 1
            assert waited[level] <= STARVATION_LIMIT + levels - 1


# -- the queues ---------------------------------------------------------------------------------------


def jobs_of(*levels: int) -> list[Job]:
    return [Job(f"{i}-{level}", priority=level) for i, level in enumerate(levels)]


async def test_the_memory_queue_takes_by_level_in_arrival_order_within_one() -> None:
    queue = MemoryQueue(100, levels=3)
    for job in jobs_of(3, 2, 1, 3, 1, 0):  # 0: a record from before priorities were on (the lowest)
        await queue.put(job)
    assert await queue.depth() == 6
    taken = await queue.get_batch(4, 0)
    assert [j.prediction_id for j in taken] == ["2-1", "4-1", "1-2", "0-3"]
    assert [j.prediction_id for j in await queue.get_batch(10, 0)] == ["3-3", "5-0"]


async def drop(client: Any, prefix: str) -> None:
    """Delete a test's keys and close its client."""
    found = [key async for key in client.scan_iter(match=f"{prefix}:*")]
    if found:
        await client.delete(*found)
    await client.aclose()


@pytest.fixture
async def redis_queue(redis_url: str) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    from zypher_ws.backends.redis.keys import RedisKeys
    from zypher_ws.backends.redis.queue import RedisQueue
    from zypher_ws.backends.redis.store import RedisStore

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    keys = RedisKeys(f"zypher-test-{uuid.uuid4().hex[:12]}")
    queue = RedisQueue(
        client, keys, stream=keys.queue("m", "1"), store=RedisStore(client, keys), bus=LocalEventBus(),
        maxsize=100, consumer="c1", claim_idle=30, max_attempts=3, levels=3,
    )  # fmt: skip
    await queue.ensure_group()
    try:
        yield queue
    finally:
        await queue.close()
        await drop(client, keys.prefix)


async def test_the_redis_queue_takes_by_level_and_acknowledges_on_each_levels_stream(redis_queue: Any) -> None:
    queue = redis_queue
    for job in jobs_of(3, 2, 1, 3, 1, 0):
        await queue.put(job)
    assert await queue.depth() == 6
    taken = await queue.get_batch(4, 0)
    assert [j.prediction_id for j in taken] == ["2-1", "4-1", "1-2", "0-3"]
    assert await queue.depth() == 2
    await queue.ack(taken)
    rest = await queue.get_batch(10, 0)
    assert [j.prediction_id for j in rest] == ["3-3", "5-0"]
    await queue.ack(rest)
    assert await queue.depth() == 0 and not queue._held


async def test_redis_levels_are_not_starved_across_batches(redis_queue: Any) -> None:
    queue = redis_queue
    for job in jobs_of(*([1] * 20), 2):
        await queue.put(job)
    order = []
    for _ in range(STARVATION_LIMIT + 1):
        (job,) = await queue.get_batch(1, 0)
        order.append(job.priority)
        await queue.ack([job])
    assert order == [1] * STARVATION_LIMIT + [2]


async def test_an_empty_redis_queue_wakes_for_the_next_job_of_any_level(redis_queue: Any) -> None:
    queue = redis_queue
    waiting = asyncio.create_task(queue.get_batch(5, 0))
    await queue.put(Job("late", priority=2))
    (job,) = await asyncio.wait_for(waiting, WAIT)
    assert job.prediction_id == "late" and job.receipt.startswith("1/")
    await queue.ack([job])


# -- end to end ---------------------------------------------------------------------------------------


async def client_with_policy(aiohttp_client: Any, backend: dict[str, Any], model: Any, **policy: Any) -> TestClient:
    model.bind(asyncio.get_running_loop())
    spec = dataclasses.replace(spec_of(model), config=ModelConfig(**policy))
    settings = make_settings(**backend, workers=1, max_batch_size=1)
    client: TestClient = await aiohttp_client(create_app(settings, models=[(spec, model)]))
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)
    return client


def native(x: int, **parameters: Any) -> dict[str, Any]:
    return {"input": {"x": x}, "parameters": parameters}


def infer(x: int, **parameters: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [x]}], "parameters": parameters}


async def test_higher_priority_runs_first_on_both_routes(aiohttp_client: Any, backend: dict[str, Any]) -> None:
    model = GatedTensorModel()
    client = await client_with_policy(aiohttp_client, backend, model, priority_levels=2)
    headers = {"Prefer": "respond-async"}
    assert (await client.post("/models/gated/predict", json=native(0), headers=headers)).status == 202
    await model.wait_started()  # the worker holds this one; the rest wait in the queue
    ids = []
    for path, body in [
        ("/models/gated/predict", native(1, priority=2)),
        ("/v2/models/gated/infer", infer(2)),  # no priority: the lowest level, 2
        ("/v2/models/gated/infer", infer(3, priority=1)),
        ("/models/gated/predict", native(4, priority=1)),
    ]:
        resp = await client.post(path, json=body, headers=headers)
        assert resp.status == 202, await resp.text()
        ids.append((await resp.json())["prediction_id"])
    model.release.set()
    for pid in ids:
        assert (await client.app[SERVICE].wait(pid, WAIT)).status.value == "succeeded"
    assert [batch[0]["x"] for batch in model.batches] == [0, 3, 4, 1, 2]


async def test_a_request_queued_past_its_timeout_is_not_run(aiohttp_client: Any, backend: dict[str, Any]) -> None:
    model = GatedTensorModel()
    client = await client_with_policy(aiohttp_client, backend, model, default_timeout_us=60_000_000)
    headers = {"Prefer": "respond-async"}
    assert (await client.post("/models/gated/predict", json=native(0), headers=headers)).status == 202
    await model.wait_started()
    late_native = await (await client.post("/models/gated/predict", json=native(1, timeout=1), headers=headers)).json()
    late_oip = asyncio.create_task(client.post("/v2/models/gated/infer", json=infer(2, timeout=1)))
    in_time = await (await client.post("/models/gated/predict", json=native(3), headers=headers)).json()
    model.release.set()
    record = await client.app[SERVICE].wait(late_native["prediction_id"], WAIT)
    assert record.status.value == "failed" and record.error is not None
    assert record.error["code"] == "deadline_exceeded" and record.error["message"].endswith("; not run")
    assert record.started_at is None and record.attempts == 0  # straight from queued: it never ran
    answer = await asyncio.wait_for(late_oip, WAIT)
    assert answer.status == 504 and (await answer.json())["error"].endswith("; not run")
    assert (await client.app[SERVICE].wait(in_time["prediction_id"], WAIT)).status.value == "succeeded"
    assert [batch[0]["x"] for batch in model.batches] == [0, 3]


async def test_a_priority_outside_the_levels_is_a_bad_request(aiohttp_client: Any, backend: dict[str, Any]) -> None:
    client = await client_with_policy(aiohttp_client, backend, GatedTensorModel(gated=False), priority_levels=2)
    resp = await client.post("/models/gated/predict", json=native(1, priority=3))
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_input"
    resp = await client.post("/v2/models/gated/infer", json=infer(1, priority=3))
    assert resp.status == 400
    assert await resp.json() == {"error": "parameters.priority: 3, and this model has priority levels 1 to 2"}


async def test_the_move_to_level_streams_leaves_held_entries_and_goes_on_while_the_queue_runs(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from zypher_ws.backends.redis.keys import RedisKeys
    from zypher_ws.backends.redis.queue import RedisQueue
    from zypher_ws.backends.redis.store import RedisStore
    from zypher_ws.records import Prediction

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    keys = RedisKeys(f"zypher-test-{uuid.uuid4().hex[:12]}")
    store = RedisStore(client, keys)
    plain = keys.queue("m", "1")
    held, waiting, late = [Prediction.new({"n": n}, model_name="m", model_version="1", priority=1) for n in range(3)]
    for prediction in (held, waiting, late):
        await store.add(prediction)
    # A worker of the earlier version (no levels) has taken one entry of the plain stream and runs it.
    await client.xgroup_create(plain, keys.group, id="0", mkstream=True)
    await client.xadd(plain, {"id": held.prediction_id})
    await client.xreadgroup(keys.group, "old-worker", {plain: ">"}, count=1)
    await client.xadd(plain, {"id": waiting.prediction_id})
    queue = RedisQueue(
        client, keys, stream=plain, store=store, bus=LocalEventBus(),
        maxsize=100, consumer="new-worker", claim_idle=0.2, max_attempts=3, levels=2,
    )  # fmt: skip
    try:
        await queue.ensure_group()
        # The held entry stays for its worker to acknowledge; only the waiting one moves.
        assert [fields["id"] for _, fields in await client.xrange(plain)] == [held.prediction_id]
        (first,) = await asyncio.wait_for(queue.get_batch(5, 0), WAIT)
        assert first.prediction_id == waiting.prediction_id and first.priority == 1
        # An API process of the earlier version queues one more on the plain stream: moved later too.
        await client.xadd(plain, {"id": late.prediction_id})
        (second,) = await asyncio.wait_for(queue.get_batch(5, 0), WAIT)
        assert second.prediction_id == late.prediction_id
        assert [fields["id"] for _, fields in await client.xrange(plain)] == [held.prediction_id]
    finally:
        await queue.close()
        await drop(client, keys.prefix)
