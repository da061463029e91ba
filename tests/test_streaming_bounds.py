"""What a stream holds stays bounded: position watchers go with their watches, a stream-only model's
non-streaming answer keeps the stream limits, a canceled record stops growing, a rerun does not inherit
the lost run's chunks, and the process executor's streams do not starve the loop's default executor."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from fakes import WAIT, GatedModel, make_settings
from helpers import ClientFactory, eventually, listener_count
from zypher_ws import Progress
from zypher_ws.backends.memory import LocalEventBus, MemoryQueue, MemoryStore
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.models import build, parse_model_option
from zypher_ws.queue_positions import QueuePositions
from zypher_ws.records import COMMITTED, OUTPUT, PROGRESS, Job, Prediction, Status, StreamEvent
from zypher_ws.streaming import MAX_PROGRESS_MESSAGE, StreamRun, ToLoop, iterate

ASYNC = {"Prefer": "respond-async"}


async def _submit(client: TestClient, value: Any) -> str:
    resp = await client.post("/predict", json={"input": value}, headers=ASYNC)
    assert resp.status == 202
    pid: str = (await resp.json())["prediction_id"]
    return pid


async def test_position_watchers_go_when_their_predictions_start_or_their_sockets_close(
    make_client: ClientFactory,
) -> None:
    gated = GatedModel()
    client = await make_client(model=gated, workers=1, max_batch_size=1)
    positions = client.app[SERVICE].positions
    ids = [await _submit(client, {"x": i}) for i in range(4)]
    await gated.wait_started(1)

    async def subscribed(ws: Any, pid: str) -> None:
        await ws.send_json({"op": "subscribe", "prediction_id": pid})
        while (message := await ws.receive_json(timeout=10))["type"] != "queue":
            assert message["type"] == "subscribed"

    # A socket that closes while its predictions wait: its watchers go with it.
    async with client.ws_connect("/ws") as ws:
        for pid in ids[1:]:
            await subscribed(ws, pid)
        assert positions.watched() == 3
    await eventually(lambda: _is(positions.watched(), 0), "the closed socket's watchers gone")

    # Unsubscribing drops one.
    async with client.ws_connect("/ws") as ws:
        for pid in ids[1:]:
            await subscribed(ws, pid)
        await ws.send_json({"op": "unsubscribe", "prediction_id": ids[3]})
        await eventually(lambda: _is(positions.watched(), 2), "the unsubscribed watcher gone")
        # A socket that stays open while its predictions start and finish keeps none of them.
        gated.release.set()
        done = 0
        while done < 2:
            message = await ws.receive_json(timeout=10)
            done += message["type"] == "update" and message["prediction"]["status"] == "succeeded"
        await positions.tick()
        assert positions.watched() == 0


async def _is(value: int, expected: int) -> bool:
    return value == expected


async def test_a_canceled_stream_keeps_what_it_had_at_the_cancel_and_commits_it_once() -> None:
    """The cancel reaches the generator late (over processes or Redis): what it yields meanwhile is
    neither pushed nor kept, and the record is written once after the cancel, then never again."""
    store, bus = MemoryStore(), LocalEventBus()
    prediction = Prediction.new({}, model_name="m", model_version="1", stream=True)
    await store.add(prediction)
    (running,) = await store.start([prediction.prediction_id])
    pid = running.prediction_id
    commits: list[int] = []
    commit_stream = store.commit_stream

    async def counting(*args: Any) -> Any:
        commits.append(len(args[2]))
        return await commit_stream(*args)

    store.commit_stream = counting  # type: ignore[method-assign]
    pushed: list[int] = []
    bus.subscribe_stream(pid, lambda e: pushed.append(e.index) if e.kind == OUTPUT else None)
    run = StreamRun(running, settings=make_settings(stream_commit_ms=60_000), store=store, bus=bus)
    call: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    emitted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def start(emit: Any) -> Any:
        emitted.set_result(emit)
        return call, lambda: None  # a cancel that does not reach the generator at once

    task = asyncio.create_task(run.run(start))
    emit = await asyncio.wait_for(emitted, WAIT)
    emit((OUTPUT, 0, "c0"))
    emit((OUTPUT, 1, "c1"))
    canceled = await store.cancel(pid)
    await bus.publish([canceled])
    for i in range(2, 6):
        emit((OUTPUT, i, f"c{i}"))
        emit((PROGRESS, 0.5, None))
    call.set_result(None)
    outcome = await asyncio.wait_for(task, WAIT)
    record = await store.get(pid)
    assert record is not None and record.status is Status.CANCELED
    assert record.result == ["c0", "c1"] == outcome.result
    assert commits == [2]  # one commit after the cancel, of the chunks it had
    assert pushed == [0, 1]


class Forever:
    """A generator model without predict_batch that never ends."""

    name, version = "forever", "1"
    input_schema: dict[str, Any] = {}
    output_schema: dict[str, Any] = {"type": "string"}

    def load(self) -> None:
        pass

    def predict_stream(self, value: Any) -> Iterator[Any]:
        while True:
            yield "x" * 100
            yield Progress(0.5)


async def test_a_stream_only_model_asked_for_its_answer_keeps_the_stream_limits(aiohttp_client: Any) -> None:
    model = build(parse_model_option("forever=python:test_streaming_bounds:Forever"))
    settings = make_settings(max_stream_chunks=50, max_stream_bytes=1_000_000)
    client = await aiohttp_client(create_app(settings, model=model))
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)
    resp = await client.post("/predict", json={"input": 1})
    record = await resp.json()
    assert record["status"] == "failed" and record["error"]["code"] == "stream_limit_exceeded"
    assert "--max-stream-chunks 50" in record["error"]["message"]


@pytest.mark.slow  # spawns the model's processes and a manager process
async def test_process_streams_past_the_default_executor_s_threads_all_run_and_cancel(aiohttp_client: Any) -> None:
    """Each stream from a process holds a forwarding thread for its life: those are the runner's own, so
    more streams than the loop's default executor has threads all make progress, and their cancels (calls
    to the manager) still get through."""
    loop = asyncio.get_running_loop()
    small = ThreadPoolExecutor(max_workers=2)
    loop.set_default_executor(small)
    settings = make_settings(
        model=("mock",), executor="process", workers=3, max_batch_size=1, mock_stream_chunks=100_000, mock_latency_ms=5
    )
    client = await aiohttp_client(create_app(settings))
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), 60)
    ids = []
    for i in range(3):
        resp = await client.post("/predict", json={"input": i, "stream": True}, headers=ASYNC)
        ids.append((await resp.json())["prediction_id"])
    async with client.ws_connect("/ws") as ws:
        for pid in ids:
            await ws.send_json({"op": "subscribe", "prediction_id": pid})
        outputs: set[str] = set()
        while outputs != set(ids):
            message = await ws.receive_json(timeout=60)
            if message["type"] == "output":
                outputs.add(message["prediction_id"])
    for pid in ids:
        assert (await client.delete(f"/predict/{pid}")).status == 200
    await eventually(lambda: _is(listener_count(client.app), 0), "the streams' runs ended", timeout=60)
    for pid in ids:
        record = await (await client.get(f"/predict/{pid}")).json()
        assert record["status"] == "canceled" and 1 <= len(record["result"]) < 100_000


async def test_a_rerun_does_not_inherit_the_lost_run_s_uncommitted_chunks() -> None:
    """A run pushed c0..c4 and committed c0, c1, then its worker was lost: whether its prediction is queued
    again or its job taken over (running again, one attempt more), the uncommitted c2..c4 are not joined
    onto the record any more: the rerun yields them afresh, perhaps otherwise."""
    for back_again in ("queued", "running"):
        store, bus = MemoryStore(), LocalEventBus()
        prediction = Prediction.new({}, model_name="m", model_version="1", stream=True)
        await store.add(prediction)
        (running,) = await store.start([prediction.prediction_id])
        pid = running.prediction_id
        await bus.publish([running])
        await bus.publish_stream([StreamEvent(pid, OUTPUT, i, chunk=f"c{i}") for i in range(5)])
        await store.commit_stream(pid, 0, ["c0", "c1"], None)
        await bus.publish_stream([StreamEvent(pid, COMMITTED, 2)])
        assert bus.uncommitted(pid) == (0, ["c0", "c1", "c2", "c3", "c4"])
        stored = await store.get(pid)
        assert stored is not None
        requeued = stored.requeued()
        await bus.publish([requeued if back_again == "queued" else replace(stored, attempts=stored.attempts + 1)])
        assert bus.uncommitted(pid) == (0, []), back_again


def test_progress_is_coalesced_on_the_executor_s_side_and_its_message_bounded() -> None:
    """A million progress reports before the loop takes any cross as the latest alone, in one callback
    with the chunks around them, in order; a long message is cut."""
    loop = asyncio.new_event_loop()
    try:
        got: list[Any] = []
        scheduled: list[Any] = []
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any) -> Any:
            scheduled.append(callback)
            return call_soon_threadsafe(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        to_loop = ToLoop(loop, got.append)

        def steps() -> Iterator[Any]:
            yield "first"
            for i in range(1_000_000):
                yield Progress(i / 1_000_000)
            yield "done"
            yield Progress(1.0, "m" * (MAX_PROGRESS_MESSAGE * 10))

        error = iterate(steps(), to_loop, lambda: False, skip=0, max_chunks=10, max_bytes=1000)
        assert error is None
        loop.run_until_complete(asyncio.sleep(0))
        assert got == [
            (OUTPUT, 0, "first"),
            (PROGRESS, 999_999 / 1_000_000, None),
            (OUTPUT, 1, "done"),
            (PROGRESS, 1.0, "m" * MAX_PROGRESS_MESSAGE),
        ]
        assert len(scheduled) == 1
        to_loop((PROGRESS, 0.5, None))  # after the loop took the rest: a callback of its own
        loop.run_until_complete(asyncio.sleep(0))
        assert got[-1] == (PROGRESS, 0.5, None) and len(scheduled) == 2
    finally:
        loop.close()


async def test_a_watcher_unwatched_by_its_own_tell_is_not_kept() -> None:
    """A tell whose send drops its socket stops its watch, which unwatches it in the middle of the tick:
    it is not put back, and another socket's watcher of the same prediction stays."""
    queue = MemoryQueue(10)
    pid = "0" * 32
    await queue.put(Job(pid))
    line = QueuePositions()

    def dropping(position: int, estimate: float | None) -> bool:
        line.unwatch(queue, pid, dropping)  # the socket goes, with its watch
        return True

    told: list[int] = []
    line.watch(queue, pid, dropping)
    line.watch(queue, pid, lambda p, e: told.append(p) is None)
    await line.tick()
    assert line.watched() == 1 and told == [0]
