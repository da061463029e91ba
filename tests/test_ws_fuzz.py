"""Property-based: whatever a client sends over the WebSocket, it gets `error` messages or a close with a
defined code, the server keeps serving, and no subscription outlives its socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import make_settings
from helpers import eventually
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.models import MockModel

DEFINED_CLOSE_CODES = {1000, 1001, 1003, 1007, 1008, 1009, 1011, 1013}
OPS = st.sampled_from(["subscribe", "unsubscribe", "predict", "ping", "auth", "nope", None, 1])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
MESSAGE = st.one_of(
    st.builds(lambda op, rest: {"op": op, **rest}, OPS, st.dictionaries(
        st.sampled_from(["prediction_id", "prediction_ids", "input", "request_id", "token"]), JSON, max_size=3)),
    JSON,
)  # fmt: skip
FRAME = st.one_of(
    MESSAGE.map(lambda m: ("text", json.dumps(m))),
    st.text(max_size=200).map(lambda t: ("text", t)),
    st.binary(max_size=200).map(lambda b: ("bytes", b)),
)


async def _exercise(frames: list[tuple[str, Any]]) -> None:
    app = create_app(make_settings(ws_max_subscriptions=5, ws_max_message=4096), model=MockModel())
    async with TestClient(TestServer(app)) as client:
        async with client.ws_connect("/ws") as ws:
            for kind, data in frames:
                if kind == "text":
                    await ws.send_str(data)
                else:
                    await ws.send_bytes(data)
            await ws.send_json({"op": "ping", "request_id": "last"})
            while True:  # every answer is well-formed, up to the pong or a defined close
                msg = await ws.receive(timeout=5)
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                    assert ws.close_code in DEFINED_CLOSE_CODES
                    break
                body = json.loads(msg.data)
                assert body["type"] in {
                    "subscribed", "update", "accepted", "pong", "error", "authenticated", "queue", "output", "progress"
                }  # fmt: skip
                if body["type"] == "error":
                    assert isinstance(body["error"]["code"], str) and body["error"]["message"]
                if body["type"] == "pong":
                    break
        # The server still serves, and the socket left no subscriptions behind.
        assert (await client.get("/healthz")).status == 200
        bus: Any = client.app[SERVICE].bus

        async def released() -> bool:
            return bool(bus.listener_count() == 0)

        await eventually(released, "released every subscription")  # the handler cleans up on its own schedule


@pytest.mark.timeout(600)  # sixty apps started and stopped in a row: minutes on a loaded machine, not 120 s
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAME, max_size=8))
def test_any_websocket_input_gets_errors_or_a_defined_close(frames: list[tuple[str, Any]]) -> None:
    asyncio.run(_exercise(frames))
