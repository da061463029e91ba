"""Operating it: metrics, logs, tokens, origins, limits, static files."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import struct
import sys

import aiohttp
import pytest
from aiohttp import WSMsgType, WSServerHandshakeError, web
from aiohttp.test_utils import TestClient, make_mocked_request
from prometheus_client.parser import text_string_to_metric_families
from rawws import RawWebSocket
from yarl import URL

from fakes import WAIT, GatedModel, make_settings
from helpers import ClientFactory, run_server
from zypher_ws.http import app as app_module
from zypher_ws.http import live
from zypher_ws.http.access_log import PREDICTION_ID, AccessLogger
from zypher_ws.http.app import create_app
from zypher_ws.logs import TEXT_FORMAT, TextFormatter
from zypher_ws.models import MockModel
from zypher_ws.settings import Settings

TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition: `name` (with its labels written in, or given
    as keywords, in any order)."""
    if "{" in name:
        name, written = name.rstrip("}").split("{", 1)
        labels |= dict(pair.split("=", 1) for pair in written.split(","))
        labels = {k: v.strip('"') for k, v in labels.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in metrics:\n{text}")


# -- metrics -------------------------------------------------------------------------------------------


async def test_metrics_count_requests_predictions_batches_and_sockets(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False))
    assert (await client.post("/predict", json={"input": {"x": 1}})).status == 200
    assert (await client.post("/predict", json={"input": {"raise": "boom"}})).status == 500
    async with client.ws_connect("/ws") as ws:
        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
        assert metric(text, "zypher_websocket_connections") == 1
        await ws.send_json({"op": "ping"})
    assert metric(text, 'zypher_http_requests_total{method="POST",route="/predict",status="200"}') == 1
    assert metric(text, 'zypher_http_requests_total{method="POST",route="/predict",status="500"}') == 1
    gated = {"model": "gated", "version": "0.0.1"}  # every model metric is per model version
    assert metric(text, "zypher_predictions_total", **gated, status="succeeded") == 1
    assert metric(text, "zypher_predictions_total", **gated, status="failed") == 1
    assert metric(text, "zypher_batch_size_count", **gated) == 2
    assert metric(text, "zypher_batch_size_bucket", **gated, le="1.0") == 2  # two calls of one (sequential)
    assert metric(text, "zypher_batch_size_bucket", **gated, le="+Inf") == 2
    assert metric(text, "zypher_batch_size_sum", **gated) == 2
    assert metric(text, 'zypher_http_request_duration_seconds_count{route="/predict"}') == 2
    assert metric(text, "zypher_end_to_end_seconds_count", **gated) == 2
    assert metric(text, "zypher_queue_depth", **gated) == 0
    assert metric(text, "zypher_predictions_in_flight", **gated) == 0


async def test_metrics_route_labels_are_templates_not_ids(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False))
    for _ in range(3):
        await client.get("/predict/no-such-id")
    text = await (await client.get("/metrics")).text()
    assert metric(text, 'zypher_http_requests_total{method="GET",route="/predict/{prediction_id}",status="404"}') == 3
    assert "no-such-id" not in text


async def test_metrics_put_unknown_methods_in_one_series(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False))
    for method in ("PROPFIND", "PURGE", "MKCOL"):  # methods the HTTP parser knows and no route takes
        assert (await client.request(method, "/predict")).status == 405
    text = await (await client.get("/metrics")).text()
    assert metric(text, 'zypher_http_requests_total{method="other",route="unmatched",status="405"}') == 3
    assert "PROPFIND" not in text


# -- logs -----------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_json_logs_one_line_per_request_and_state_change_without_inputs_or_tokens() -> None:
    secret_input = "very-private-input-value"
    args = (
        "--model",
        "mock",
        "--store",
        "memory://",
        "--log-format",
        "json",
        "--api-token",
        TOKEN,
        "--log-level",
        "DEBUG",
    )
    async with run_server(*args) as server, aiohttp.ClientSession(server.url, headers=AUTH) as http:
        resp = await http.post("/predict", json={"input": {"text": secret_input}})
        pid = (await resp.json())["prediction_id"]
        await http.get(f"/predict/{pid}")
    lines = [json.loads(line) for line in server.log if line.strip()]  # every line is one JSON object
    requests = [e for e in lines if e.get("path", "").startswith("/predict")]
    assert [(e["method"], e["status"], e["prediction_id"]) for e in requests] == [
        ("POST", 200, pid),
        ("GET", 200, pid),
    ]
    assert all(e["duration_ms"] >= 0 and e["level"] == "INFO" for e in requests)
    changes = [
        (e["status"], e["level"]) for e in lines if e["logger"] == "zypher_ws.predictions" and e["prediction_id"] == pid
    ]
    assert changes == [("queued", "DEBUG"), ("running", "DEBUG"), ("succeeded", "DEBUG")]  # the normal lifecycle
    text = "".join(server.log)
    assert secret_input not in text and TOKEN not in text


def test_text_lines_are_what_logging_would_write() -> None:
    """TextFormatter writes its own format as one f-string: the line must be logging's, byte for byte."""
    ours, theirs = TextFormatter(TEXT_FORMAT), logging.Formatter(TEXT_FORMAT)
    record = logging.LogRecord("zypher_ws.x", logging.WARNING, "", 0, "queued %d of %s", (3, "p"), None)
    record.created, record.msecs = 1_764_000_000.25, 250.0
    assert ours.format(record) == theirs.format(record)
    assert ours.format(record) == theirs.formatTime(record) + " WARNING zypher_ws.x: queued 3 of p"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("zypher_ws.x", logging.ERROR, "", 0, "failed", None, sys.exc_info())
    text = ours.format(failed)
    assert text.startswith(ours.formatTime(failed) + " ERROR zypher_ws.x: failed\nTraceback") and "boom" in text


def test_access_line_names_the_request_and_its_prediction() -> None:
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("zypher_ws.tests.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        response = web.Response(status=202)
        response[PREDICTION_ID] = "p-1"
        access = AccessLogger(logger, "")
        access.log(make_mocked_request("POST", "/predict?secret=1"), response, 0.01234)
        access.log(make_mocked_request("GET", "/healthz"), web.Response(), 0.0005)
    finally:
        logger.removeHandler(handler)
    assert [(r.levelno, r.name, r.getMessage()) for r in records] == [
        (logging.INFO, logger.name, "POST /predict 202 12.3 ms prediction p-1"),
        (logging.INFO, logger.name, "GET /healthz 200 0.5 ms"),
    ]
    assert records[0].fields == {  # type: ignore[attr-defined]
        "method": "POST", "path": "/predict", "status": 202, "duration_ms": 12.34, "remote": None,
        "prediction_id": "p-1",
    }  # fmt: skip


async def test_malformed_http_is_logged_at_info_without_a_traceback() -> None:
    async with run_server("--model", "mock", "--store", "memory://") as server:
        port = int(server.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization\x01: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), WAIT)  # aiohttp answers 400 and closes
        writer.close()
        assert answer.startswith(b"HTTP/1.0 400 Bad Request")
        async with aiohttp.ClientSession() as http:  # a request after it, so its log line has been written
            assert (await http.get(server.url + "/healthz")).status == 200
    text = "".join(server.log)
    lines = [line for line in server.log if "aiohttp.server" in line]
    assert len(lines) == 1 and " INFO aiohttp.server: " in lines[0], text
    assert "Traceback" not in text and "ERROR" not in text
    assert TOKEN not in text  # the line names the kind of error, never the bytes sent


# -- tokens ----------------------------------------------------------------------------------------------


async def test_tokens_guard_every_route_but_page_health_and_metrics(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False), api_tokens=(TOKEN,))
    for path in ("/", "/static/app.js", "/healthz", "/readyz", "/metrics"):
        assert (await client.get(path)).status == 200, path
    for method, path in (("GET", "/predict/x"), ("POST", "/predict"), ("GET", "/model"), ("GET", "/swagger")):
        resp = await client.request(method, path, json={"input": {"x": 1}})
        assert resp.status == 401, path
        assert (await resp.json())["error"]["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    wrong = await client.post("/predict", json={"input": {"x": 1}}, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    ok = await client.post("/predict", json={"input": {"x": 1}}, headers=AUTH)
    assert ok.status == 200


async def test_metrics_can_require_a_token_too(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False), api_tokens=(TOKEN,), metrics_need_token=True)
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=AUTH)).status == 200


async def test_websocket_takes_the_token_in_its_first_message_or_protocol_header(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False), api_tokens=(TOKEN,))
    async with client.ws_connect("/ws") as ws:  # first message is not auth: closed with 1008
        await ws.send_json({"op": "ping"})
        assert (await ws.receive(timeout=WAIT)).type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
        assert ws.close_code == 1008
    async with client.ws_connect(f"/ws?token={TOKEN}") as ws:  # never in the URL
        await ws.send_json({"op": "auth", "token": "wrong"})
        await ws.receive(timeout=WAIT)
        assert ws.close_code == 1008
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "auth", "token": TOKEN})
        assert (await ws.receive_json(timeout=WAIT)) == {"type": "authenticated"}
        await ws.send_json({"op": "predict", "input": {"x": 1}})
        assert (await ws.receive_json(timeout=WAIT))["type"] == "accepted"
    async with client.ws_connect("/ws", protocols=("zypher", f"bearer.{TOKEN}")) as ws:
        assert ws.protocol == "zypher"
        await ws.send_json({"op": "ping"})
        assert (await ws.receive_json(timeout=WAIT)) == {"type": "pong"}


async def test_websocket_auth_deadline_is_not_extended_by_pings(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket that never authenticates but pings all the time is still closed at the deadline."""
    monkeypatch.setattr(live, "AUTH_TIMEOUT", 0.3)
    client = await make_client(model=GatedModel(gated=False), api_tokens=(TOKEN,))
    assert client.server.port is not None
    raw = await RawWebSocket.connect("127.0.0.1", client.server.port)

    async def ping_until_closed() -> int:
        while True:  # each pong is answered with the next ping, as fast as the server answers
            raw.send_frame(0x9, b"still here")
            opcode, payload = await raw.read_frame()
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0])
            assert opcode == 0xA

    try:
        assert await asyncio.wait_for(ping_until_closed(), WAIT) == 1008
    finally:
        raw.close()


async def unauthenticated(client: TestClient) -> aiohttp.ClientWebSocketResponse:
    """A socket that upgraded without a token and has not sent its auth message (yet)."""
    return await client.ws_connect("/ws")


async def test_sockets_still_authenticating_do_not_lock_out_an_address(make_client: ClientFactory) -> None:
    client = await make_client(
        model=GatedModel(gated=False), api_tokens=(TOKEN,), ws_max_per_client=2, ws_max_authenticating=2
    )
    idle = [await unauthenticated(client), await unauthenticated(client)]
    with pytest.raises(WSServerHandshakeError) as refused:  # their own cap
        await unauthenticated(client)
    assert refused.value.status == 429
    # Users of the same address still get in, up to --ws-max-per-client, by header or by first message.
    by_header = await client.ws_connect("/ws", protocols=("zypher", f"bearer.{TOKEN}"))
    await idle[0].send_json({"op": "auth", "token": TOKEN})
    assert (await idle[0].receive_json(timeout=WAIT)) == {"type": "authenticated"}
    for ws in (by_header, idle[0]):
        await ws.send_json({"op": "ping"})
        assert (await ws.receive_json(timeout=WAIT)) == {"type": "pong"}
    # The address is now at --ws-max-per-client: a third authenticated socket is turned away...
    with pytest.raises(WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", protocols=("zypher", f"bearer.{TOKEN}"))
    assert refused.value.status == 429
    # ...and so is one that authenticates by message, closed with 1013 after its auth.
    await idle[1].send_json({"op": "auth", "token": TOKEN})
    assert (await idle[1].receive(timeout=WAIT)).type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
    assert idle[1].close_code == 1013
    await asyncio.gather(by_header.close(), idle[0].close(), idle[1].close())


# -- origins and limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://127.0.0.1.evil.example", "http://127.0.0.1:1", "https://localhost"],
)
async def test_websocket_refuses_foreign_origins_before_upgrading(make_client: ClientFactory, origin: str) -> None:
    client = await make_client(model=GatedModel(gated=False))
    with pytest.raises(WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", headers={"Origin": origin})
    assert refused.value.status == 403


async def test_websocket_accepts_its_own_origin_and_the_allowlist(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False), ws_allowed_origins=("https://app.example",))
    own = f"http://{client.server.host}:{client.server.port}"
    for origin in (own, "https://app.example", "https://APP.example/"):
        async with client.ws_connect("/ws", headers={"Origin": origin}) as ws:
            await ws.send_json({"op": "ping"})
            assert (await ws.receive_json(timeout=WAIT)) == {"type": "pong"}


async def test_public_origin_replaces_the_host_comparison(make_client: ClientFactory) -> None:
    """A DNS-rebinding page sends its own origin and a Host that matches it; with --public-origin set, the
    Host is never trusted."""
    client = await make_client(
        model=GatedModel(gated=False),
        public_origins=("https://api.example.com",),
        ws_allowed_origins=("https://app.example",),
    )
    for origin in ("https://api.example.com", "https://API.example.com:443", "https://app.example"):
        async with client.ws_connect("/ws", headers={"Origin": origin}) as ws:
            await ws.send_json({"op": "ping"})
            assert (await ws.receive_json(timeout=WAIT)) == {"type": "pong"}
    own = f"http://{client.server.host}:{client.server.port}"
    rebound = {"Origin": "http://evil.example:8080", "Host": "evil.example:8080"}
    for headers in ({"Origin": own}, rebound, {"Origin": "http://api.example.com"}):
        with pytest.raises(WSServerHandshakeError) as refused:
            await client.ws_connect("/ws", headers=headers)
        assert refused.value.status == 403, headers


@pytest.mark.parametrize("bad", ["api.example.com", "https://api.example.com/app", "ftp://x", "https://"])
def test_a_public_origin_is_scheme_host_and_port(bad: str) -> None:
    with pytest.raises(ValueError, match="public origin"):
        Settings(public_origins=(bad,))


async def test_without_public_origin_the_host_decides(make_client: ClientFactory) -> None:
    """Today's behaviour, kept, and the DNS-rebinding caveat docs/operating.md states."""
    client = await make_client(model=GatedModel(gated=False))
    async with client.ws_connect("/ws", headers={"Origin": "http://evil.example:8080", "Host": "evil.example:8080"}):
        pass


async def test_rate_limit_per_client_answers_429_with_retry_after(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False), rate_limit=0.5, rate_burst=2)
    statuses = [(await client.post("/predict", json={"input": {"x": i}}, headers={"Async-Mode": "true"})).status
                for i in range(2)]  # fmt: skip
    assert statuses == [202, 202]
    resp = await client.post("/predict", json={"input": {"x": 9}}, headers={"Async-Mode": "true"})
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "rate_limited"
    async with client.ws_connect("/ws") as ws:  # the WebSocket's predict op counts too
        await ws.send_json({"op": "predict", "input": {"x": 10}, "request_id": "r"})
        error = await ws.receive_json(timeout=WAIT)
        assert error["type"] == "error" and error["error"]["code"] == "rate_limited" and error["request_id"] == "r"


async def test_sockets_per_client_are_limited(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False), ws_max_per_client=2)
    first, second = await client.ws_connect("/ws"), await client.ws_connect("/ws")
    with pytest.raises(WSServerHandshakeError) as refused:
        await client.ws_connect("/ws")
    assert refused.value.status == 429
    await first.close()
    third = await client.ws_connect("/ws")  # a closed one frees its place
    await asyncio.gather(second.close(), third.close())


async def test_event_streams_share_the_per_client_cap(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated, ws_max_per_client=2)
    record = await (await client.post("/predict", json={"input": {"x": 1}}, headers={"Async-Mode": "true"})).json()
    events = f"/predict/{record['prediction_id']}/events"
    stream = await client.get(events)
    assert stream.status == 200
    ws = await client.ws_connect("/ws")
    refused = await client.get(events)
    assert refused.status == 429 and (await refused.json())["error"]["code"] == "too_many_sockets"
    with pytest.raises(WSServerHandshakeError) as upgrade:
        await client.ws_connect("/ws")
    assert upgrade.value.status == 429
    gated.release.set()
    await asyncio.wait_for(stream.read(), WAIT)  # the stream ends after the terminal event...
    again = await client.get(events)  # ...and frees its place
    assert again.status == 200
    await asyncio.wait_for(again.read(), WAIT)
    await ws.close()


# -- static files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/static/../setup.cfg", "/static/%2e%2e/setup.cfg", "/static/..%2fsetup.cfg", "/static/%2e%2e%2fsetup.cfg",
     "/static/....//setup.cfg", "/static/%252e%252e/setup.cfg", "/static/..\\setup.cfg"],
)  # fmt: skip
async def test_no_path_traversal_out_of_static(make_client: ClientFactory, path: str) -> None:
    client = await make_client(model=GatedModel(gated=False))
    resp = await client.get(URL(path, encoded=True))
    # Page files are looked up by name in a fixed list, so nothing is "forbidden": a name not on it (or
    # a path the router does not take) is the API's JSON 404, the same as for any missing file.
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    assert "[metadata]" not in await resp.text()


async def test_security_headers_on_page_and_static_files(make_client: ClientFactory) -> None:
    client = await make_client(model=MockModel())
    for path in ("/", "/static/app.js", "/static/style.css"):
        resp = await client.get(path)
        assert resp.status == 200
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
    for missing in ("/static/nope.js", "/static/", "/static/static/app.js"):
        resp = await client.get(missing)  # the API's own 404, not aiohttp's bare one
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found", missing
    assert "Content-Security-Policy" not in (await client.get("/healthz")).headers  # page files only


def test_a_string_app_key_is_an_error_even_after_the_app_is_built() -> None:
    """The swagger library's string keys are let through where it sets them, and nowhere else."""
    app = create_app(make_settings(), model=MockModel())
    with pytest.raises(web.NotAppKeyWarning):
        app["state"] = 1


async def test_serve_freezes_what_startup_made_and_collects_less_often() -> None:
    app = web.Application()
    thresholds = gc.get_threshold()
    try:
        await app_module._freeze_startup_objects(app)
        assert gc.get_freeze_count() > 0  # the app, modules and services: out of every collection
        assert gc.get_threshold() == app_module.GC_THRESHOLDS
        assert app_module.GC_THRESHOLDS[0] > thresholds[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
