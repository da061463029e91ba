"""Webhooks through the API, to a real receiver (an aiohttp server on a free port of 127.0.0.1, so the
service is started with --webhook-allow-private unless a test checks the refusal). Deliveries are
verified with the Standard Webhooks reference library; retries are driven by a clock the test moves."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient
from standardwebhooks import Webhook as Verifier

from fakes import WAIT, GatedModel, ManualClock, SteppedStream
from helpers import ClientFactory, Delivered, Receiver, stored_count
from zypher_ws.http.keys import SERVICE, WEBHOOKS
from zypher_ws.records import rfc3339
from zypher_ws.webhooks import transport as transport_module
from zypher_ws.webhooks.delivery import Dispatcher
from zypher_ws.webhooks.schedule import Settlement
from zypher_ws.webhooks.target import AddressPolicy
from zypher_ws.webhooks.transport import HttpTransport, guarded_socket_factory

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
ASYNC = {"Async-Mode": "true"}
HOOKS = {"webhook_secrets": (SECRET,), "webhook_allow_private": True}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


class Deliveries:
    """The app's delivery loop, on a clock the test moves, with every recorded attempt in a queue."""

    def __init__(self, client: TestClient) -> None:
        self.dispatcher: Dispatcher = client.app[WEBHOOKS]
        # Ahead of every event the test causes, so those are due at once; retries wait for `advance`.
        self.clock = ManualClock(time.time() + 3600)
        self.dispatcher.clock = self.clock
        self.dispatcher.jitter = lambda: 1.0
        self._settled: asyncio.Queue[Settlement] = asyncio.Queue()
        self.dispatcher.observers.append(self._settled.put_nowait)

    async def settled(self) -> Settlement:
        """The next attempt, once its outcome is written."""
        return await asyncio.wait_for(self._settled.get(), WAIT)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.dispatcher.wake()

    async def idle(self) -> None:
        """Until the loop has looked at the store once more and taken everything it could."""
        self.dispatcher.idle.clear()
        self.dispatcher.wake()
        await asyncio.wait_for(self.dispatcher.idle.wait(), WAIT)


async def submit(client: TestClient, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    resp = await client.post("/predict", json={"input": {"x": 1}, **body}, headers=headers or ASYNC)
    assert resp.status == 202, await resp.text()
    record: dict[str, Any] = await resp.json()
    return record


async def record_of(client: TestClient, pid: str) -> dict[str, Any]:
    resp = await client.get(f"/predict/{pid}")
    assert resp.status == 200
    record: dict[str, Any] = await resp.json()
    return record


def verified(delivery: Delivered, secret: str = SECRET) -> Any:
    return Verifier(secret).verify(delivery.body, delivery.headers)


async def test_start_and_completed_arrive_signed_for_each_secret(
    make_client: ClientFactory, receiver: Receiver, gated: GatedModel
) -> None:
    client = await make_client(model=gated, **{**HOOKS, "webhook_secrets": (SECRET, OLD_SECRET)})
    hooks = Deliveries(client)
    accepted = await submit(client, {"webhook": receiver.url(), "webhook_events_filter": ["start", "completed"]})
    pid = accepted["prediction_id"]
    assert accepted["webhook"] == {
        "url": receiver.url(), "events": ["start", "completed"], "event": None, "state": None, "attempts": 0,
        "last_status": None, "last_error": None, "next_attempt_at": None, "delivered_at": None,
    }  # fmt: skip

    start = await receiver.next()  # the model is held: the prediction is running
    assert start.headers["webhook-id"] == f"msg_{pid}_start"
    assert start.headers["Content-Type"] == "application/json"
    for secret in (SECRET, OLD_SECRET):
        payload = verified(start, secret)
    assert payload["type"] == "prediction.start" and payload["data"]["status"] == "running"
    assert payload["data"]["prediction_id"] == pid and payload["timestamp"] == payload["data"]["started_at"]
    await hooks.settled()

    gated.release.set()
    completed = await receiver.next()
    payload = verified(completed, OLD_SECRET)
    assert completed.headers["webhook-id"] == f"msg_{pid}_completed"
    assert payload["type"] == "prediction.completed" and payload["data"]["status"] == "succeeded"
    assert payload["data"]["result"] == {"echo": {"x": 1}}
    assert payload["timestamp"] == payload["data"]["completed_at"]
    assert (await record_of(client, pid))["status"] == "succeeded"  # the record said so first
    settled = await hooks.settled()
    webhook = (await record_of(client, pid))["webhook"]
    assert (webhook["event"], webhook["state"], webhook["attempts"], webhook["last_status"]) == (
        "completed", "delivered", 1, 200
    )  # fmt: skip
    assert webhook["delivered_at"] == rfc3339(settled.at) and webhook["next_attempt_at"] is None
    assert len(receiver.got) == 2


async def test_only_completed_by_default_and_output_sends_nothing_for_a_model_that_does_not_stream(
    make_client: ClientFactory, receiver: Receiver, gated: GatedModel
) -> None:
    client = await make_client(model=gated, **HOOKS)
    hooks = Deliveries(client)
    default = await submit(client, {"webhook": receiver.url("/default")})
    output = await submit(client, {"webhook": receiver.url("/output"), "webhook_events_filter": ["output"]})
    assert output["webhook"]["events"] == ["output"]
    await gated.wait_started()
    gated.release.set()
    (only,) = [await receiver.next()]
    assert only.path_qs == "/default" and verified(only)["type"] == "prediction.completed"
    await hooks.settled()
    for pid in (output["prediction_id"], default["prediction_id"]):
        assert (await client.app[SERVICE].wait(pid, WAIT)).status.terminal
    # Both finished, and a delivery is written with the change that causes it: no other is pending.
    assert await client.app[SERVICE].store.pending_webhooks() == 0  # type: ignore[attr-defined]
    assert [d.path_qs for d in receiver.got] == ["/default"]


async def test_a_stream_sends_output_with_the_chunks_so_far_retried_like_any_event_then_completed(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    words = ["a ", "b ", "c ", "d "]
    model = SteppedStream(words)
    model.bind(asyncio.get_running_loop())
    client = await make_client(model=model, **HOOKS, webhook_retry_delays="5,300", stream_commit_ms=0)
    hooks = Deliveries(client)
    receiver.answers = [500]  # the first output fails once
    body = {"input": {}, "stream": True, "webhook": receiver.url(), "webhook_events_filter": ["output", "completed"]}
    pid = (await submit(client, body))["prediction_id"]

    model.allow(1)
    first = await receiver.next()
    payload = verified(first)
    assert first.headers["webhook-id"] == f"msg_{pid}_output_1"
    assert payload["type"] == "prediction.output" and payload["data"]["status"] == "running"
    assert payload["data"]["result"] == ["a "]  # the chunks so far
    assert (await hooks.settled()).outcome == "pending"  # retried, on the schedule
    hooks.advance(5)
    retried = await receiver.next()
    assert retried.headers["webhook-id"] == first.headers["webhook-id"] and retried.body == first.body
    await hooks.settled()

    model.allow(len(words) - 1)
    while verified(await receiver.next())["type"] != "prediction.completed":
        pass  # outputs (from before the end) and the completed, in any order
    await hooks.idle()
    got = [verified(d) for d in receiver.got]
    ids = [d.headers["webhook-id"] for d in receiver.got]
    (completed,) = [p for p in got if p["type"] == "prediction.completed"]  # in any order with the outputs
    assert completed["data"]["result"] == words and ids.count(f"msg_{pid}_completed") == 1
    outputs = [(i, p) for i, p in zip(ids, got, strict=True) if p["type"] == "prediction.output"]
    for ident, event in outputs:  # each names its chunk count, and carries that many, the first ones
        count = int(ident.rsplit("_", 1)[1])
        assert event["data"]["result"] == words[:count]
    stamps = sorted({time_of(p["timestamp"]) for _, p in outputs})
    assert all(b - a >= 0.499 for a, b in itertools.pairwise(stamps))  # at most every 500 ms (stamps in ms)


def time_of(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt_on_schedule(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    client = await make_client(model=GatedModel(gated=False), **HOOKS, webhook_retry_delays="5,300,1800")
    hooks = Deliveries(client)
    factors = iter([1.2, 0.8])
    hooks.dispatcher.jitter = lambda: next(factors)
    receiver.answers = [500, 502]
    pid = (await submit(client, {"webhook": receiver.url()}))["prediction_id"]

    first = await receiver.next()
    await hooks.settled()
    webhook = (await record_of(client, pid))["webhook"]
    assert (webhook["state"], webhook["attempts"], webhook["last_status"]) == ("pending", 1, 500)
    assert webhook["next_attempt_at"] == rfc3339(hooks.clock.now + 6.0)  # 5 s, stretched by the jitter
    store = client.app[SERVICE].store
    hooks.clock.advance(5.9)
    assert await store.due_webhooks(hooks.clock(), 10) == []  # type: ignore[attr-defined]

    hooks.advance(0.1)
    second = await receiver.next()
    await hooks.settled()
    webhook = (await record_of(client, pid))["webhook"]
    assert (webhook["attempts"], webhook["last_status"]) == (2, 502)
    assert webhook["next_attempt_at"] == rfc3339(hooks.clock.now + 240.0)  # 300 s, shrunk by the jitter

    hooks.advance(240)
    third = await receiver.next()
    settled = await hooks.settled()
    webhook = (await record_of(client, pid))["webhook"]
    assert (webhook["state"], webhook["attempts"], webhook["last_status"]) == ("delivered", 3, 200)
    assert webhook["delivered_at"] == rfc3339(settled.at) and webhook["next_attempt_at"] is None
    # One event: one id, and the same signed bytes on every attempt.
    assert {d.headers["webhook-id"] for d in (first, second, third)} == {f"msg_{pid}_completed"}
    assert first.body == second.body == third.body and verified(third)["data"]["status"] == "succeeded"
    hooks.advance(10**6)
    await hooks.idle()
    assert len(receiver.got) == 3


async def test_410_gone_stops_the_retries_of_that_event(make_client: ClientFactory, receiver: Receiver) -> None:
    client = await make_client(model=GatedModel(gated=False), **HOOKS)
    hooks = Deliveries(client)
    receiver.answers = [410]
    pid = (await submit(client, {"webhook": receiver.url()}))["prediction_id"]
    await receiver.next()
    await hooks.settled()
    webhook = (await record_of(client, pid))["webhook"]
    assert (webhook["state"], webhook["attempts"], webhook["last_status"]) == ("gone", 1, 410)
    assert webhook["next_attempt_at"] is None
    hooks.advance(10**6)
    await hooks.idle()
    assert len(receiver.got) == 1
    assert await client.app[SERVICE].store.pending_webhooks() == 0  # type: ignore[attr-defined]


async def test_retry_after_is_honoured_and_a_redirect_is_not_followed(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    client = await make_client(model=GatedModel(gated=False), **HOOKS)
    hooks = Deliveries(client)
    receiver.answers = [(503, {"Retry-After": "120"}), (307, {"Location": receiver.url("/elsewhere")})]
    pid = (await submit(client, {"webhook": receiver.url()}))["prediction_id"]
    await receiver.next()
    await hooks.settled()
    webhook = (await record_of(client, pid))["webhook"]
    assert webhook["last_status"] == 503 and webhook["next_attempt_at"] == rfc3339(hooks.clock.now + 120)
    hooks.advance(120)
    await receiver.next()
    await hooks.settled()  # recorded after the answer: a redirect followed would have arrived before this
    webhook = (await record_of(client, pid))["webhook"]
    assert (webhook["state"], webhook["attempts"], webhook["last_status"]) == ("pending", 2, 307)
    assert [d.path_qs for d in receiver.got] == ["/hook", "/hook"]


async def test_after_the_last_attempt_the_event_is_dead_lettered_in_the_record_and_metrics(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    client = await make_client(model=GatedModel(gated=False), **HOOKS, webhook_retry_delays="1,2")
    hooks = Deliveries(client)
    receiver.answers = [500, 500, 500]
    pid = (await submit(client, {"webhook": receiver.url()}))["prediction_id"]
    for wait in (1, 2, None):
        await receiver.next()
        await hooks.settled()
        if wait is not None:
            hooks.advance(wait)
    webhook = (await record_of(client, pid))["webhook"]
    assert (webhook["state"], webhook["attempts"], webhook["last_status"]) == ("dead_lettered", 3, 500)
    assert webhook["next_attempt_at"] is None and webhook["delivered_at"] is None
    hooks.advance(10**6)
    await hooks.idle()
    assert len(receiver.got) == 3
    metrics = await (await client.get("/metrics")).text()
    assert 'zypher_webhook_dead_letters_total{event="completed"} 1.0' in metrics
    assert 'zypher_webhook_deliveries_total{event="completed",outcome="dead_lettered"} 1.0' in metrics
    assert 'zypher_webhook_attempts_total{event="completed",result="5xx"} 3.0' in metrics


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"webhook": "ftp://example.com/hook"}, "http:// or https://"),
        ({"webhook": "https://user:secret@example.com/hook"}, "credentials"),
        ({"webhook": "https://example.com/" + "x" * 2048}, "longer than 2048"),
        ({"webhook": "https://example.com/h", "webhook_events_filter": ["done"]}, "unknown webhook events"),
        ({"webhook": 7}, "a string"),
        ({"webhook": "http://127.0.0.1:9/hook"}, "--webhook-allow-private"),
        ({"webhook": "http://[::1]:9/hook"}, "--webhook-allow-private"),
        ({"webhook": "http://169.254.169.254/latest/meta-data/"}, "--webhook-allow-private"),
        ({"webhook": "http://localhost:9/hook"}, "--webhook-allow-private"),
        ({"webhook": "https://elsewhere.example/hook"}, "--webhook-allowed-host"),
    ],
)
async def test_a_bad_webhook_is_400_invalid_webhook_and_nothing_is_stored(
    make_client: ClientFactory, body: dict[str, Any], message: str
) -> None:
    client = await make_client(
        model=GatedModel(), webhook_secrets=(SECRET,), webhook_allowed_hosts=("*.example.com", "127.0.0.1", "::1",
        "169.254.169.254", "localhost", "example.com"),
    )  # fmt: skip
    for headers in (ASYNC, {}):
        resp = await client.post("/predict", json={"input": {"x": 1}, **body}, headers=headers)
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_webhook" and message in error["message"]
        assert "user:secret" not in error["message"]
    assert await stored_count(client.app) == 0


async def test_without_a_secret_the_service_sends_no_webhooks(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel())
    assert WEBHOOKS not in client.app
    resp = await client.post("/predict", json={"input": {"x": 1}, "webhook": "https://example.com/h"}, headers=ASYNC)
    assert resp.status == 400 and "--webhook-secret" in (await resp.json())["error"]["message"]
    assert await stored_count(client.app) == 0


class MapResolver(AbstractResolver):
    """Resolves names from a table, as a DNS server that answers what the test says."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        return [{"hostname": host, "host": self.table[host], "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]  # fmt: skip

    async def close(self) -> None:
        pass


async def test_a_name_that_resolves_to_a_private_address_is_refused_at_delivery(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    client = await make_client(model=GatedModel(gated=False), webhook_secrets=(SECRET,))  # private refused
    hooks = Deliveries(client)
    names = MapResolver({"hooks.example.com": "127.0.0.1"})
    async with HttpTransport(AddressPolicy(), timeout=5, connections=4, resolver=names) as guarded:
        hooks.dispatcher.transport = guarded
        pid = (await submit(client, {"webhook": f"http://hooks.example.com:{receiver.port}/hook"}))["prediction_id"]
        settled = await hooks.settled()
    assert settled.attempt.error == "address_not_allowed"
    webhook = (await record_of(client, pid))["webhook"]
    assert (webhook["state"], webhook["attempts"], webhook["last_error"]) == ("dead_lettered", 1, "address_not_allowed")
    assert receiver.got == []
    metrics = await (await client.get("/metrics")).text()
    assert 'zypher_webhook_attempts_total{event="completed",result="address_not_allowed"} 1.0' in metrics
    # The same name and receiver, where private addresses are allowed: the refusal was the policy's.
    allowing = AddressPolicy(allow_private=True)
    async with HttpTransport(allowing, timeout=5, connections=4, resolver=names) as open_transport:
        hooks.dispatcher.transport = open_transport
        await submit(client, {"webhook": f"http://hooks.example.com:{receiver.port}/hook"})
        assert verified(await receiver.next())["type"] == "prediction.completed"
        await hooks.settled()


async def test_the_guard_checks_every_address_at_connect_time_too(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, headers = b"{}", {"Content-Type": "application/json"}
    names = MapResolver({"rebound.example.com": "127.0.0.1"})
    async with HttpTransport(AddressPolicy(), timeout=5, connections=4, resolver=names) as guarded:
        # A literal address never reaches a resolver (aiohttp connects to it directly): the socket refuses it.
        assert (await guarded.post(receiver.url(), body, headers)).error == "address_not_allowed"

        # A name that passed a lookup, then resolved elsewhere (DNS rebinding), as if the resolver's own
        # check had seen the first answer: what is connected to is checked again.
        async def unchecked(self: Any, host: str, port: int = 0, family: Any = socket.AF_INET) -> Any:
            return await self._inner.resolve(host, port, family)

        monkeypatch.setattr(transport_module.GuardedResolver, "resolve", unchecked)
        url = f"http://rebound.example.com:{receiver.port}/hook"
        assert (await guarded.post(url, body, headers)).error == "address_not_allowed"
    assert receiver.got == []
    with pytest.raises(OSError, match="not an address webhooks may reach"):
        guarded_socket_factory(AddressPolicy())((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 80)))
    async with HttpTransport(AddressPolicy(allow_private=True), timeout=5, connections=4) as allowing:
        assert (await allowing.post(receiver.url(), body, headers)).status == 200
    async with HttpTransport(AddressPolicy(allow_private=True), timeout=5, connections=4) as refused:
        await receiver.stop()
        assert (await refused.post(receiver.url(), body, headers)).error == "connection_error"


async def test_a_slow_receiver_holds_up_neither_the_bound_nor_other_receivers(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    client = await make_client(model=GatedModel(gated=False), **HOOKS, webhook_concurrency=8)  # 2 per host
    hooks = Deliveries(client)
    receiver.hold = asyncio.Event()
    for _ in range(10):  # more than the whole bound: without a share per host they would take every slot
        await submit(client, {"webhook": receiver.url("/slow")})
    await receiver.next()
    await receiver.next()
    async with Receiver() as fast:
        await submit(client, {"webhook": fast.url("/fast")})
        assert verified(await fast.next())["type"] == "prediction.completed"  # past the slow host's queue
        await hooks.settled()
    await hooks.idle()
    assert hooks.dispatcher.in_flight == 2 and len(receiver.got) == 2  # the slow host's share, no more
    assert await client.app[SERVICE].store.pending_webhooks() == 10  # type: ignore[attr-defined]
    receiver.hold.set()
    for _ in range(10):
        await hooks.settled()
        hooks.advance(1.0)  # on Redis a delivery passed over for its host's share is due again a second later
    assert len(receiver.got) == 10 and await client.app[SERVICE].store.pending_webhooks() == 0  # type: ignore[attr-defined]


async def test_a_sync_prediction_with_a_webhook_is_sent_it(
    make_client: ClientFactory, receiver: Receiver, tmp_path: Any
) -> None:
    # SQLite writes a sync prediction without a key once, finished: its delivery goes in that write.
    client = await make_client(model=GatedModel(gated=False), **HOOKS, store=f"sqlite:///{tmp_path / 'z.db'}")
    hooks = Deliveries(client)
    resp = await client.post("/predict", json={"input": {"x": 2}, "webhook": receiver.url()})
    assert resp.status == 200
    pid = (await resp.json())["prediction_id"]
    assert verified(await receiver.next())["data"]["prediction_id"] == pid
    await hooks.settled()
    both = await client.post(
        "/predict", json={"input": {"x": 3}, "webhook": receiver.url(), "webhook_events_filter": ["start", "completed"]}
    )
    assert both.status == 200
    types = sorted([verified(await receiver.next())["type"], verified(await receiver.next())["type"]])
    assert types == ["prediction.completed", "prediction.start"]


async def test_the_websocket_predict_op_takes_a_webhook(make_client: ClientFactory, receiver: Receiver) -> None:
    client = await make_client(model=GatedModel(gated=False), **HOOKS)
    Deliveries(client)
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "predict", "input": {"x": 1}, "webhook": "ftp://x/", "request_id": "bad"})
        error = await ws.receive_json(timeout=WAIT)
        assert (error["type"], error["error"]["code"], error["request_id"]) == ("error", "invalid_webhook", "bad")
        await ws.send_json({"op": "predict", "input": {"x": 1}, "webhook": receiver.url(), "request_id": "ok"})
        accepted = await ws.receive_json(timeout=WAIT)
        assert accepted["type"] == "accepted" and accepted["prediction"]["webhook"]["events"] == ["completed"]
    payload = verified(await receiver.next())
    assert payload["data"]["prediction_id"] == accepted["prediction"]["prediction_id"]


async def test_an_idempotency_key_covers_the_webhook(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(), **HOOKS)
    headers = {**ASYNC, "Idempotency-Key": "k-1"}
    first = await submit(client, {"webhook": "https://a.example.com/h"}, headers)
    again = await submit(client, {"webhook": "https://a.example.com/h"}, headers)
    assert again["prediction_id"] == first["prediction_id"]
    other = await client.post(
        "/predict", json={"input": {"x": 1}, "webhook": "https://b.example.com/h"}, headers=headers
    )
    assert other.status == 409 and (await other.json())["error"]["code"] == "idempotency_conflict"


async def test_neither_secrets_nor_query_strings_reach_records_or_logs(
    make_client: ClientFactory, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(model=GatedModel(gated=False), **HOOKS)
    hooks = Deliveries(client)
    receiver.answers = [500]
    record = await submit(client, {"webhook": receiver.url("/hook?token=t0ps3cret#frag")})
    assert record["webhook"]["url"] == receiver.url("/hook")
    got = await receiver.next()
    assert got.path_qs == "/hook?token=t0ps3cret"  # the delivery itself uses the whole URL
    await hooks.settled()
    assert (await record_of(client, record["prediction_id"]))["webhook"]["url"] == receiver.url("/hook")
    assert f"to {receiver.url('/hook')}: HTTP 500 on attempt 1; next in 5 s" in caplog.text  # it was logged
    assert "t0ps3cret" not in caplog.text and SECRET not in caplog.text and SECRET[6:] not in caplog.text


async def test_the_openapi_document_describes_the_webhook_fields(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel())
    spec = await (await client.get("/swagger/swagger.json")).json()
    request = spec["components"]["schemas"]["PredictRequest"]["properties"]
    assert request["webhook"]["maxLength"] == 2048
    assert request["webhook_events_filter"]["items"]["enum"] == ["start", "output", "completed"]
    state = spec["components"]["schemas"]["Prediction"]["properties"]["webhook"]
    assert state["nullable"] and set(state["required"]) >= {"url", "events", "attempts", "last_status"}


async def test_a_canceled_prediction_sends_completed_with_its_canceled_record(
    make_client: ClientFactory, receiver: Receiver, gated: GatedModel
) -> None:
    client = await make_client(model=gated, **HOOKS)
    hooks = Deliveries(client)
    pid = (await submit(client, {"webhook": receiver.url()}))["prediction_id"]
    await gated.wait_started()
    assert (await client.delete(f"/predict/{pid}")).status == 200
    payload = verified(await receiver.next())
    assert (payload["type"], payload["data"]["status"]) == ("prediction.completed", "canceled")
    await hooks.settled()
    gated.release.set()  # its outcome is discarded, and sends nothing more
    assert (await client.app[SERVICE].wait(pid, WAIT)).status.value == "canceled"
    await hooks.idle()
    assert len(receiver.got) == 1


async def test_a_restart_without_a_secret_says_that_deliveries_wait(
    make_client: ClientFactory, receiver: Receiver, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = f"sqlite:///{tmp_path / 'z.db'}"
    client = await make_client(model=GatedModel(gated=False), **HOOKS, store=store)
    Deliveries(client)
    receiver.answers = [500]
    await submit(client, {"webhook": receiver.url()})
    await receiver.next()
    await client.close()
    caplog.set_level(logging.WARNING)
    again = await make_client(model=GatedModel(gated=False), store=store)
    assert WEBHOOKS not in again.app
    assert "1 webhook deliveries wait in the store; without --webhook-secret none is sent" in caplog.text


async def test_the_model_routes_take_a_webhook(make_client: ClientFactory, receiver: Receiver) -> None:
    client = await make_client(model=GatedModel(gated=False), **HOOKS)
    Deliveries(client)
    for path in ("/models/gated/predict", "/models/gated/versions/0.0.1/predict"):
        resp = await client.post(path, json={"input": {"x": 1}, "webhook": receiver.url(path)}, headers=ASYNC)
        assert resp.status == 202, await resp.text()
        delivered = await receiver.next()
        assert delivered.path_qs == path and verified(delivered)["data"]["model"] == {
            "name": "gated",
            "version": "0.0.1",
        }
    bad = await client.post("/models/gated/predict", json={"input": {"x": 1}, "webhook": "ftp://x/"}, headers=ASYNC)
    assert bad.status == 400 and (await bad.json())["error"]["code"] == "invalid_webhook"
