"""Webhooks through crashes, with real processes: the receiver is down while the service is SIGKILLed and
restarted, and every event still arrives, each webhook-id once, never before its record says so; on
SQLite and on Redis with two API and two worker processes."""

from __future__ import annotations

import asyncio
import base64
import signal
import sqlite3
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from standardwebhooks import Webhook as Verifier

from fakes import TERMINAL
from helpers import (
    Delivered,
    Receiver,
    eventually,
    free_port,
    recording_env,
    run_server,
    run_worker,
    wait_all_terminal,
)
from zypher_ws.backends.redis.keys import RedisKeys

pytestmark = pytest.mark.slow  # real server, worker and Redis processes

SECRET = "whsec_" + base64.b64encode(b"p" * 32).decode()
MODEL = ("--model", "recording_model:RecordingModel")
# Retry every half second or so for minutes: the receiver comes back well within that.
HOOKS = ("--webhook-allow-private", "--webhook-retry-delays", ",".join(["0.5"] * 400), "--webhook-timeout", "2")


def hook_env(log: Path, latency: float = 0.01) -> dict[str, str]:
    return {**recording_env(log, latency), "ZYPHER_WEBHOOK_SECRETS": SECRET}


async def submit(http: aiohttp.ClientSession, n: int, receiver: Receiver) -> tuple[str, list[str]]:
    """An async prediction with a webhook (every other one asks for start too): its id and its events."""
    events = ["start", "completed"] if n % 2 else ["completed"]
    body = {"input": {"n": n}, "webhook": receiver.url(), "webhook_events_filter": events}
    resp = await http.post("/predict", json=body, headers={"Async-Mode": "true"})
    assert resp.status == 202, await resp.text()
    return str((await resp.json())["prediction_id"]), events


async def every_event(receiver: Receiver, expected: set[str], timeout: float = 90) -> None:
    async def arrived() -> None:
        while not expected <= {d.headers["webhook-id"] for d in receiver.got}:
            await receiver.next(timeout)

    await asyncio.wait_for(arrived(), timeout)


def check_deliveries(got: list[Delivered], expected: set[str], final: dict[str, Any]) -> None:
    """Each expected event arrived exactly once, verified, carrying the state its event is about."""
    ids = Counter(d.headers["webhook-id"] for d in got)
    assert set(ids) == expected and set(ids.values()) == {1}, ids.most_common(3)
    for delivered in got:
        payload = Verifier(SECRET).verify(delivered.body, delivered.headers)
        pid = payload["data"]["prediction_id"]
        assert delivered.headers["webhook-id"] == f"msg_{pid}_{payload['type'].removeprefix('prediction.')}"
        if payload["type"] == "prediction.completed":
            assert payload["data"]["status"] in TERMINAL
            assert payload["data"]["result"] == final[pid]["result"] and final[pid]["status"] == "succeeded"
        else:
            assert payload["data"]["status"] == "running"


async def test_sqlite_a_receiver_down_through_a_sigkill_gets_every_event_once(tmp_path: Path) -> None:
    db = tmp_path / "z.db"
    args = (*MODEL, "--store", f"sqlite:///{db}", "--workers", "2", "--max-batch-size", "1", *HOOKS)
    env = hook_env(tmp_path / "executions.log", latency=0.05)
    receiver = Receiver()  # not started: down
    port = free_port()
    expected: set[str] = set()
    async with run_server(*args, env=env, port=port) as server, aiohttp.ClientSession(server.url) as http:
        submitted = [await submit(http, n, receiver) for n in range(40)]
        ids = [pid for pid, _ in submitted]
        expected = {f"msg_{pid}_{event}" for pid, events in submitted for event in events}
        await wait_all_terminal(http, ids[:10])  # some finished, the rest queued or running
        server.proc.send_signal(signal.SIGKILL)
        await server.proc.wait()
    assert len((tmp_path / "executions.log").read_text().split()) < 40  # killed with work unfinished
    async with run_server(*args, env=env, port=port) as server, aiohttp.ClientSession(server.url) as http:
        seen_by_the_api: list[tuple[str, str]] = []

        async def ask_the_api(delivered: Delivered) -> None:  # while the delivery waits for its answer
            payload = delivered.json()
            record = await (await http.get(f"/predict/{payload['data']['prediction_id']}")).json()
            seen_by_the_api.append((payload["type"], record["status"]))

        receiver.on_delivery = ask_the_api
        async with receiver:  # up while the rest of the work runs: completions are sent as they are written
            final = await wait_all_terminal(http, ids)
            await every_event(receiver, expected)

            async def none_pending() -> bool:  # every attempt written back: nothing more can arrive
                with sqlite3.connect(db) as conn:
                    return int(conn.execute("SELECT COUNT(*) FROM webhook_deliveries").fetchone()[0]) == 0

            await eventually(none_pending, "every delivery settled", timeout=30)
            for pid in ids:  # the record shows what was delivered
                webhook = (await (await http.get(f"/predict/{pid}")).json())["webhook"]
                assert (webhook["event"], webhook["state"], webhook["last_status"]) == ("completed", "delivered", 200)
                assert webhook["attempts"] >= 1
    check_deliveries(receiver.got, expected, final)
    assert len(seen_by_the_api) == len(expected)
    assert {status for kind, status in seen_by_the_api if kind == "prediction.completed"} <= TERMINAL


def backend_args(settings: dict[str, str]) -> tuple[str, ...]:
    return ("--backend", "redis", "--redis-url", settings["redis_url"], "--redis-prefix", settings["redis_prefix"])


async def redis_pending(settings: dict[str, str]) -> int:
    keys = RedisKeys(settings["redis_prefix"])
    client = aioredis.Redis.from_url(settings["redis_url"], decode_responses=True)
    try:
        return int(await client.xlen(keys.webhooks)) + int(await client.zcard(keys.webhooks_later))
    finally:
        await client.aclose()


async def test_redis_two_api_and_two_worker_processes_one_killed_every_event_once(
    redis_settings: dict[str, str], tmp_path: Path
) -> None:
    # Lost work and lost deliveries are taken over: work after --claim-idle, a delivery after
    # --webhook-timeout and 5 s more.
    backend = (*backend_args(redis_settings), "--claim-idle", "1", *HOOKS)
    receiver = Receiver()  # down until after the kill
    async with AsyncExitStack() as stack:
        api_env = hook_env(tmp_path / "api.log")
        api_a = await stack.enter_async_context(run_server(*backend, *MODEL, "--workers", "0", env=api_env))
        api_b = await stack.enter_async_context(run_server(*backend, *MODEL, "--workers", "0", env=api_env))
        await stack.enter_async_context(run_worker(*backend, *MODEL, env=hook_env(tmp_path / "worker-a.log")))
        http_a = await stack.enter_async_context(aiohttp.ClientSession(api_a.url))
        http_b = await stack.enter_async_context(aiohttp.ClientSession(api_b.url))
        async with run_worker(*backend, *MODEL, env=hook_env(tmp_path / "worker-b.log", 0.05)) as doomed:
            submitted = [await submit((http_a, http_b)[n % 2], n, receiver) for n in range(60)]
            ids = [pid for pid, _ in submitted]
            await wait_all_terminal(http_b, ids[:20])
            doomed.proc.send_signal(signal.SIGKILL)  # holding work, and deliveries it was attempting
            await doomed.proc.wait()
        final = await wait_all_terminal(http_a, ids)
        expected = {f"msg_{pid}_{event}" for pid, events in submitted for event in events}
        async with receiver:
            await every_event(receiver, expected)

            async def none_pending() -> bool:
                return await redis_pending(redis_settings) == 0

            await eventually(none_pending, "every delivery settled", timeout=30)
    check_deliveries(receiver.got, expected, final)
    assert (tmp_path / "worker-a.log").exists()
