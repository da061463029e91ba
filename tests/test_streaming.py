"""Streaming predictions: the model contract, chunks pushed over WebSocket and SSE with resume, limits,
cancel, commits and recovery."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from fakes import WAIT, GatedModel, ManualClock, make_settings
from helpers import ClientFactory, eventually, listener_count
from zypher_ws import Progress
from zypher_ws.backends.memory import LocalEventBus, MemoryQueue, MemoryStore
from zypher_ws.backends.sqlite import SQLiteStore
from zypher_ws.events import Watch
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.http.live import Outbox
from zypher_ws.models import MockModel, NotAModel, build, parse_model_option
from zypher_ws.queue_positions import QueuePositions
from zypher_ws.records import COMMITTED, OUTPUT, PROGRESS, Job, Prediction, StreamEvent
from zypher_ws.streaming import PROGRESS_RETRY_S, ToQueue, iterate

ASYNC = {"Prefer": "respond-async"}
SSE = {"Accept": "text/event-stream"}


class SteppedStream:
    """A token generator the test steps through: each chunk waits for a permit from `allow(n)`.

    Input {"n": N}: yields "w0 ", "w1 ", ... "w{N-1} " with a Progress after each. `closed` is set when
    the generator is closed (finished, or stopped early by a cancel)."""

    name = "stepped"
    version = "1"
    input_schema: dict[str, Any] = {"type": "object", "properties": {"n": {"type": "integer"}}}
    output_schema: dict[str, Any] = {}

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.closed = threading.Event()
        self.yielded = 0

    def load(self) -> None:
        pass

    def allow(self, n: int) -> None:
        for _ in range(n):
            self.permits.release()

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return [f"batch {x['n']}" for x in inputs]

    def predict_stream(self, input: Any) -> Iterator[Any]:
        try:
            for i in range(input["n"]):
                if not self.permits.acquire(timeout=WAIT):
                    raise TimeoutError("the test gave no permit")
                self.yielded += 1
                yield f"w{i} "
                yield Progress((i + 1) / input["n"], f"{i + 1} of {input['n']}")
        finally:
            self.closed.set()


async def recv(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message: dict[str, Any] = await ws.receive_json(timeout=WAIT)
    return message


async def follow(ws: aiohttp.ClientWebSocketResponse, pid: str) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """(the subscribed record, the chunks of the output messages in order, the terminal record) of one id;
    asserts the output indexes run on from the snapshot's chunks without a gap or a repeat."""
    first: dict[str, Any] | None = None
    chunks: list[Any] = []
    expected = 0
    while True:
        message = await recv(ws)
        if pid and message.get("prediction_id", message.get("prediction", {}).get("prediction_id")) != pid:
            continue  # another prediction's ("": any)
        if message["type"] in ("subscribed", "accepted"):
            first = message["prediction"]
            expected = len(first["result"] or [])
            if first["status"] in ("succeeded", "failed", "canceled"):
                return first, chunks, first
        elif message["type"] == "output":
            assert first is not None, "an output before the subscribed message"
            assert message["index"] == expected, (message["index"], expected)
            expected += 1
            chunks.append(message["chunk"])
        elif message["type"] == "update" and message["prediction"]["status"] in ("succeeded", "failed", "canceled"):
            assert first is not None
            return first, chunks, message["prediction"]


def sse_events(text: str) -> list[dict[str, Any]]:
    """Parse a text/event-stream body into [{event, id, data}] (data parsed as JSON)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


async def streaming_client(make_client: ClientFactory, **settings: Any) -> TestClient:
    return await make_client(model=MockModel(stream_chunks=settings.pop("chunks", 5)), **settings)


# -- the executor's half, alone --------------------------------------------------------------------------


def test_iterate_emits_chunks_and_progress_in_order() -> None:
    items: list[Any] = []
    error = iterate(
        iter(["a", Progress(0.5, "half"), {"b": 1}, Progress(7)]),
        items.append, lambda: False, skip=0, max_chunks=10, max_bytes=1000,
    )  # fmt: skip
    assert error is None
    assert items == [(OUTPUT, 0, "a"), (PROGRESS, 0.5, "half"), (OUTPUT, 1, {"b": 1}), (PROGRESS, 1.0, None)]


def test_iterate_skips_the_chunks_a_rerun_yields_again() -> None:
    items: list[Any] = []
    assert iterate(iter("abcd"), items.append, lambda: False, skip=2, max_chunks=10, max_bytes=1000) is None
    assert items == [(OUTPUT, 2, "c"), (OUTPUT, 3, "d")]


@pytest.mark.parametrize(
    ("max_chunks", "max_bytes", "emitted", "limit"),
    [(2, 1000, 2, "--max-stream-chunks 2"), (10, 9, 2, "--max-stream-bytes 9")],  # each chunk is 4 bytes: "ab"
)
def test_iterate_stops_past_a_limit(max_chunks: int, max_bytes: int, emitted: int, limit: str) -> None:
    items: list[Any] = []
    error = iterate(iter(["ab"] * 5), items.append, lambda: False, skip=0, max_chunks=max_chunks, max_bytes=max_bytes)
    assert error is not None and error["code"] == "stream_limit_exceeded" and limit in error["message"]
    assert len(items) == emitted


def test_iterate_stops_at_the_next_yield_after_a_cancel_and_closes_the_generator() -> None:
    closed = threading.Event()
    cancel = threading.Event()

    def tokens() -> Iterator[str]:
        try:
            for i in range(100):
                if i == 3:
                    cancel.set()
                yield f"t{i}"
        finally:
            closed.set()

    items: list[Any] = []
    assert iterate(tokens(), items.append, cancel.is_set, skip=0, max_chunks=1000, max_bytes=10**6) is None
    assert items == [(OUTPUT, 0, "t0"), (OUTPUT, 1, "t1"), (OUTPUT, 2, "t2")]
    assert closed.is_set()


def test_iterate_reports_a_raise_and_a_chunk_that_is_not_json_as_model_errors() -> None:
    def raising() -> Iterator[str]:
        yield "ok"
        raise RuntimeError("boom")

    items: list[Any] = []
    error = iterate(raising(), items.append, lambda: False, skip=0, max_chunks=10, max_bytes=1000)
    assert error == {"code": "model_error", "message": "RuntimeError: boom"} and items == [(OUTPUT, 0, "ok")]
    error = iterate(iter([object()]), items.append, lambda: False, skip=0, max_chunks=10, max_bytes=1000)
    assert error is not None and error["code"] == "model_error"


# -- the watch: snapshot, gaps, resume --------------------------------------------------------------------


async def running_stream(store: MemoryStore, chunks: list[Any]) -> Prediction:
    prediction = Prediction.new({}, model_name="m", model_version="1", stream=True)
    await store.add(prediction)
    (running,) = await store.start([prediction.prediction_id])
    if chunks:
        committed = await store.commit_stream(running.prediction_id, 0, chunks, None)
        assert committed is not None
        return committed
    return running


async def test_a_watch_mends_a_gap_from_the_store_when_the_stream_commits() -> None:
    """Chunks 2 and 3 went by before the watch subscribed and are not committed: 4 and 5 wait for them."""
    store, bus = MemoryStore(), LocalEventBus()
    prediction = await running_stream(store, ["c0", "c1"])
    pid = prediction.prediction_id
    got: list[Any] = []
    watch = Watch(bus, pid, lambda p, snapshot: got.append(("state", p.result)), on_stream=got.append)
    await watch.start(store.get)
    await bus.publish_stream([StreamEvent(pid, OUTPUT, 4, chunk="c4"), StreamEvent(pid, OUTPUT, 5, chunk="c5")])
    assert got == [("state", ["c0", "c1"])]  # held: 2 and 3 are missing
    await store.commit_stream(pid, 2, ["c2", "c3", "c4"], None)
    mended = asyncio.Event()
    watch_stream = got.append

    def note(event: Any) -> None:
        watch_stream(event)
        if isinstance(event, StreamEvent) and event.index == 5:
            mended.set()

    watch._on_stream = note
    await bus.publish_stream([StreamEvent(pid, COMMITTED, 5)])
    await asyncio.wait_for(mended.wait(), WAIT)
    assert [(e.index, e.chunk) for e in got[1:]] == [(2, "c2"), (3, "c3"), (4, "c4"), (5, "c5")]
    watch.stop()


async def test_a_resumed_watch_replays_from_the_next_index_and_drops_what_it_has() -> None:
    store, bus = MemoryStore(), LocalEventBus()
    prediction = await running_stream(store, ["c0", "c1", "c2", "c3"])
    pid = prediction.prediction_id
    got: list[Any] = []
    watch = Watch(bus, pid, lambda p, snapshot: got.append("snapshot"), on_stream=got.append, from_index=1)
    await watch.start(store.get)
    await bus.publish_stream([StreamEvent(pid, OUTPUT, i, chunk=f"c{i}") for i in (2, 3, 4)])
    assert got[0] == "snapshot"
    assert [(e.index, e.chunk) for e in got[1:]] == [(2, "c2"), (3, "c3"), (4, "c4")]
    watch.stop()
    assert bus.listener_count() == 0


# -- over WebSocket and SSE ------------------------------------------------------------------------------


async def test_a_stream_over_the_websocket_predict_op(make_client: ClientFactory) -> None:
    client = await streaming_client(make_client, chunks=4)
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "predict", "input": "hi", "stream": True, "request_id": "r"})
        accepted = await recv(ws)
        assert accepted["type"] == "accepted" and accepted["request_id"] == "r"
        pid = accepted["prediction"]["prediction_id"]
        chunks: list[Any] = []
        progress: list[float] = []
        while True:
            message = await recv(ws)
            if message["type"] == "output":
                assert message == {
                    "type": "output",
                    "prediction_id": pid,
                    "index": len(chunks),
                    "chunk": message["chunk"],
                }
                chunks.append(message["chunk"])
            elif message["type"] == "progress":
                assert set(message) == {"type", "prediction_id", "fraction", "message"}
                progress.append(message["fraction"])
            elif message["type"] == "update" and message["prediction"]["status"] == "succeeded":
                break
        assert chunks == [{"index": i, "token": f"t{i} "} for i in range(4)]
        assert message["prediction"]["result"] == chunks and message["prediction"]["stream"] is True
        assert message["prediction"]["progress"] == {"fraction": 1.0, "message": None}
        assert progress[-1] == 1.0 and progress == sorted(progress)
        await ws.send_json({"op": "predict", "input": "hi", "stream": "yes", "request_id": "bad"})
        error = await recv(ws)
        assert error["type"] == "error" and error["error"]["code"] == "invalid_message" and error["request_id"] == "bad"


async def test_stream_asked_of_a_model_without_predict_stream_is_refused(make_client: ClientFactory) -> None:
    client = await make_client(model=MockModel())
    resp = await client.post("/predict", json={"input": 1, "stream": True}, headers=ASYNC)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "stream_not_supported"
    resp = await client.post("/predict", json={"input": 1, "stream": "yes"}, headers=ASYNC)
    assert resp.status == 400
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "predict", "input": 1, "stream": True})
        assert (await recv(ws))["error"]["code"] == "stream_not_supported"
    # Without `stream`, a model that offers both runs predict_batch as ever.
    client = await make_client(model=SteppedStream())
    resp = await client.post("/predict", json={"input": {"n": 2}})
    assert resp.status == 200 and (await resp.json())["result"] == "batch 2"


async def test_a_subscriber_joining_mid_stream_gets_the_chunks_so_far_then_the_rest(make_client: ClientFactory) -> None:
    model = SteppedStream()
    client = await make_client(model=model)
    resp = await client.post("/predict", json={"input": {"n": 6}, "stream": True}, headers=ASYNC)
    pid = (await resp.json())["prediction_id"]
    async with client.ws_connect("/ws") as early:
        await early.send_json({"op": "subscribe", "prediction_id": pid})
        assert (await recv(early))["type"] == "subscribed"
        model.allow(3)
        seen = []
        while len(seen) < 3:
            if (message := await recv(early))["type"] == "output":
                seen.append(message["index"])
        async with client.ws_connect("/ws") as late:
            await late.send_json({"op": "subscribe", "prediction_id": pid})
            model.allow(3)
            first, chunks, last = await follow(late, pid)
        assert first["result"][:3] == ["w0 ", "w1 ", "w2 "]
        assert first["result"] + chunks == [f"w{i} " for i in range(6)] == last["result"]


class PacedTokens(SteppedStream):
    """The mock's 5,000 tokens ({"index": i, "token": "ti "}), each waiting for a permit from the test."""

    def predict_stream(self, input: Any) -> Iterator[Any]:
        for i in range(5000):
            if not self.permits.acquire(timeout=WAIT):
                raise TimeoutError("the test gave no permit")
            yield {"index": i, "token": f"t{i} "}


async def test_chunks_race_the_subscribe_without_gaps_or_repeats(make_client: ClientFactory) -> None:
    """Up to 1,000 subscriptions to a 5,000-chunk stream made while it runs: each sees its snapshot's
    chunks, then every later index once, in order. The test paces the model (chunks yielded while each
    subscribe is on its way, and more once its snapshot came), so every subscribe races a running stream
    however fast the machine."""
    model = PacedTokens()
    client = await make_client(model=model, max_stream_chunks=5000, ws_outbox=100_000, ws_outbox_bytes=64 * 1024 * 1024)
    resp = await client.post("/predict", json={"input": {"n": 5000}, "stream": True}, headers=ASYNC)
    pid = (await resp.json())["prediction_id"]
    everything = [{"index": i, "token": f"t{i} "} for i in range(5000)]
    async with client.ws_connect("/ws") as ws:
        joined_at = []
        for _ in range(1000):
            model.allow(5)  # yielded while the subscribe is on its way: the race
            await ws.send_json({"op": "subscribe", "prediction_id": pid})
            first, _, last = await follow_until_some(ws, pid, on_snapshot=lambda: model.allow(5))
            joined_at.append(len(first["result"] or []))
            if last is not None:
                assert last["result"] == everything
                break
            await ws.send_json({"op": "unsubscribe", "prediction_id": pid})
            await ws.send_json({"op": "ping"})
            while (await recv(ws))["type"] != "pong":
                pass
        assert len(set(joined_at)) > 1, "every subscribe saw the same point: no race was run"
    assert listener_count(client.app) == 0


async def test_streams_finishing_while_their_subscribe_is_in_flight(make_client: ClientFactory) -> None:
    """1,000 short streams, each subscribed right after it is submitted: the chunks of each, once, in order."""
    client = await streaming_client(make_client, chunks=5, max_queue=2000, ws_outbox=100_000)
    everything = [{"index": i, "token": f"t{i} "} for i in range(5)]
    async with client.ws_connect("/ws") as ws:
        ids = []
        for i in range(1000):
            resp = await client.post("/predict", json={"input": i, "stream": True}, headers=ASYNC)
            ids.append((await resp.json())["prediction_id"])
            await ws.send_json({"op": "subscribe", "prediction_id": ids[-1]})
        chunks: dict[str, list[Any]] = {pid: [] for pid in ids}
        finished = 0
        while finished < len(ids):
            message = await recv(ws)
            if message["type"] == "subscribed":
                record = message["prediction"]
                assert not chunks[record["prediction_id"]]
                chunks[record["prediction_id"]] = list(record["result"] or [])
                finished += record["status"] == "succeeded"
            elif message["type"] == "output":
                got = chunks[message["prediction_id"]]
                assert message["index"] == len(got)
                got.append(message["chunk"])
            elif message["type"] == "update" and message["prediction"]["status"] == "succeeded":
                assert chunks[message["prediction"]["prediction_id"]] == message["prediction"]["result"]
                finished += 1
        assert all(got == everything for got in chunks.values())
        await ws.send_json({"op": "ping"})
        assert await recv(ws) == {"type": "pong"}  # nothing after the ends
    assert listener_count(client.app) == 0


async def follow_until_some(
    ws: aiohttp.ClientWebSocketResponse, pid: str, on_snapshot: Callable[[], None] = lambda: None
) -> tuple[dict[str, Any], list[Any], dict[str, Any] | None]:
    """Follow a subscription until a few outputs (or the end) have come, checking the indexes run on;
    `on_snapshot` runs when the `subscribed` record has come."""
    first: dict[str, Any] | None = None
    chunks: list[Any] = []
    while True:
        message = await recv(ws)
        if message["type"] == "subscribed":
            first = message["prediction"]
            if first["status"] == "succeeded":
                return first, chunks, first
            on_snapshot()
        elif message["type"] == "output":
            assert first is not None
            assert message["index"] == len(first["result"] or []) + len(chunks)
            assert message["chunk"] == {"index": message["index"], "token": f"t{message['index']} "}
            chunks.append(message["chunk"])
            if len(chunks) >= 3:
                return first, chunks, None
        elif message["type"] == "update" and message["prediction"]["status"] == "succeeded":
            assert first is not None
            assert (first["result"] or []) + chunks == message["prediction"]["result"]
            return first, chunks, message["prediction"]


async def test_resume_over_the_websocket_and_over_sse(make_client: ClientFactory) -> None:
    model = SteppedStream()
    client = await make_client(model=model)
    resp = await client.post("/predict", json={"input": {"n": 5}, "stream": True}, headers=ASYNC)
    pid = (await resp.json())["prediction_id"]
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_id": pid})
        assert (await recv(ws))["prediction"]["result"] in (None, [])
        model.allow(3)
        got = 0
        while got < 3:
            got += (await recv(ws))["type"] == "output"
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_id": pid, "from_index": 0})
        assert (await recv(ws))["type"] == "subscribed"
        replayed = [await recv(ws) for _ in range(2)]
        assert [(m["type"], m["index"], m["chunk"]) for m in replayed] == [("output", 1, "w1 "), ("output", 2, "w2 ")]
        model.allow(2)
        outputs = []
        while (message := await recv(ws))["type"] != "update" or message["prediction"]["status"] != "succeeded":
            if message["type"] == "output":
                outputs.append(message["index"])
        assert outputs == [3, 4]
    resp = await client.get(f"/predict/{pid}/events", headers={"Last-Event-ID": "2"})
    events = sse_events(await resp.text())
    assert [e["event"] for e in events] == ["subscribed", "output", "output"]
    assert [(e["id"], e["data"]["chunk"]) for e in events[1:]] == [("3", "w3 "), ("4", "w4 ")]
    resp = await client.get(f"/predict/{pid}/events")
    events = sse_events(await resp.text())
    assert [e["event"] for e in events] == ["subscribed"] and events[0]["id"] == "4"


async def test_bad_resume_points_are_clear_errors(make_client: ClientFactory) -> None:
    client = await streaming_client(make_client)
    resp = await client.post("/predict", json={"input": 1, "stream": True})
    pid = (await resp.json())["prediction_id"]
    async with client.ws_connect("/ws") as ws:
        for bad in (-1, "3", 1.5, True, [1]):
            await ws.send_json({"op": "subscribe", "prediction_id": pid, "from_index": bad})
            error = await recv(ws)
            assert error["type"] == "error" and error["error"]["code"] == "invalid_message", bad
            assert "from_index" in error["error"]["message"]
        await ws.send_json({"op": "subscribe", "prediction_ids": [pid], "from_index": 1})
        assert (await recv(ws))["error"]["code"] == "invalid_message"
        await ws.send_json({"op": "ping"})
        assert await recv(ws) == {"type": "pong"}
    for bad in ("-1", "abc", "1.5", "²"):
        resp = await client.get(f"/predict/{pid}/events", headers={"Last-Event-ID": bad})
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["code"] == "invalid_header"


async def test_a_sync_post_asking_for_an_event_stream_is_answered_by_it(make_client: ClientFactory) -> None:
    client = await streaming_client(make_client, chunks=3)
    for path in ("/predict", "/models/mock/predict", "/models/mock/versions/1.0.0/predict"):
        resp = await client.post(path, json={"input": "x"}, headers=SSE)  # Accept alone asks to stream
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        events = sse_events(await resp.text())
        kinds = [e["event"] for e in events]
        assert kinds[0] == "subscribed" and kinds[-1] == "update"
        assert resp.headers["Location"] == f"/predict/{events[0]['data']['prediction']['prediction_id']}"
        outputs = [e for e in events if e["event"] == "output"]
        assert [e["id"] for e in outputs] == ["0", "1", "2"]
        assert events[-1]["data"]["prediction"]["result"] == [o["data"]["chunk"] for o in outputs]
    resp = await client.post("/predict", json={"input": "x", "stream": True}, headers={**SSE, **ASYNC})
    assert resp.status == 202  # Prefer: respond-async wins


async def test_past_the_chunk_limit_a_stream_fails_keeping_its_chunks(make_client: ClientFactory) -> None:
    client = await streaming_client(make_client, chunks=10, max_stream_chunks=4)
    resp = await client.post("/predict", json={"input": 1, "stream": True})
    record = await resp.json()
    assert resp.status == 500 and record["status"] == "failed"
    assert record["error"]["code"] == "stream_limit_exceeded"
    assert record["result"] == [{"index": i, "token": f"t{i} "} for i in range(4)]


async def test_cancel_stops_the_generator_and_keeps_the_chunks(make_client: ClientFactory, tmp_path: Path) -> None:
    model = SteppedStream()
    client = await make_client(model=model, store=f"sqlite:///{tmp_path / 'z.db'}")
    resp = await client.post("/predict", json={"input": {"n": 50}, "stream": True}, headers=ASYNC)
    pid = (await resp.json())["prediction_id"]
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_id": pid})
        assert (await recv(ws))["type"] == "subscribed"  # before any chunk: they all come as outputs
        model.allow(2)
        got = 0
        while got < 2:
            got += (await recv(ws))["type"] == "output"
        resp = await client.delete(f"/predict/{pid}")
        assert resp.status == 200
        model.allow(5)  # a yield after the run hears of the cancel (over Redis: a moment later) stops it
        assert await asyncio.to_thread(model.closed.wait, WAIT)
    assert model.yielded <= 7
    await eventually(lambda: _listeners_gone(client), "the stream's run ended")
    record = await (await client.get(f"/predict/{pid}")).json()
    assert record["status"] == "canceled" and record["result"][:2] == ["w0 ", "w1 "]


async def _listeners_gone(client: TestClient) -> bool:
    return listener_count(client.app) == 0


async def test_chunks_are_committed_while_the_stream_runs(make_client: ClientFactory, tmp_path: Path) -> None:
    model = SteppedStream()
    client = await make_client(model=model, store=f"sqlite:///{tmp_path / 'z.db'}", stream_commit_ms=20)
    resp = await client.post("/predict", json={"input": {"n": 4}, "stream": True}, headers=ASYNC)
    pid = (await resp.json())["prediction_id"]
    model.allow(2)
    store = client.app[SERVICE].store

    async def two_committed() -> bool:
        record = await store.get(pid)
        return record is not None and record.result == ["w0 ", "w1 "]

    await eventually(two_committed, "two chunks committed")
    record = await store.get(pid)
    assert record is not None and record.status.value == "running"
    assert record.progress == {"fraction": 0.5, "message": "2 of 4"}
    model.allow(2)


async def test_a_stream_lost_with_its_process_resumes_from_what_was_committed(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """The record says running with two chunks committed (the process died): the next start reruns it,
    and the rerun's first two chunks are not pushed again, so a resumed subscriber misses nothing and
    repeats nothing."""
    path = tmp_path / "z.db"
    store = SQLiteStore(path)
    await store.open()
    prediction = Prediction.new({"n": 5}, model_name="stepped", model_version="1", stream=True)
    await store.add(prediction)
    await store.start([prediction.prediction_id])
    await store.commit_stream(prediction.prediction_id, 0, ["w0 ", "w1 "], {"fraction": 0.4, "message": None})
    await store.close()
    model = SteppedStream()
    client = await aiohttp_client(create_app(make_settings(store=f"sqlite:///{path}"), model=model))
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_id": prediction.prediction_id, "from_index": 1})
        model.allow(5)
        outputs = []
        await ws.send_json({"op": "ping"})  # ends what comes: after the end (and a replay after a terminal snapshot)
        last: dict[str, Any] = {}
        while (message := await recv(ws))["type"] != "pong" or not last:
            if message["type"] == "output":
                outputs.append((message["index"], message["chunk"]))
            elif message["type"] in ("subscribed", "update") and message["prediction"]["status"] == "succeeded":
                last = message["prediction"]
            elif message["type"] == "pong":
                await ws.send_json({"op": "ping"})
    assert last["result"] == [f"w{i} " for i in range(5)] and last["attempts"] == 2
    assert outputs == [(2, "w2 "), (3, "w3 "), (4, "w4 ")]


async def test_a_sync_stream_runs_on_when_its_client_goes_unless_it_asked(make_client: ClientFactory) -> None:
    model = SteppedStream()
    client = await make_client(model=model)
    service = client.app[SERVICE]
    for cancel in (False, True):
        pid = ""
        body = {"input": {"n": 50 if cancel else 3}, "stream": True, "cancel_on_disconnect": cancel}
        resp = await client.post("/predict", json=body, headers=SSE)
        pid = resp.headers["Location"].rsplit("/", 1)[1]
        resp.close()  # the client goes away mid-stream
        model.allow(1)
        if cancel:

            async def canceled(pid: str = pid) -> bool:
                return (await service.get(pid)).status.value == "canceled"

            await eventually(canceled, "canceled after its client went")
            model.allow(5)  # a yield after the run hears of the cancel (over Redis: a moment later) stops it
            assert await asyncio.to_thread(model.closed.wait, WAIT)
        else:
            model.allow(2)
            record = await service.wait(pid, WAIT)
            assert record.status.value == "succeeded" and record.result == ["w0 ", "w1 ", "w2 "]
        model.closed.clear()


# -- queue positions -------------------------------------------------------------------------------------


async def test_queue_positions_are_told_on_change_only_and_ask_only_for_the_watched() -> None:
    """10,000 queued, 1,000 watched: a tick asks the queue about the 1,000 alone, tells each watcher once,
    tells nobody when nothing moved, and tells the new positions once jobs are taken."""
    queue = MemoryQueue(20_000)
    for i in range(10_000):
        await queue.put(Job(f"{i:032x}"))
    asked: list[int] = []
    positions = queue.positions

    async def counting(ids: Any) -> Any:
        asked.append(len(ids))
        return await positions(ids)

    queue.positions = counting  # type: ignore[method-assign]
    clock = ManualClock()
    line = QueuePositions(clock=clock, wall=lambda: 5000.0)
    told: dict[str, list[tuple[int, float | None]]] = {}
    watched = [f"{i:032x}" for i in range(0, 10_000, 10)]
    for pid in watched:
        line.watch(queue, pid, lambda p, eta, pid=pid: told.setdefault(pid, []).append((p, eta)) is None)
    await line.tick()
    assert asked == [1000]
    assert all(told[pid] == [(int(pid, 16), None)] for pid in watched)  # no throughput known yet
    clock.advance(1.0)
    await line.tick()
    assert sum(len(t) for t in told.values()) == 1000  # nothing moved: nobody told again
    await queue.get_batch(20, 0.0)  # 20 jobs start
    clock.advance(1.0)
    await line.tick()
    first = watched[2]  # was 20th in line, now next
    assert told[first][-1] == (0, 5000.0 + 1 / 10.0)  # 20 taken in 2 s: 10 a second
    assert told[watched[0]] == [(0, None)]  # taken: not waiting, nothing more to tell
    assert len(told[watched[-1]]) == 2 and told[watched[-1]][-1][0] == 9990 - 20
    assert asked == [1000, 1000, 1000]


async def test_a_queued_prediction_s_watchers_hear_its_position(make_client: ClientFactory) -> None:
    gated = GatedModel()
    client = await make_client(model=gated, workers=1, max_batch_size=1)
    ids = [(await submit(client, {"x": i}))["prediction_id"] for i in range(4)]
    await gated.wait_started(1)
    record = await (await client.get(f"/predict/{ids[3]}")).json()
    assert record["status"] == "queued" and record["queue_position"] == 2
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_id": ids[3]})
        assert (await recv(ws))["type"] == "subscribed"
        message = await recv(ws)
        assert message["type"] == "queue" and message["prediction_id"] == ids[3]
        assert message["queue_position"] == 2 and "estimated_start_at" in message
        gated.release.set()
        while (message := await recv(ws))["type"] != "update":
            assert message["type"] == "queue" and message["queue_position"] < 2
        assert message["prediction"]["status"] in ("running", "succeeded")


async def submit(client: TestClient, value: Any) -> dict[str, Any]:
    resp = await client.post("/predict", json={"input": value}, headers=ASYNC)
    assert resp.status == 202
    record: dict[str, Any] = await resp.json()
    return record


@pytest.mark.slow  # spawns the model's processes and a manager process
async def test_a_stream_runs_in_the_process_executor_in_order_and_cancels(aiohttp_client: Any) -> None:
    settings = make_settings(model=("mock",), executor="process", workers=2, mock_stream_chunks=100, mock_latency_ms=5)
    client = await aiohttp_client(create_app(settings))
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), 60)
    resp = await client.post("/predict", json={"input": 1, "stream": True}, headers=SSE)
    events = sse_events(await resp.text())
    outputs = [e["data"]["chunk"] for e in events if e["event"] == "output"]
    everything = [{"index": i, "token": f"t{i} "} for i in range(100)]
    assert outputs == everything == events[-1]["data"]["prediction"]["result"]
    assert [e["data"]["fraction"] for e in events if e["event"] == "progress"][-1] == 1.0
    resp = await client.post("/predict", json={"input": 2, "stream": True}, headers=ASYNC)
    pid = (await resp.json())["prediction_id"]
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_id": pid})
        got = 0
        while got < 3:
            got += (await recv(ws))["type"] == "output"
        assert (await client.delete(f"/predict/{pid}")).status == 200
    await eventually(lambda: _listeners_gone(client), "the stream's run ended", timeout=WAIT * 2)
    record = await (await client.get(f"/predict/{pid}")).json()
    assert record["status"] == "canceled" and 3 <= len(record["result"]) < 100


class OnlyStream:
    """A generator model without predict_batch."""

    name, version = "only", "1"
    input_schema: dict[str, Any] = {"type": "integer"}
    output_schema: dict[str, Any] = {"type": "string"}

    def load(self) -> None:
        pass

    def predict_stream(self, n: int) -> Iterator[Any]:
        for i in range(n):
            yield f"c{i}"
            yield Progress((i + 1) / n)


async def test_a_model_with_predict_stream_alone_streams_or_answers_all_its_chunks(aiohttp_client: Any) -> None:
    model = build(parse_model_option("only=python:test_streaming:OnlyStream"))
    assert model.output_schema == {
        "type": "array",
        "description": "the chunks the model yields",
        "items": {"type": "string"},
    }
    client = await aiohttp_client(create_app(make_settings(), model=model))
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)
    resp = await client.post("/predict", json={"input": 3})
    assert (await resp.json())["result"] == ["c0", "c1", "c2"]
    resp = await client.post("/predict", json={"input": 3}, headers=SSE)
    events = sse_events(await resp.text())
    assert [e["data"]["chunk"] for e in events if e["event"] == "output"] == ["c0", "c1", "c2"]
    with pytest.raises(NotAModel):
        build(parse_model_option("nothing=python:test_streaming:ManualClock"))


def test_a_stream_s_frames_count_toward_the_outbox_s_bytes_only() -> None:
    outbox = Outbox(max_frames=2, max_bytes=100)
    assert outbox.put(b"r" * 10) and outbox.put(b"r" * 10)
    assert not outbox.put(b"r" * 10)  # a third record: past the frame bound
    assert all(outbox.put(b"o" * 10, counted=False) for _ in range(8))  # chunks: only bytes count
    assert not outbox.put(b"o", counted=False)  # 100 bytes waiting: full
    assert not outbox.half_empty()


async def test_a_burst_and_a_long_replay_reach_clients_that_read_with_the_default_outbox(
    make_client: ClientFactory,
) -> None:
    client = await streaming_client(make_client, chunks=1000)  # --ws-outbox 256: fewer than the chunks
    everything = [{"index": i, "token": f"t{i} "} for i in range(1000)]
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "predict", "input": "burst", "stream": True})
        first, chunks, last = await follow(ws, "")
        assert (first["result"] or []) + chunks == everything == last["result"]
        await ws.send_json({"op": "subscribe", "prediction_id": last["prediction_id"], "from_index": 0})
        assert (await recv(ws))["type"] == "subscribed"
        replayed = [await recv(ws) for _ in range(999)]
        assert [m["index"] for m in replayed] == list(range(1, 1000))
        await ws.send_json({"op": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def test_a_sync_event_stream_counts_toward_the_live_connections_of_its_client(
    make_client: ClientFactory,
) -> None:
    model = SteppedStream()
    client = await make_client(model=model, ws_max_per_client=1)
    service = client.app[SERVICE]
    first = await client.post("/predict", json={"input": {"n": 1}}, headers=SSE)
    assert first.status == 200
    second = await client.post("/predict", json={"input": {"n": 1}}, headers=SSE)
    assert second.status == 429 and (await second.json())["error"]["code"] == "too_many_sockets"
    assert len(await service.queue_depths()) == 1 and sum((await service.queue_depths()).values()) == 0
    model.allow(1)
    events = sse_events(await first.text())
    assert events[-1]["data"]["prediction"]["result"] == ["w0 "]


@pytest.mark.slow  # spawns a manager process
def test_a_worker_process_sends_every_chunk_and_a_bounded_number_of_progress_reports() -> None:
    """--executor process: a model reporting progress far faster than the queue to the API process drains
    neither grows that queue nor waits on it; every chunk and the latest report still cross, in order."""
    manager = get_context("spawn").Manager()
    try:
        items = manager.Queue(2)  # the real proxy: its put_nowait raises queue.Full in this process
        now = [0.0]
        to_parent = ToQueue(items, clock=lambda: now[0])
        for i in range(1000):  # nobody reads: a report never blocks, only the latest is kept
            to_parent((PROGRESS, i / 1000, None))
            now[0] += PROGRESS_RETRY_S / 3
        assert items.qsize() == 2
        received: list[Any] = []
        reader = threading.Thread(target=lambda: received.extend(iter(items.get, None)))
        reader.start()
        to_parent((OUTPUT, 0, "c0"))  # waits for room, after the report kept back
        to_parent((PROGRESS, 1.0, "done"))
        to_parent.flush()
        items.put(None)
        reader.join(WAIT)
        assert not reader.is_alive()
    finally:
        manager.shutdown()
    progress = [item for item in received if item[0] == PROGRESS]
    assert received[:2] == [(PROGRESS, 0.0, None), (PROGRESS, 0.001, None)]  # the two that fitted
    assert received[2] == (PROGRESS, 0.999, None)  # the latest before the chunk, then the chunk
    assert received[3] == (OUTPUT, 0, "c0") and received[-1] == (PROGRESS, 1.0, "done")
    assert len(progress) <= 4
