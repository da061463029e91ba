"""The WebSocket protocol and Server-Sent Events, through a real server on a TCP port."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType
from aiohttp._websocket.writer import WebSocketWriter
from aiohttp.test_utils import TestClient
from rawws import RawWebSocket

from fakes import TERMINAL, WAIT, GatedModel, make_settings
from helpers import ClientFactory, eventually, listener_count
from zypher_ws.http import live
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE, SETTINGS, SOCKETS
from zypher_ws.http.live import Outbox
from zypher_ws.json_codec import MAX_DEPTH
from zypher_ws.models import MockModel
from zypher_ws.records import Prediction

ASYNC = {"Async-Mode": "true"}


async def recv(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next message, past `queue` messages (a queued prediction's place in line: tests/test_streaming.py)."""
    while True:
        message: dict[str, Any] = await ws.receive_json(timeout=WAIT)
        if message.get("type") != "queue":
            return message


async def assert_quiet(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Nothing is pending on the socket: a ping's pong is the very next message."""
    await ws.send_json({"op": "ping"})
    assert await recv(ws) == {"type": "pong"}


async def submit(client: TestClient, value: Any) -> dict[str, Any]:
    resp = await client.post("/predict", json={"input": value}, headers=ASYNC)
    assert resp.status == 202
    record: dict[str, Any] = await resp.json()
    return record


# -- messages and errors --------------------------------------------------------------------------


async def test_ping_and_every_bad_message_leave_the_socket_open(make_client: ClientFactory) -> None:
    client = await make_client(model=MockModel())
    async with client.ws_connect("/ws") as ws:
        await assert_quiet(ws)
        cases: list[tuple[str | bytes, str]] = [
            ("{not json", "invalid_json"),
            ("[" * 30_000 + "]" * 30_000, "invalid_json"),  # nested past the parser's recursion limit
            ("[1, 2]", "invalid_message"),
            ('{"op": "dance"}', "unknown_op"),
            ('{"no": "op"}', "unknown_op"),
            ('{"op": "subscribe"}', "invalid_message"),
            ('{"op": "subscribe", "prediction_ids": "abc"}', "invalid_message"),
            ('{"op": "subscribe", "prediction_ids": [1]}', "invalid_message"),
            ('{"op": "predict"}', "invalid_message"),
            (b"\x00\x01binary", "invalid_message"),
        ]
        for raw, code in cases:
            if isinstance(raw, bytes):
                await ws.send_bytes(raw)
            else:
                await ws.send_str(raw)
            message = await recv(ws)
            assert message["type"] == "error" and message["error"]["code"] == code, (raw, message)
            assert message["error"]["message"]
        await ws.send_json({"op": "subscribe", "prediction_id": "f" * 32, "request_id": "r1"})
        message = await recv(ws)
        assert message["error"]["code"] == "not_found"
        assert message["request_id"] == "r1" and message["prediction_id"] == "f" * 32
        await assert_quiet(ws)
    assert listener_count(client.app) == 0


@pytest.mark.parametrize("store", ["memory://", "sqlite"])
async def test_an_id_that_is_not_32_hex_is_not_found_without_asking_the_store(
    make_client: ClientFactory, tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(model=MockModel(), store=store.replace("sqlite", f"sqlite:///{tmp_path / 'z.db'}"))
    backend, asked = client.app[SERVICE].store, []

    def spying(real: Callable[[str], Awaitable[Any]]) -> Callable[[str], Awaitable[Any]]:
        async def spy(prediction_id: str) -> Any:
            asked.append(prediction_id)
            return await real(prediction_id)

        return spy

    monkeypatch.setattr(backend, "get", spying(backend.get))
    monkeypatch.setattr(backend, "cancel", spying(backend.cancel))
    ids = ["\ud800", "F" * 32, "0" * 31, "0" * 33, "", "../" + "0" * 29]
    async with client.ws_connect("/ws") as ws:
        for pid in ids:  # a lone surrogate once made SQLite and Redis raise, and the socket die
            await ws.send_str(json.dumps({"op": "subscribe", "prediction_id": pid, "request_id": "r"}))
            message = await recv(ws)
            assert message["error"]["code"] == "not_found" and message["prediction_id"] == pid, message
        await ws.send_str(json.dumps({"op": "subscribe", "prediction_ids": ["\ud800", "f" * 32]}))
        assert [(await recv(ws))["prediction_id"] for _ in range(2)] == ["\ud800", "f" * 32]
        await assert_quiet(ws)
    for path in ("F" * 32, "0" * 31, "%ED%A0%80", "%FF%FE"):
        for resp in (await client.get(f"/predict/{path}"), await client.get(f"/predict/{path}/events")):
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
        resp = await client.delete(f"/predict/{path}")
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    assert asked == ["f" * 32]  # only the one id that could exist


async def test_errors_of_ours_become_internal_error_messages_never_http_bytes(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(model=MockModel())
    pid = (await submit(client, 1))["prediction_id"]
    service, broken = client.app[SERVICE], asyncio.Event()
    broken.set()
    read = service.store.get

    async def get(prediction_id: str) -> Any:
        if broken.is_set():
            raise RuntimeError("a bug of ours")
        return await read(prediction_id)

    async def submit_broken(value: Any, **kwargs: Any) -> Any:
        raise RuntimeError("another bug of ours")

    monkeypatch.setattr(service.store, "get", get)
    monkeypatch.setattr(service, "submit", submit_broken)
    internal = {"code": "internal_error", "message": "internal server error"}
    async with client.ws_connect(f"/ws?prediction_id={pid}") as ws:
        assert await recv(ws) == {"type": "error", "error": internal, "request_id": None, "prediction_id": pid}
        await ws.send_json({"op": "subscribe", "prediction_id": pid, "request_id": "s"})
        assert await recv(ws) == {"type": "error", "error": internal, "request_id": "s", "prediction_id": pid}
        await ws.send_json({"op": "predict", "input": 2, "request_id": "p"})
        assert await recv(ws) == {"type": "error", "error": internal, "request_id": "p"}
        await assert_quiet(ws)
        broken.clear()
        await ws.send_json({"op": "subscribe", "prediction_id": pid})  # the failed ones left nothing behind
        assert (await recv(ws))["type"] == "subscribed"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3 and all(r.exc_info for r in errors)  # once each, with its traceback
    assert listener_count(client.app) == 0


async def test_an_error_of_ours_outside_any_message_closes_the_socket_with_1011(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(model=MockModel())

    def broken_session(*args: Any) -> None:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(live, "WsSession", broken_session)
    async with client.ws_connect("/ws") as ws:
        msg = await ws.receive(timeout=WAIT)
        assert msg.type is WSMsgType.CLOSE and ws.close_code == 1011
    assert not client.app[SOCKETS]
    assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize("depth", [MAX_DEPTH, 1023])
async def test_predict_op_nested_deeper_than_max_depth_is_an_error_message(
    make_client: ClientFactory, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(model=MockModel())
    async with client.ws_connect("/ws") as ws:
        await ws.send_str('{"op": "predict", "request_id": 1, "input": ' + "[" * depth + "]" * depth + "}")
        message = await recv(ws)
        assert message["type"] == "error" and message["error"]["code"] == "invalid_json", message
        assert "nested deeper than 128 levels" in message["error"]["message"]
        await assert_quiet(ws)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert listener_count(client.app) == 0


async def test_predict_op_accepts_and_pushes_updates(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated, workers=1, max_batch_size=1)
    await submit(client, {"x": 0})
    await gated.wait_started(1)  # the lone worker is busy: the next prediction is accepted queued
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "predict", "input": {"x": 5}, "request_id": "req-7"})
        accepted = await recv(ws)
        assert accepted["type"] == "accepted" and accepted["request_id"] == "req-7"
        assert accepted["prediction"]["status"] == "queued"
        pid = accepted["prediction"]["prediction_id"]
        gated.release.set()
        running = await recv(ws)
        assert (running["type"], running["prediction"]["status"]) == ("update", "running")
        done = await recv(ws)
        assert done["type"] == "update" and done["prediction"]["status"] == "succeeded"
        assert done["prediction"]["prediction_id"] == pid
        assert done["prediction"]["result"] == {"echo": {"x": 5}}
        await assert_quiet(ws)

        await ws.send_json({"op": "predict", "input": {"x": "not an int"}, "request_id": 3})
        error = await recv(ws)
        assert error["error"]["code"] == "invalid_input" and error["request_id"] == 3
        assert "input.x" in error["error"]["message"]


async def test_large_invalid_predict_messages_keep_the_loop_responsive(make_client: ClientFactory) -> None:
    """42 KB `predict` messages the digits schema rejects once cost the loop ~0.3 s each and echoed the input."""
    client = await make_client()  # the real digits model
    loop = asyncio.get_running_loop()
    message = json.dumps({"op": "predict", "input": [16] * 10_000, "request_id": 9})
    assert 40_000 < len(message) < client.app[SETTINGS].ws_max_message
    answered = asyncio.Event()

    async def send_all(ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            for _ in range(10):
                await ws.send_str(message)
            for _ in range(10):
                raw = await ws.receive_str(timeout=WAIT)
                assert len(raw) < 300, raw[:300]
                error = json.loads(raw)
                assert error["error"]["code"] == "invalid_input" and error["request_id"] == 9
                assert error["error"]["message"].startswith("input: too large: it has 10000 items")
        finally:
            answered.set()

    async def probe() -> list[float]:
        latencies = []
        while not latencies or not answered.is_set():
            started = loop.time()
            assert (await client.get("/healthz")).status == 200
            latencies.append(loop.time() - started)
        return latencies

    async with client.ws_connect("/ws") as ws:
        _, latencies = await asyncio.wait_for(asyncio.gather(send_all(ws), probe()), 60)
    assert max(latencies) < 0.5, latencies


async def test_predict_op_when_queue_full(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated, workers=1, max_batch_size=1, max_queue=1)
    await submit(client, {"x": 0})
    await gated.wait_started(1)
    await submit(client, {"x": 1})
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "predict", "input": {"x": 2}, "request_id": "full"})
        error = await recv(ws)
        assert error["error"]["code"] == "queue_full" and error["request_id"] == "full"
    gated.release.set()


async def test_subscribe_gets_current_state_then_updates_in_order(
    make_client: ClientFactory, gated: GatedModel
) -> None:
    client = await make_client(model=gated, workers=1, max_batch_size=1)
    first = await submit(client, {"x": 1})
    await gated.wait_started(1)
    second = await submit(client, {"x": 2})
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_ids": [first["prediction_id"], second["prediction_id"]]})
        snapshots = [await recv(ws), await recv(ws)]
        assert [(m["type"], m["prediction"]["status"]) for m in snapshots] == [
            ("subscribed", "running"),
            ("subscribed", "queued"),
        ]
        gated.release.set()
        seen: dict[str, list[str]] = {first["prediction_id"]: [], second["prediction_id"]: []}
        while not all(s and s[-1] == "succeeded" for s in seen.values()):
            message = await recv(ws)
            assert message["type"] == "update"
            seen[message["prediction"]["prediction_id"]].append(message["prediction"]["status"])
        assert seen == {first["prediction_id"]: ["succeeded"], second["prediction_id"]: ["running", "succeeded"]}
        await assert_quiet(ws)


async def test_subscribing_to_a_finished_prediction_is_one_message(make_client: ClientFactory) -> None:
    client = await make_client(model=MockModel())
    done = await (await client.post("/predict", json={"input": 1})).json()
    async with client.ws_connect(f"/ws?prediction_id={done['prediction_id']}") as ws:
        message = await recv(ws)
        assert message == {"type": "subscribed", "prediction": done}
        await assert_quiet(ws)
        await ws.send_json({"op": "subscribe", "prediction_id": done["prediction_id"]})
        assert (await recv(ws))["type"] == "subscribed"  # asking again after the end answers again
        await assert_quiet(ws)
    assert listener_count(client.app) == 0


async def test_unsubscribe_stops_updates(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated)
    record = await submit(client, {"x": 1})
    # Running before the subscribe: its snapshot then says so, and no `running` update can slip in
    # between the snapshot and the unsubscribe (on Redis that update travels by pub/sub, at its own pace).
    await gated.wait_started()
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_id": record["prediction_id"]})
        subscribed = await recv(ws)
        assert subscribed["type"] == "subscribed" and subscribed["prediction"]["status"] == "running"
        await ws.send_json({"op": "unsubscribe", "prediction_id": record["prediction_id"]})
        await assert_quiet(ws)
        assert listener_count(client.app) == 0
        gated.release.set()
        await (await client.post("/predict", json={"input": {"x": 2}})).json()  # worker is past the first
        await assert_quiet(ws)


async def test_fan_out_and_isolation(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated)
    a, b = await submit(client, {"x": 1}), await submit(client, {"x": 2})
    watchers = [await client.ws_connect(f"/ws?prediction_id={a['prediction_id']}") for _ in range(3)]
    other = await client.ws_connect(f"/ws?prediction_id={b['prediction_id']}")
    for ws in [*watchers, other]:
        assert (await recv(ws))["type"] == "subscribed"
    gated.release.set()
    for ws in watchers:
        statuses = []
        while not statuses or statuses[-1] != "succeeded":
            message = await recv(ws)
            assert message["prediction"]["prediction_id"] == a["prediction_id"]
            statuses.append(message["prediction"]["status"])
        await assert_quiet(ws)
    statuses = []
    while not statuses or statuses[-1] != "succeeded":
        message = await recv(other)
        assert message["prediction"]["prediction_id"] == b["prediction_id"]
        statuses.append(message["prediction"]["status"])
    for ws in [*watchers, other]:
        await ws.close()


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536])
async def test_a_frame_written_directly_is_the_one_aiohttp_writes(size: int) -> None:
    """Updates to an uncompressed socket skip aiohttp's writer (live.text_frame): the bytes must be its own."""
    written: list[bytes] = []

    class Transport(asyncio.Transport):
        def write(self, data: Any) -> None:
            written.append(bytes(data))

        def is_closing(self) -> bool:
            return False

    protocol = mock.Mock(_paused=False)
    payload = b"x" * size
    await WebSocketWriter(protocol, Transport(), use_mask=False).send_frame(payload, WSMsgType.TEXT)
    assert live.text_frame(payload) == b"".join(written)


def test_a_shared_payload_is_framed_once_and_each_payload_as_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct writes frame a state's payload once for all its sockets (live.wire_frame), and never
    hand one payload's frame to another, also when payloads alternate."""
    framed: list[bytes] = []
    text_frame = live.text_frame

    def counting(payload: bytes) -> bytes:
        framed.append(payload)
        return text_frame(payload)

    monkeypatch.setattr(live, "text_frame", counting)
    wire = live._WireFrames()
    a, b = b"a" * 130, b"b" * 3
    assert [wire(a) for _ in range(1000)] == [text_frame(a)] * 1000 and framed == [a]
    copy = a[:65] + a[65:]  # equal to a, another object: keyed by identity, it is framed anew
    for payload in (b, a, b, copy, copy):
        assert wire(payload) == text_frame(payload)
    assert framed == [a, b, a, b, copy]


async def test_compressed_and_plain_watchers_get_the_same_updates(
    make_client: ClientFactory, gated: GatedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket without permessage-deflate gets its updates written straight to its transport; one with
    it, through aiohttp's compressor (the outbox). Both hear the prediction finish."""
    direct: list[bool] = []
    write_now = live.WsSession._write_now

    def spied(session: live.WsSession, frame: bytes) -> bool:
        direct.append(write_now(session, frame))
        return direct[-1]

    monkeypatch.setattr(live.WsSession, "_write_now", spied)
    client = await make_client(model=gated)
    pid = (await submit(client, {"x": 1}))["prediction_id"]
    plain = await client.ws_connect(f"/ws?prediction_id={pid}")
    deflated = await client.ws_connect(f"/ws?prediction_id={pid}", compress=15)
    assert plain.compress == 0 and deflated.compress == 15
    gated.release.set()
    seen = {}
    for name, ws in (("plain", plain), ("deflated", deflated)):
        messages = [await recv(ws)]
        assert messages[0]["type"] == "subscribed"
        while messages[-1]["prediction"]["status"] not in TERMINAL:
            messages.append(await recv(ws))
        seen[name] = [(m["type"], m["prediction"]["status"]) for m in messages]
    # (a backend may skip `running` for one watcher: states are never repeated or reversed, not all sent)
    assert seen["plain"][-1] == seen["deflated"][-1] == ("update", "succeeded")
    assert direct.count(True) == len(seen["plain"]) and direct.count(False) == len(seen["deflated"])
    for ws in (plain, deflated):
        await ws.close()


async def terminal_frame(ws: aiohttp.ClientWebSocketResponse) -> str:
    """The raw text of the first message carrying a finished record (earlier states may come first)."""
    while True:
        frame = await ws.receive_str(timeout=WAIT)
        if json.loads(frame).get("prediction", {}).get("status") in TERMINAL:
            return frame


async def test_a_state_is_encoded_once_for_all_its_watchers(
    make_client: ClientFactory, gated: GatedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(model=gated)
    a = await submit(client, {"x": 1})
    watchers = [await client.ws_connect(f"/ws?prediction_id={a['prediction_id']}") for _ in range(3)]
    for ws in watchers:
        assert (await recv(ws))["type"] == "subscribed"
    await gated.wait_started(1)
    encoded: list[str] = []
    to_dict = Prediction.to_dict

    def counting(self: Prediction) -> dict[str, Any]:
        encoded.append(self.status.value)
        return to_dict(self)

    monkeypatch.setattr(Prediction, "to_dict", counting)
    async with client.get(f"/predict/{a['prediction_id']}/events") as sse:
        gated.release.set()
        frames = {await terminal_frame(ws) for ws in watchers}
        body = (await sse.read()).decode()
    assert len(frames) == 1  # the same frame on every socket
    assert "event: update\ndata: " in body
    # The SSE snapshot is its own message; the update, on three sockets and the stream, was built once.
    assert encoded.count("succeeded") == 1
    for ws in watchers:
        await ws.close()


async def test_too_many_subscriptions(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated, ws_max_subscriptions=2)
    ids = [(await submit(client, {"x": i}))["prediction_id"] for i in range(3)]
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_ids": ids})
        assert (await recv(ws))["type"] == "subscribed"
        assert (await recv(ws))["type"] == "subscribed"
        error = await recv(ws)
        assert error["error"]["code"] == "too_many_subscriptions" and error["prediction_id"] == ids[2]
        await ws.send_json({"op": "predict", "input": {"x": 9}})
        assert (await recv(ws))["error"]["code"] == "too_many_subscriptions"
        await assert_quiet(ws)
    gated.release.set()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_one_subscribe_of_a_thousand_ids_reaches_a_client_that_reads(
    aiohttp_client: Any, store: str, tmp_path: Any
) -> None:
    """The outbox (256 frames) is there to drop clients that do not read, not ones that ask for 1,000
    snapshots at once: the memory store's reads never yield, so these came faster than they went out."""
    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path / 'z.db'}"
    gated = GatedModel()
    gated.bind(asyncio.get_running_loop())
    client = await aiohttp_client(create_app(make_settings(store=url), model=gated))
    service = client.app[SERVICE]
    await asyncio.wait_for(service.models.default.loaded.wait(), WAIT)
    ids = [(await service.submit({"x": i})).prediction_id for i in range(1000)]
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_ids": ids})
        subscribed = []
        while len(subscribed) < len(ids):
            message = await recv(ws)
            assert message["type"] in ("subscribed", "update"), message
            if message["type"] == "subscribed":
                subscribed.append(message["prediction"]["prediction_id"])
        assert subscribed == ids
        await ws.send_json({"op": "ping"})
        while (message := await recv(ws))["type"] == "update":
            pass
        assert message == {"type": "pong"}
    gated.release.set()


async def test_exactly_one_terminal_message_when_completion_races_the_subscribe(make_client: ClientFactory) -> None:
    """1,000 predictions finishing while their subscribe is in flight: one terminal each, in order."""
    client = await make_client(model=MockModel(), max_batch_delay_ms=0.0, max_queue=2000)
    async with client.ws_connect("/ws") as ws:
        statuses: dict[str, list[str]] = {}
        for i in range(1000):
            record = await submit(client, i)
            statuses[record["prediction_id"]] = []
            await ws.send_json({"op": "subscribe", "prediction_id": record["prediction_id"]})
        terminal = 0
        while terminal < 1000:
            message = await recv(ws)
            status = message["prediction"]["status"]
            statuses[message["prediction"]["prediction_id"]].append(status)
            terminal += status == "succeeded"
        await assert_quiet(ws)  # and no second terminal message anywhere
    rank = {"queued": 0, "running": 1, "succeeded": 2}
    for seq in statuses.values():
        assert seq.count("succeeded") == 1 and seq[-1] == "succeeded"
        assert [rank[s] for s in seq] == sorted({rank[s] for s in seq})  # strictly increasing
    assert listener_count(client.app) == 0


# -- limits and lifecycle ------------------------------------------------------------------------------


class BigOutputModel(MockModel):
    """Outputs of ~20 KB, so that a client that stops reading backs up quickly."""

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return [{"blob": "x" * 20_000, "n": x} for x in inputs]


class GatedBigModel(GatedModel):
    """BigOutputModel's outputs, once the test lets the batches run."""

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        super().predict_batch(inputs)
        return [{"blob": "x" * 20_000, "n": x} for x in inputs]


def notify_drops(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set once the server drops a socket for falling behind. A test whose client must not read
    before then (reading would make it a fast client, which is never dropped) waits on it."""
    dropped = asyncio.Event()
    drop = live.WsSession.drop

    def drop_and_notify(session: live.WsSession) -> None:
        drop(session)
        dropped.set()

    monkeypatch.setattr(live.WsSession, "drop", drop_and_notify)
    return dropped


async def test_slow_client_is_dropped_and_nobody_else_waits(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "SLOW_CLIENT_GRACE", WAIT * 6)  # the 1013 waits for a reader past our deadlines
    client = await make_client(model=BigOutputModel(), ws_outbox=32, ws_max_subscriptions=5000, max_queue=5000)
    port = client.server.port
    assert port is not None
    slow = await RawWebSocket.connect("127.0.0.1", port, rcvbuf=4096)
    for i in range(1000):  # thousands of events: accepted, running, succeeded for each
        slow.send_json({"op": "predict", "input": i})
    await slow.writer.drain()
    # Meanwhile a well-behaved client is served promptly, and the slow one is dropped.
    async with client.ws_connect("/ws") as fast:
        for i in range(20):
            await fast.send_json({"op": "predict", "input": f"fast-{i}"})
            assert (await recv(fast))["type"] == "accepted"
            while (await recv(fast))["prediction"]["status"] != "succeeded":
                pass

    async def dropped_and_finished() -> bool:
        return not await client.app[SERVICE].models.default.queue.depth() and not client.app[SOCKETS]

    # The server drops the slow socket and finishes the work on its own schedule, and says so to no one
    # (reading from the slow socket any earlier would make it a fast one): a bounded poll.
    await eventually(dropped_and_finished, "dropped the slow socket and drained the queue", WAIT * 4)
    assert await asyncio.wait_for(slow.read_until_close(), WAIT) == 1013
    slow.close()
    assert listener_count(client.app) == 0  # the dropped socket left no subscriptions behind


async def test_outbox_is_bounded_in_bytes_too(make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Few, large messages: far below --ws-outbox's count, the byte bound drops the client that stops reading."""
    monkeypatch.setattr(live, "DRAIN_TIMEOUT", 0.5)  # a subscribe waiting for room gives up sooner
    monkeypatch.setattr(live, "SLOW_CLIENT_GRACE", WAIT * 2)  # the 1013 waits for a reader past our deadline
    dropped = notify_drops(monkeypatch)
    client = await make_client(
        model=BigOutputModel(), ws_outbox=100_000, ws_outbox_bytes=64 * 1024, ws_max_subscriptions=5000, max_queue=5000
    )
    port = client.server.port
    assert port is not None
    slow = await RawWebSocket.connect("127.0.0.1", port, rcvbuf=4096)
    # 3,000 messages in all, ~20 MB of results: far more than the kernel buffers for a peer that does not
    # read (Linux grows a loopback socket's send buffer to ~4 MB), so the outbox has to overflow.
    for i in range(1000):
        slow.send_json({"op": "predict", "input": i})
    await slow.writer.drain()
    try:
        # Not a byte read before the drop: a client reading all along may keep up and never be dropped.
        await asyncio.wait_for(dropped.wait(), WAIT * 4)
        assert await asyncio.wait_for(slow.read_until_close(), WAIT) == 1013
    finally:
        slow.close()


async def test_a_dropped_client_that_does_not_read_is_aborted(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 1013 close queues behind the backlog of a client that does not read, so it may never go out: past
    SLOW_CLIENT_GRACE the server aborts the connection. This frees the socket even while its handler waits
    for the next message, which a close frame that cannot be written never wakes."""
    monkeypatch.setattr(live, "SLOW_CLIENT_GRACE", 0.2)
    dropped = notify_drops(monkeypatch)
    model = GatedBigModel()
    # An outbox far larger than a batch's results: it overflows only once the sender is stuck behind a
    # full transport, with the close frame to queue behind it.
    client = await make_client(
        model=model,
        max_batch_size=8,
        workers=1,
        ws_outbox=100_000,
        ws_outbox_bytes=1024 * 1024,
        max_queue=5000,
        ws_max_subscriptions=5000,
    )
    port = client.server.port
    assert port is not None and client.server.runner is not None
    server = client.server.runner.server
    assert server is not None
    slow = await RawWebSocket.connect("127.0.0.1", port, rcvbuf=4096)
    for i in range(1000):  # ~20 MB of results once the model runs
        slow.send_json({"op": "predict", "input": {"x": i}})
    slow.send_json({"op": "ping"})
    while (frame := await asyncio.wait_for(slow.read_frame(), WAIT))[0] != 0x1 or json.loads(frame[1]) != {
        "type": "pong"
    }:
        pass
    # Every op is answered, so the handler waits for a message that never comes. From here on the
    # client reads nothing: the results overflow the outbox, and the server drops the socket.
    model.release.set()
    try:
        await asyncio.wait_for(dropped.wait(), WAIT * 4)

        async def gone() -> bool:
            return not client.app[SOCKETS] and not server.connections

        await eventually(gone, "aborted the connection of the dropped socket")
        # What the kernel took still arrives, cut off mid-frame: the close frame behind it was discarded.
        assert await asyncio.wait_for(slow.read_until_close(), WAIT) is None
    finally:
        slow.close()


def test_outbox_bounds() -> None:
    outbox = Outbox(max_frames=3, max_bytes=100)
    assert outbox.put(b"x" * 500)  # alone, a frame larger than the bound still goes
    assert not outbox.put(b"x")
    outbox = Outbox(max_frames=3, max_bytes=100)
    assert outbox.put(b"x" * 60) and outbox.put(b"x" * 40)
    assert not outbox.put(b"x") and (len(outbox), outbox.size) == (2, 100)  # bytes
    outbox = Outbox(max_frames=3, max_bytes=100)
    assert outbox.put(b"a") and outbox.put(b"b") and outbox.put(b"c")
    assert not outbox.put(b"d") and len(outbox) == 3  # frames


async def test_one_subscribe_of_more_than_the_outbox_bytes_reaches_a_client_that_reads(
    make_client: ClientFactory,
) -> None:
    client = await make_client(model=BigOutputModel())  # 50 records of 20 KB: 1 MB, the bound is 256 KiB
    ids = [(await (await client.post("/predict", json={"input": i})).json())["prediction_id"] for i in range(50)]
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_ids": ids})
        assert [(await recv(ws))["prediction"]["prediction_id"] for _ in ids] == ids
        await assert_quiet(ws)


async def test_a_subscribe_waits_for_a_client_that_does_not_read_only_so_long(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "DRAIN_TIMEOUT", 0.2)
    monkeypatch.setattr(live, "SLOW_CLIENT_GRACE", WAIT * 3)  # the 1013 waits for a reader past our deadlines
    client = await make_client(model=BigOutputModel())
    ids = [(await (await client.post("/predict", json={"input": i})).json())["prediction_id"] for i in range(400)]
    port = client.server.port
    assert port is not None
    slow = await RawWebSocket.connect("127.0.0.1", port, rcvbuf=4096)
    slow.send_json({"op": "subscribe", "prediction_ids": ids})  # 8 MB of snapshots, more than any buffer

    async def dropped() -> None:
        while client.app[SOCKETS]:  # noqa: ASYNC110 - reading from the socket would make it a fast one
            await asyncio.sleep(0)

    try:
        await asyncio.wait_for(dropped(), WAIT)
        assert await asyncio.wait_for(slow.read_until_close(), WAIT) == 1013
    finally:
        slow.close()
    assert listener_count(client.app) == 0


async def test_outbox_wakes_who_waits_for_room_at_half_full() -> None:
    outbox = Outbox(max_frames=4, max_bytes=1000)
    for frame in (b"a", b"b", b"c"):
        outbox.put(frame)
    assert not outbox.half_empty()  # three of four
    roomy = asyncio.create_task(outbox.roomy())
    assert await outbox.get() == b"a"
    await asyncio.wait_for(roomy, WAIT)  # two of four: half full
    outbox.put(b"d")
    roomy = asyncio.create_task(outbox.roomy())
    outbox.close()  # the sender is gone: nobody will make room, so nobody waits for it
    await asyncio.wait_for(roomy, WAIT)


async def test_oversized_frame_closes_with_1009(make_client: ClientFactory) -> None:
    client = await make_client(model=MockModel(), ws_max_message=1024)
    async with client.ws_connect("/ws") as ws:
        await ws.send_str(json.dumps({"op": "predict", "input": "x" * 5000}))
        message = await ws.receive(timeout=WAIT)
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert ws.close_code == 1009


async def test_heartbeat_drops_a_dead_peer(make_client: ClientFactory) -> None:
    client = await make_client(model=MockModel(), ws_heartbeat=0.5)
    port = client.server.port
    assert port is not None
    dead = await RawWebSocket.connect("127.0.0.1", port)  # never answers the server's pings
    dead.send_json({"op": "ping"})  # but talks once, so its socket is surely being served
    while (frame := await asyncio.wait_for(dead.read_frame(), WAIT))[0] != 0x1:
        assert frame[0] == 0x9  # the server's own ping may come first: left unanswered
    assert json.loads(frame[1]) == {"type": "pong"}
    (served,) = client.app[SOCKETS]
    # The peer missed a pong: the server closes the connection without a closing handshake (a dead peer
    # would not answer one), so no close frame arrives and the server records 1006, abnormal closure.
    assert await asyncio.wait_for(dead.read_until_close(), WAIT) is None
    assert served.close_code == WSCloseCode.ABNORMAL_CLOSURE == 1006
    dead.close()


async def test_shutdown_closes_every_socket_with_1001(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated)
    record = await submit(client, {"x": 1})
    sockets = [await client.ws_connect(f"/ws?prediction_id={record['prediction_id']}") for _ in range(3)]
    for ws in sockets:
        assert (await recv(ws))["type"] == "subscribed"
    gated.release.set()
    await client.app.shutdown()
    for ws in sockets:
        while (await ws.receive(timeout=WAIT)).type is WSMsgType.TEXT:
            pass
        assert ws.close_code == 1001


# -- Server-Sent Events ----------------------------------------------------------------------------


async def read_events(resp: aiohttp.ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    events, kind = [], None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            assert kind is not None
            events.append((kind, json.loads(line[len("data: ") :])))
    return events


async def test_sse_streams_subscribed_then_updates_and_closes(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated)
    record = await submit(client, {"x": 3})
    resp = await client.get(f"/predict/{record['prediction_id']}/events")
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    first = json.loads((await resp.content.readuntil(b"\n\n")).decode().split("data: ", 1)[1])
    assert first["type"] == "subscribed"
    gated.release.set()
    events = await asyncio.wait_for(read_events(resp), WAIT)
    statuses = [first["prediction"]["status"]] + [e["prediction"]["status"] for _, e in events]
    assert statuses[-1] == "succeeded" and statuses.count("succeeded") == 1
    assert all(kind == "update" for kind, _ in events)
    assert events[-1][1]["prediction"]["result"] == {"echo": {"x": 3}}


async def test_sse_unknown_id_is_404_json(make_client: ClientFactory) -> None:
    client = await make_client(model=MockModel())
    resp = await client.get("/predict/nope/events")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_an_unmasked_client_frame_is_accepted(make_client: ClientFactory) -> None:
    """RFC 6455 says a server must close on one (1002); aiohttp's parser accepts it, as docs/live.md says."""
    client = await make_client(model=MockModel())
    assert client.server.port is not None
    raw = await RawWebSocket.connect("127.0.0.1", client.server.port)
    try:
        payload = b'{"op": "ping"}'
        raw.writer.write(bytes([0x81, len(payload)]) + payload)  # FIN + text, no mask bit, no mask
        assert await asyncio.wait_for(raw.read_frame(), WAIT) == (0x1, b'{"type":"pong"}')
    finally:
        raw.close()


def test_static_dir_holds_the_page() -> None:
    from zypher_ws.http.pages import static_dir

    assert {"index.html", "app.js", "style.css"} <= {p.name for p in static_dir().iterdir()}
