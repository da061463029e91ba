"""Webhooks without a server: the URL rules, the address policy, the signatures (checked with the
Standard Webhooks reference library), the retry schedule, and each store keeping pending deliveries
in the same transaction as the change that causes them."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from standardwebhooks import Webhook as Verifier
from standardwebhooks import WebhookVerificationError

from helpers import eventually
from zypher_ws import lifecycle
from zypher_ws.backends import KeepsWebhooks
from zypher_ws.backends.memory import MemoryStore
from zypher_ws.backends.redis.keys import RedisKeys
from zypher_ws.backends.redis.store import RedisStore
from zypher_ws.backends.sqlite import SQLiteStore
from zypher_ws.errors import InvalidWebhook, StorageFull
from zypher_ws.records import DEAD_LETTERED, DELIVERED, GONE, PENDING, Outcome, Prediction, Status, Webhook, rfc3339
from zypher_ws.settings import Settings
from zypher_ws.webhooks import schedule
from zypher_ws.webhooks.schedule import ADDRESS_NOT_ALLOWED, TIMEOUT, Attempt, Delivery, scheduled_by, settle
from zypher_ws.webhooks.signing import Signer, secret_key
from zypher_ws.webhooks.target import AddressPolicy, requested

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 24).decode()
URL = "https://hooks.example.com/zypher?token=s3cret"
DELAYS = (5.0, 300.0, 1800.0)


def with_webhook(*events: str, url: str = URL) -> Prediction:
    return Prediction.new({"x": 1}, model_name="m", model_version="1", webhook=Webhook(url, events or ("completed",)))


# -- what a request may ask for ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"webhook": "ftp://example.com/hook"}, "http:// or https://"),
        ({"webhook": "https://user:pw@example.com/hook"}, "credentials"),
        ({"webhook": "https://example.com/" + "a" * 2030}, "longer than 2048"),
        ({"webhook": "example.com/hook"}, "http:// or https://"),
        ({"webhook": "https:///hook"}, "needs a host"),
        ({"webhook": "https://example.com:99999/hook"}, "not a valid URL"),
        ({"webhook": "https://exa mple.com/"}, "spaces"),
        ({"webhook": 42}, "a string"),
        ({"webhook": URL, "webhook_events_filter": "completed"}, "a list"),
        ({"webhook": URL, "webhook_events_filter": []}, "a list of one or more"),
        ({"webhook": URL, "webhook_events_filter": ["finished"]}, "unknown webhook events ['finished']"),
        ({"webhook_events_filter": ["completed"]}, "needs a `webhook`"),
    ],
)
def test_a_bad_webhook_is_refused_with_the_reason(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidWebhook, match=message.replace("[", r"\[").replace("]", r"\]")) as refused:
        requested(body)
    assert refused.value.code == "invalid_webhook" and refused.value.status == 400


def test_a_good_webhook_keeps_its_events_in_lifecycle_order() -> None:
    assert requested({}) is None
    assert requested({"webhook": URL}).events == ("completed",)  # type: ignore[union-attr]
    both = requested({"webhook": URL, "webhook_events_filter": ["completed", "start", "completed"]})
    assert both is not None and both.events == ("start", "completed") and both.url == URL
    assert requested({"webhook": URL, "webhook_events_filter": ["output"]}).events == ("output",)  # type: ignore[union-attr]
    assert requested({"webhook": "http://example.com:8080/h"}) is not None
    assert requested({"webhook": "https://example.com/" + "a" * (2048 - 20)}) is not None  # 2048 exactly


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "255.255.255.255", "::1", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::",
        "2002:7f00:1::", "64:ff9b::a00:1", "not an address",
    ],
)  # fmt: skip
def test_addresses_that_are_not_public_unicast_are_refused_by_default(address: str) -> None:
    assert not AddressPolicy().address_allowed(address)
    assert AddressPolicy(allow_private=True).address_allowed(address) or address == "not an address"


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert AddressPolicy().address_allowed(address)


def test_the_submit_time_check_refuses_literal_private_addresses_localhost_and_unlisted_hosts() -> None:
    policy = AddressPolicy()
    for url in ("http://127.0.0.1:9000/hook", "http://[::1]/h", "http://10.0.0.7/h", "http://localhost/h",
                "http://api.localhost/h", "http://169.254.169.254/latest/meta-data"):  # fmt: skip
        with pytest.raises(InvalidWebhook, match="--webhook-allow-private"):
            policy.check(url)
    policy.check("https://hooks.example.com/h")  # a name: checked at every delivery, once resolved
    AddressPolicy(allow_private=True).check("http://127.0.0.1:9000/hook")
    only = AddressPolicy(allowed_hosts=("hooks.example.com", "*.internal.example"))
    only.check("https://HOOKS.example.com/h")
    only.check("https://a.b.internal.example/h")
    for url in ("https://example.com/h", "https://internal.example/h", "https://hooks.example.com.evil.io/h"):
        with pytest.raises(InvalidWebhook, match="--webhook-allowed-host"):
            only.check(url)


# -- signatures ---------------------------------------------------------------------------------------------


def test_deliveries_verify_with_the_reference_library_for_each_secret() -> None:
    body = b'{"type":"prediction.completed","timestamp":"2026-12-01T10:00:00.000Z","data":{"status":"succeeded"}}'
    now = int(time.time())
    headers = Signer([SECRET, OLD_SECRET]).headers("msg_abc_completed", now, body)
    assert headers["Content-Type"] == "application/json"
    assert headers["webhook-id"] == "msg_abc_completed" and headers["webhook-timestamp"] == str(now)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, OLD_SECRET):  # a receiver that knows either secret accepts it
        assert Verifier(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Verifier(SECRET).verify(body.replace(b"succeeded", b"failed"), headers)
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(WebhookVerificationError):
        Verifier(other).verify(body, headers)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("k" * 40, "starts with whsec_"),
        ("whsec_not base64!", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes, not 5"),
        ("whsec_" + base64.b64encode(b"k" * 65).decode(), "24 to 64 bytes, not 65"),
    ],
)
def test_a_bad_secret_is_refused_at_start_without_being_repeated(secret: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        secret_key(secret)
    with pytest.raises(ValueError, match="--webhook-secret") as refused:
        Settings(webhook_secrets=(secret,))
    assert secret not in str(refused.value)


def test_webhook_settings_from_flags_and_variables() -> None:
    s = Settings.from_sources(
        ["--webhook-allow-private", "--webhook-secret", SECRET, "--webhook-secret", OLD_SECRET,
         "--webhook-allowed-host", "a.example", "--webhook-retry-delays", "1,2.5"],
        environ={},
    )  # fmt: skip
    assert s.webhook_allow_private and s.webhook_secrets == (SECRET, OLD_SECRET)
    assert s.webhook_allowed_hosts == ("a.example",) and s.retry_delays == (1.0, 2.5)
    assert SECRET not in repr(s)
    env = Settings.from_sources([], environ={"ZYPHER_WEBHOOK_ALLOW_PRIVATE": "true", "ZYPHER_WEBHOOK_SECRETS": SECRET})
    assert env.webhook_allow_private and env.webhook_secrets == (SECRET,)
    assert not Settings.from_sources([], environ={}).webhook_allow_private
    assert Settings().retry_delays == (5, 300, 1800, 7200, 18000, 36000, 86400)
    for bad in ("5,soon", "-1", "5,inf"):
        with pytest.raises(ValueError, match="--webhook-retry-delays"):
            Settings(webhook_retry_delays=bad)


# -- the schedule -----------------------------------------------------------------------------------------


def test_only_the_changes_a_filter_asks_for_schedule_a_delivery() -> None:
    queued = with_webhook("start", "completed")
    assert scheduled_by(queued) is None
    running = queued.started(batch_size=1)
    start = scheduled_by(running)
    assert start is not None and start.event == "start" and start.webhook_id == f"msg_{queued.prediction_id}_start"
    assert running.webhook is not None and running.webhook.state == PENDING and running.webhook.attempts == 0
    payload = json.loads(start.body)
    assert payload["type"] == "prediction.start" and payload["data"]["status"] == "running"
    assert payload["data"]["webhook"]["url"] == "https://hooks.example.com/zypher"  # no query string
    assert "s3cret" not in start.body.decode()
    done = running.finished(Status.SUCCEEDED, ttl=60, result={"y": 2})
    completed = scheduled_by(done)
    assert completed is not None and completed.webhook_id == f"msg_{queued.prediction_id}_completed"
    assert json.loads(completed.body)["data"]["result"] == {"y": 2}
    assert json.loads(completed.body)["timestamp"] == rfc3339(done.completed_at)
    assert payload["timestamp"] == rfc3339(running.started_at)
    # A second start (after a crash) sends no second `start`; `completed` alone is the default.
    again = running.requeued().started(batch_size=1)
    assert again.attempts == 2 and scheduled_by(again) is None
    only_completed = with_webhook().started(batch_size=1)
    assert scheduled_by(only_completed) is None
    canceled = with_webhook().finished(Status.CANCELED, ttl=60)
    assert scheduled_by(canceled) is not None
    nothing = with_webhook("output")
    assert scheduled_by(nothing.started(batch_size=1)) is None
    assert scheduled_by(nothing.started(batch_size=1).finished(Status.SUCCEEDED, ttl=60)) is None


def test_a_stream_sends_output_at_most_every_half_second_named_by_its_chunks_and_never_after_completed() -> None:
    running = dataclasses.replace(with_webhook("output", "completed"), stream=True).started(batch_size=1)
    assert scheduled_by(running) is None  # no chunks yet: nothing to send
    t = 1000.0
    first = lifecycle.append_chunks(running, 0, ["a "], None, now=t)
    assert first is not None and first.webhook is not None
    delivery = scheduled_by(first)
    assert delivery is not None and delivery.event == "output"
    assert delivery.webhook_id == f"msg_{running.prediction_id}_output_1"
    payload = json.loads(delivery.body)
    assert payload["type"] == "prediction.output" and payload["data"]["result"] == ["a "]
    assert payload["data"]["status"] == "running" and payload["timestamp"] == rfc3339(t)
    # 0.4 s later: committed, but no new event (the pending one stays what it was).
    soon = lifecycle.append_chunks(first, 1, ["b "], None, now=t + 0.4)
    assert soon is not None and soon.result == ["a ", "b "] and soon.webhook == first.webhook
    # 0.5 s after the first: the next event, with every chunk so far.
    later = lifecycle.append_chunks(soon, 2, ["c "], None, now=t + 0.5)
    assert later is not None and later.webhook is not None and later.webhook.output_chunks == 3
    again = scheduled_by(later)
    assert again is not None and again.webhook_id == f"msg_{running.prediction_id}_output_3"
    assert json.loads(again.body)["data"]["result"] == ["a ", "b ", "c "]
    # Progress alone sends nothing; nor does a filter without `output`.
    progressed = lifecycle.append_chunks(later, 3, [], {"fraction": 0.5, "message": None}, now=t + 5)
    assert progressed is not None and progressed.webhook == later.webhook
    quiet = dataclasses.replace(with_webhook("completed"), stream=True).started(batch_size=1)
    assert scheduled_by(lifecycle.append_chunks(quiet, 0, ["a "], None, now=t)) is None  # type: ignore[arg-type]
    # The end: `completed` with every chunk, and no `output` after it (a canceled stream still commits).
    canceled = lifecycle.cancel(later, later.prediction_id, ttl=60)
    assert canceled.webhook is not None and canceled.webhook.event == "completed"
    tail = lifecycle.append_chunks(canceled, 3, ["d "], None, now=t + 10)
    assert tail is not None and tail.webhook == canceled.webhook
    # An attempt at an earlier output does not change the record once a later one is pending.
    settled = settle(delivery, Attempt(status=200), now=t + 1, delays=(5,))
    assert settled.applies_to(first) and not settled.applies_to(later)


def test_a_canceled_streams_last_commit_sends_no_output_without_completed_in_the_filter() -> None:
    """`output` never after the prediction ended: a canceled stream's last commit (the chunks yielded
    before the cancel) makes no `output` pending, also when the filter has no `completed` to replace it."""
    running = dataclasses.replace(with_webhook("output"), stream=True).started(batch_size=1)
    t = 1000.0
    first = lifecycle.append_chunks(running, 0, ["a "], None, now=t)
    assert first is not None and first.webhook is not None and first.webhook.event == "output"
    canceled = lifecycle.cancel(first, first.prediction_id, ttl=60)
    assert canceled.webhook == first.webhook  # no `completed` asked for: nothing new
    tail = lifecycle.append_chunks(canceled, 1, ["b "], None, now=t + 10)
    assert tail is not None and tail.result == ["a ", "b "]
    assert tail.webhook == canceled.webhook  # not an `output` pending that nothing would ever send
    assert scheduled_by(tail) is None


def delivery(attempts: int = 0) -> Delivery:
    return Delivery("msg_x_completed", "x", "completed", URL, b"{}", 100.0, 100.0, attempts)


def test_each_failure_waits_the_next_delay_with_jitter_until_the_last_is_dead_lettered() -> None:
    factors = iter([1.2, 0.8, 1.0])
    now = 1000.0
    d = delivery()
    waited = []
    for _ in DELAYS:
        s = settle(d, Attempt(500), now=now, delays=DELAYS, jitter=lambda: next(factors))
        assert s.outcome == PENDING and s.retry is not None
        waited.append(s.retry.due_at - now)
        d = s.retry
    assert waited == pytest.approx([6.0, 240.0, 1800.0])
    assert d.attempts == 3
    last = settle(d, Attempt(error=TIMEOUT), now=now, delays=DELAYS)
    assert last.outcome == DEAD_LETTERED and last.retry is None
    state = last.apply(Webhook(URL, ("completed",), "completed", PENDING))
    assert (state.state, state.attempts, state.last_status, state.last_error) == (DEAD_LETTERED, 4, None, TIMEOUT)


def test_2xx_delivers_410_stops_a_refused_address_gives_up_and_retry_after_is_honoured() -> None:
    ok = settle(delivery(), Attempt(204), now=5.0, delays=DELAYS)
    assert ok.outcome == DELIVERED and ok.apply(Webhook(URL, ("completed",))).delivered_at == 5.0
    assert settle(delivery(), Attempt(410), now=5.0, delays=DELAYS).outcome == GONE
    assert settle(delivery(), Attempt(error=ADDRESS_NOT_ALLOWED), now=5.0, delays=DELAYS).outcome == DEAD_LETTERED
    redirect = settle(delivery(), Attempt(302), now=5.0, delays=DELAYS, jitter=lambda: 1.0)
    assert redirect.outcome == PENDING  # a redirect is a failure, retried at the same URL
    later = settle(delivery(), Attempt(503, retry_after=120), now=5.0, delays=DELAYS, jitter=lambda: 1.0)
    assert later.retry is not None and later.retry.due_at == 125.0
    sooner = settle(delivery(), Attempt(429, retry_after=1), now=5.0, delays=DELAYS, jitter=lambda: 1.0)
    assert sooner.retry is not None and sooner.retry.due_at == 10.0  # never before the schedule's delay
    capped = settle(delivery(), Attempt(503, retry_after=10**9), now=5.0, delays=DELAYS, jitter=lambda: 1.0)
    assert capped.retry is not None and capped.retry.due_at == 5.0 + max(DELAYS)
    assert settle(delivery(), Attempt(500), now=5.0, delays=()).outcome == DEAD_LETTERED  # no retries at all


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = 1_800_000_000.0
    assert schedule.retry_after("120", now) == 120.0
    date = format_datetime(datetime.fromtimestamp(now + 90, tz=timezone.utc), usegmt=True)
    assert schedule.retry_after(date, now) == pytest.approx(90.0)
    assert schedule.retry_after(None, now) is None and schedule.retry_after("soon", now) is None


def test_a_delivery_round_trips_through_json() -> None:
    d = Delivery("msg_a_start", "a", "start", URL, b'{"\\u00e9":"\xc3\xa9"}', 1.5, 2.5, 3)
    assert Delivery.from_json(d.to_json(), receipt="1-0") == dataclasses.replace(d, receipt="1-0")


# -- every store keeps them with the change that causes them -----------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    settings = request.getfixturevalue("redis_settings") if request.param == "redis" else {}
    return request.param, settings


@pytest.fixture
async def store(kind: tuple[str, dict[str, str]], tmp_path: Path) -> AsyncIterator[Any]:
    name, settings = kind
    if name == "memory":
        yield MemoryStore(ttl=60)
    elif name == "sqlite":
        sqlite = SQLiteStore(tmp_path / "z.db", ttl=60)
        await sqlite.open()
        yield sqlite
        await sqlite.close()
    else:
        client = aioredis.Redis.from_url(settings["redis_url"], decode_responses=True)
        yield RedisStore(client, RedisKeys(settings["redis_prefix"]), ttl=60, consumer="a")
        await client.aclose()


async def run_to_completion(store: Any, p: Prediction) -> Prediction:
    await store.add(p)
    await store.start([p.prediction_id])
    (done,) = await store.finish([Outcome(p.prediction_id, result={"y": 1})])
    return done  # type: ignore[no-any-return]


async def test_a_finished_prediction_has_its_delivery_pending_and_an_attempt_moves_both_on(store: Any) -> None:
    assert isinstance(store, KeepsWebhooks)
    woken: list[int] = []
    store.on_webhooks_scheduled(lambda: woken.append(1))
    plain = Prediction.new(1, model_name="m", model_version="1")
    await run_to_completion(store, plain)
    assert await store.pending_webhooks() == 0 and woken == []
    done = await run_to_completion(store, with_webhook())
    assert woken and await store.pending_webhooks() == 1
    now = time.time() + 1
    (due,) = await store.due_webhooks(now, 10)
    assert due.webhook_id == f"msg_{done.prediction_id}_completed" and due.attempts == 0
    assert json.loads(due.body)["data"]["status"] == "succeeded"
    assert await store.due_webhooks(now, 10) == []  # taken: nobody else gets it while it is attempted

    failed = settle(due, Attempt(500), now=now, delays=DELAYS, jitter=lambda: 1.0)
    await store.settle_webhook(failed)
    record = await store.get(done.prediction_id)
    assert record.webhook.state == PENDING and record.webhook.attempts == 1 and record.webhook.last_status == 500
    assert record.webhook.next_attempt_at == now + 5 and record.status is Status.SUCCEEDED
    assert await store.due_webhooks(now + 4.9, 10) == []
    (again,) = await store.due_webhooks(now + 5, 10)
    assert again.webhook_id == due.webhook_id and again.attempts == 1 and again.body == due.body

    await store.settle_webhook(settle(again, Attempt(200), now=now + 6, delays=DELAYS))
    record = await store.get(done.prediction_id)
    assert (record.webhook.state, record.webhook.attempts, record.webhook.delivered_at) == (DELIVERED, 2, now + 6)
    assert record.result == {"y": 1} and await store.pending_webhooks() == 0
    assert await store.due_webhooks(now + 10**6, 10) == []


async def test_one_host_gets_its_share_and_the_others_are_not_held_up(store: Any) -> None:
    slow = [await run_to_completion(store, with_webhook(url="https://slow.example/h")) for _ in range(4)]
    fast = await run_to_completion(store, with_webhook(url="https://fast.example/h"))
    now = time.time() + 1
    # Two attempts run to slow.example already: it gets one more, and fast.example is not held up behind it.
    taken = await store.due_webhooks(now, 10, per_host=3, in_flight={"slow.example:443": 2})
    assert sorted(d.prediction_id for d in taken) == sorted([slow[0].prediction_id, fast.prediction_id])
    later = now + 5  # Redis puts a passed-over delivery back for a second; the others keep it due
    rest = await store.due_webhooks(later, 10, per_host=2)
    assert len(rest) == 2 and {d.prediction_id for d in rest} <= {p.prediction_id for p in slow[1:]}


async def test_a_later_event_replaces_the_start_in_the_record_and_a_late_start_attempt_leaves_it(store: Any) -> None:
    p = with_webhook("start", "completed")
    await store.add(p)
    await store.start([p.prediction_id])
    now = time.time() + 1
    (start,) = await store.due_webhooks(now, 10)
    assert start.event == "start"
    await store.finish([Outcome(p.prediction_id, result=1)])
    await store.settle_webhook(settle(start, Attempt(200), now=now, delays=DELAYS))
    record = await store.get(p.prediction_id)
    assert record.webhook.event == "completed" and record.webhook.state == PENDING and record.webhook.attempts == 0
    (completed,) = await store.due_webhooks(now, 10)
    assert completed.event == "completed"


async def test_a_chunk_commit_writes_its_output_delivery_with_it_and_completed_carries_every_chunk(
    store: Any,
) -> None:
    p = dataclasses.replace(with_webhook("output", "completed"), stream=True)
    await store.add(p)
    await store.start([p.prediction_id])
    woken: list[int] = []
    store.on_webhooks_scheduled(lambda: woken.append(1))
    assert await store.commit_stream(p.prediction_id, 0, ["a "], None) is not None
    now = time.time() + 1
    (first,) = await store.due_webhooks(now, 10)
    assert woken and first.webhook_id == f"msg_{p.prediction_id}_output_1"
    assert json.loads(first.body)["data"]["result"] == ["a "]
    record = await store.get(p.prediction_id)
    assert record.webhook.event == "output" and record.webhook.state == PENDING
    await store.settle_webhook(settle(first, Attempt(200), now=now, delays=DELAYS))
    assert (await store.get(p.prediction_id)).webhook.state == DELIVERED
    await store.finish([Outcome(p.prediction_id, result=["a ", "b "])])
    (completed,) = await store.due_webhooks(now, 10)
    assert completed.webhook_id == f"msg_{p.prediction_id}_completed"
    assert json.loads(completed.body)["data"]["result"] == ["a ", "b "]


async def test_chunk_commits_while_an_event_is_pending_schedule_it_once(store: Any) -> None:
    """A stream commits its chunks every --stream-commit-ms, each a write of its record: a write that
    leaves the pending event as it was (a `start` not attempted yet, the `completed` of a cancel that its
    last commit follows) schedules nothing more, so the receiver gets each event once."""
    p = dataclasses.replace(with_webhook("start", "completed"), stream=True)
    await store.add(p)
    await store.start([p.prediction_id])
    for n in range(3):
        assert await store.commit_stream(p.prediction_id, n, [f"w{n} "], None) is not None
    now = time.time() + 1
    (start,) = await store.due_webhooks(now, 10)
    assert start.webhook_id == f"msg_{p.prediction_id}_start"
    await store.settle_webhook(settle(start, Attempt(200), now=now, delays=DELAYS))
    await store.cancel(p.prediction_id)
    assert await store.commit_stream(p.prediction_id, 3, ["w3 "], None) is not None  # yielded before the cancel
    (completed,) = await store.due_webhooks(now, 10)
    assert completed.webhook_id == f"msg_{p.prediction_id}_completed"
    await store.settle_webhook(settle(completed, Attempt(200), now=now, delays=DELAYS))
    assert await store.due_webhooks(now + 10**6, 10) == [] and await store.pending_webhooks() == 0


async def test_a_sqlite_delivery_is_on_disk_with_its_record_and_survives_a_reopen(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "z.db", ttl=60)
    await store.open()
    done = await run_to_completion(store, with_webhook())
    await store.close()
    reopened = SQLiteStore(tmp_path / "z.db", ttl=60)
    await reopened.open()
    (due,) = await reopened.due_webhooks(time.time() + 1, 10)
    assert due.prediction_id == done.prediction_id
    await reopened.close()


async def test_a_sqlite_transaction_that_fails_leaves_no_delivery_behind(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "z.db", ttl=60)
    await store.open()
    p = with_webhook()
    await store.add(p)
    await store.start([p.prediction_id])

    def fail_after_the_finish(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    # Issued in one loop turn, the finish and a write that fails share one transaction (group commit):
    # SQLite's full disk rolls back both, the finish's delivery with it.
    results = await asyncio.gather(
        store.finish([Outcome(p.prediction_id, result=1)]), store._write(fail_after_the_finish), return_exceptions=True
    )
    assert all(isinstance(r, StorageFull) for r in results), results
    assert await store.pending_webhooks() == 0
    assert (await store.get(p.prediction_id)).status is Status.RUNNING  # type: ignore[union-attr]
    (done,) = await store.finish([Outcome(p.prediction_id, result=1)])  # the retry commits both
    assert done.status is Status.SUCCEEDED and await store.pending_webhooks() == 1
    await store.close()


async def test_a_deferred_sync_prediction_writes_its_delivery_in_its_one_write(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "z.db", ttl=60)
    await store.open()
    p = await store.add_deferred(with_webhook())
    await store.start([p.prediction_id])
    assert await store.pending_webhooks() == 0
    await store.finish([Outcome(p.prediction_id, result=1)])
    assert await store.pending_webhooks() == 1
    # One asking for `start` is written at once: its start must be written with its delivery.
    starts = await store.add_deferred(with_webhook("start", "completed"))
    await store.start([starts.prediction_id])
    assert await store.pending_webhooks() == 2
    await store.close()


async def test_redis_gives_each_due_delivery_to_exactly_one_process(redis_settings: dict[str, str]) -> None:
    client = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    keys = RedisKeys(redis_settings["redis_prefix"])
    a = RedisStore(client, keys, ttl=60, consumer="a", webhook_claim_idle=60)
    b = RedisStore(client, keys, ttl=60, consumer="b", webhook_claim_idle=60)
    ids = {(await run_to_completion((a, b)[n % 2], with_webhook())).prediction_id for n in range(20)}
    now = time.time() + 1
    taken_a = await a.due_webhooks(now, 7)
    taken_b = await b.due_webhooks(now, 100)
    assert len(taken_a) == 7 and len(taken_b) == 13
    assert {d.prediction_id for d in taken_a} | {d.prediction_id for d in taken_b} == ids
    assert not {d.prediction_id for d in taken_a} & {d.prediction_id for d in taken_b}
    # A retry comes due once, to one of them.
    await a.settle_webhook(settle(taken_a[0], Attempt(500), now=now, delays=DELAYS, jitter=lambda: 1.0))
    assert await a.due_webhooks(now + 4, 10) == [] and await b.due_webhooks(now + 4, 10) == []
    first, second = await b.due_webhooks(now + 5, 10), await a.due_webhooks(now + 5, 10)
    assert [d.prediction_id for d in first + second] == [taken_a[0].prediction_id]
    assert (first + second)[0].attempts == 1
    await client.aclose()


async def test_redis_takes_over_what_a_dead_process_was_attempting(redis_settings: dict[str, str]) -> None:
    client = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    keys = RedisKeys(redis_settings["redis_prefix"])
    dead = RedisStore(client, keys, ttl=60, consumer="dead", webhook_claim_idle=0.2)
    alive = RedisStore(client, keys, ttl=60, consumer="alive", webhook_claim_idle=0.2)
    done = await run_to_completion(dead, with_webhook())
    now = time.time() + 1
    (held,) = await dead.due_webhooks(now, 10)  # and then its process dies, the attempt unsettled
    assert await alive.due_webhooks(now, 10) == []  # held: not idle long enough yet

    found: list[Delivery] = []

    async def taken_over() -> bool:  # once Redis's own clock says it sat idle for the claim time
        found.extend(await alive.due_webhooks(now, 10))
        return bool(found)

    await eventually(taken_over, "the held delivery taken over")
    assert [d.webhook_id for d in found] == [held.webhook_id] and found[0].prediction_id == done.prediction_id
    await alive.settle_webhook(settle(found[0], Attempt(200), now=now, delays=DELAYS))
    assert await alive.pending_webhooks() == 0
    await client.aclose()


async def test_a_prediction_failed_as_worker_lost_at_recovery_sends_completed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "z.db", ttl=60)
    await store.open()
    p = with_webhook()
    await store.add(p)
    await store.start([p.prediction_id])  # and the process running it dies, --max-attempts 1
    _, failed = await store.recover(max_attempts=1)
    assert [f.prediction_id for f in failed] == [p.prediction_id]
    (due,) = await store.due_webhooks(time.time() + 1, 10)
    data = json.loads(due.body)["data"]
    assert (data["status"], data["error"]["code"]) == ("failed", "worker_lost")
    await store.close()


async def test_redis_makes_its_group_again_after_redis_lost_it(redis_settings: dict[str, str]) -> None:
    client = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    keys = RedisKeys(redis_settings["redis_prefix"])
    store = RedisStore(client, keys, ttl=60, consumer="a")
    assert await store.due_webhooks(time.time(), 10) == []  # makes the group
    await client.delete(keys.webhooks)  # as a Redis restarted without persistence would have it
    done = await run_to_completion(store, with_webhook())
    assert await store.due_webhooks(time.time() + 1, 10) == []  # NOGROUP: noted, and the group made again
    (due,) = await store.due_webhooks(time.time() + 1, 10)
    assert due.prediction_id == done.prediction_id
    await client.aclose()


async def test_the_memory_store_keeps_a_bounded_number_of_pending_deliveries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore(ttl=60, max_finished=3)
    running = [with_webhook("start", "completed") for _ in range(4)]
    for p in running:
        await store.add(p)
        await store.start([p.prediction_id])
    assert await store.pending_webhooks() == 3  # four starts: the oldest was given up
    assert f"gave up the start event of {running[0].prediction_id}" in caplog.text
    record = await store.get(running[0].prediction_id)
    assert record is not None and record.webhook is not None
    assert (record.webhook.state, record.webhook.last_error) == (DEAD_LETTERED, "too_many_pending")
    due = await store.due_webhooks(time.time() + 1, 10)
    assert sorted(d.prediction_id for d in due) == sorted(p.prediction_id for p in running[1:])


class SwallowingOutbox(MemoryStore):
    """A store whose reads lose a cancel, as redis-py can with a command in flight: it returns instead."""

    def __init__(self) -> None:
        super().__init__(ttl=60)
        self.reading = asyncio.Event()

    async def due_webhooks(self, now: float, limit: int, **kwargs: Any) -> list[Delivery]:
        self.reading.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # lost
        return []


async def test_the_delivery_loop_stops_even_when_a_store_call_loses_its_cancel() -> None:
    from zypher_ws.webhooks.delivery import Dispatcher

    outbox = SwallowingOutbox()
    dispatcher = Dispatcher(outbox=outbox, transport=None, signer=Signer([SECRET]), delays=DELAYS, concurrency=4)  # type: ignore[arg-type]
    loop = asyncio.create_task(dispatcher.run())
    await asyncio.wait_for(outbox.reading.wait(), 5)
    await dispatcher.stop()
    loop.cancel()  # lost inside the read; the loop still ends, at its next turn
    await asyncio.wait_for(asyncio.gather(loop, return_exceptions=True), 5)
    assert loop.done()
