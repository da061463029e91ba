"""Nothing accepted is lost: real processes, SIGKILL, restart, idempotency under concurrency."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from fakes import WAIT, GatedModel, ManualClock
from helpers import ClientFactory, free_port, recording_env, run_server, submit_async, wait_all_terminal
from zypher_ws.backends import Sweeps
from zypher_ws.backends.redis.keys import RedisKeys
from zypher_ws.http.keys import SERVICE, SETTINGS
from zypher_ws.records import rfc3339


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_nothing_and_never_reruns_finished(tmp_path: Path) -> None:
    db, log = tmp_path / "z.db", tmp_path / "executions.log"
    args = ("--model", "recording_model:RecordingModel", "--store", f"sqlite:///{db}", "--workers", "2")
    env = recording_env(log)
    accepted: dict[str, int] = {}  # prediction_id -> n
    port = free_port()
    rng = random.Random(1234)
    n = 0
    enough = asyncio.Event()
    for _round in range(6):
        async with run_server(*args, env=env, port=port) as server, aiohttp.ClientSession(server.url) as http:

            async def submit_stream(target: int) -> None:
                nonlocal n
                while True:
                    n += 1
                    mine = n
                    resp = await http.post("/predict", json={"input": {"n": mine}}, headers={"Async-Mode": "true"})
                    if resp.status == 202:
                        accepted[(await resp.json())["prediction_id"]] = mine
                        if len(accepted) >= target:
                            enough.set()

            # Let it run a random while (counted in acceptances), then kill it hard.
            target = len(accepted) + rng.randint(20, 120)
            enough.clear()
            streams = [asyncio.create_task(submit_stream(target)) for _ in range(4)]
            await asyncio.wait_for(enough.wait(), 30)
            server.proc.send_signal(signal.SIGKILL)
            await server.proc.wait()
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)

    async with run_server(*args, env=env, port=port) as server, aiohttp.ClientSession(server.url) as http:
        records = await wait_all_terminal(http, list(accepted))
    assert len(records) == len(accepted) > 100
    assert {r["status"] for r in records.values()} == {"succeeded"}
    executions = Counter(int(line) for line in log.read_text().split())
    for pid, record in records.items():
        ran = executions[accepted[pid]]
        assert 1 <= ran <= record["attempts"], (pid, ran, record["attempts"])  # each run was a recorded start
        assert record["result"] == {"n": accepted[pid]}


@pytest.mark.slow
async def test_queued_behind_a_slow_model_complete_after_restart(tmp_path: Path) -> None:
    db, log = tmp_path / "z.db", tmp_path / "executions.log"
    args = (
        "--model",
        "recording_model:RecordingModel",
        "--store",
        f"sqlite:///{db}",
        "--workers",
        "1",
        "--max-batch-size",
        "1",
    )
    env = recording_env(log, latency=0.3)
    port = free_port()
    async with run_server(*args, env=env, port=port) as server, aiohttp.ClientSession(server.url) as http:
        ids = [await submit_async(http, i) for i in range(10)]
        server.proc.send_signal(signal.SIGKILL)
        await server.proc.wait()
    unfinished_at_kill = 10 - len(log.read_text().split()) if log.exists() else 10
    assert unfinished_at_kill > 0
    async with run_server(*args, env={**env, "ZYPHER_TEST_LATENCY": "0"}, port=port) as server:
        async with aiohttp.ClientSession(server.url) as http:
            records = await wait_all_terminal(http, ids)
    assert all(r["status"] == "succeeded" for r in records.values())
    assert any("queued again" in line for line in server.log)
    assert sorted(set(int(x) for x in log.read_text().split())) == list(range(10))


async def test_idempotency_under_50_concurrent_requests(make_client: ClientFactory, tmp_path: Path) -> None:
    gated = GatedModel()
    client = await make_client(model=gated, store=f"sqlite:///{tmp_path / 'z.db'}")
    headers = {"Async-Mode": "true", "Idempotency-Key": "order-42"}
    responses = await asyncio.gather(
        *(client.post("/predict", json={"input": {"x": 1}}, headers=headers) for _ in range(50))
    )
    assert {r.status for r in responses} == {202}
    ids = {(await r.json())["prediction_id"] for r in responses}
    assert len(ids) == 1
    gated.release.set()
    resp = await client.post("/predict", json={"input": {"x": 1}}, headers={"Idempotency-Key": "order-42"})
    assert resp.status == 200 and (await resp.json())["prediction_id"] in ids  # sync: waits for the same one
    assert sum(len(b) for b in gated.batches) == 1  # one execution
    conflict = await client.post("/predict", json={"input": {"x": 2}}, headers={"Idempotency-Key": "order-42"})
    assert conflict.status == 409
    assert (await conflict.json())["error"]["code"] == "idempotency_conflict"


async def test_expired_results_are_deleted_and_answer_404(
    make_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(model=GatedModel(gated=False), store=f"sqlite:///{tmp_path / 'z.db'}")
    record = await (await client.post("/predict", json={"input": {"x": 1}})).json()
    service = client.app[SERVICE]
    expires_at = (await service.get(record["prediction_id"])).expires_at
    assert expires_at is not None and record["expires_at"] == rfc3339(expires_at) > record["completed_at"]

    store = service.store
    if not isinstance(store, Sweeps):
        # Redis deletes the record itself, at that very millisecond: there is no clock of ours to move.
        settings = client.app[SETTINGS]
        redis = aioredis.Redis.from_url(settings.redis_url)
        try:
            key = RedisKeys(settings.redis_prefix).record(record["prediction_id"])
            assert await redis.pexpiretime(key) == int(expires_at * 1000)
        finally:
            await redis.aclose()
        return

    # Sweep on a clock of the test's own: one pass just before the expiry, one at it.
    swept: asyncio.Queue[tuple[float, int]] = asyncio.Queue()
    sweep = store.sweep

    async def observed_sweep(now: float) -> int:
        removed = await sweep(now)
        swept.put_nowait((now, removed))
        return removed

    monkeypatch.setattr(store, "sweep", observed_sweep)
    clock = ManualClock()
    for now, expected in ((expires_at - 0.001, 0), (expires_at, 1)):
        clock.now = now
        sweeper = asyncio.create_task(service.sweep_forever(clock=clock))
        try:
            assert await asyncio.wait_for(swept.get(), WAIT) == (now, expected)
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        status = (await client.get(record["links"]["self"])).status
        assert status == (200 if expected == 0 else 404)


@pytest.mark.slow
async def test_sigterm_finishes_running_work_pushes_it_closes_sockets_and_keeps_the_queue(tmp_path: Path) -> None:
    db, log = tmp_path / "z.db", tmp_path / "executions.log"
    args = ("--model", "recording_model:RecordingModel", "--store", f"sqlite:///{db}")
    args += ("--workers", "1", "--max-batch-size", "1", "--shutdown-timeout", "20")
    env = recording_env(log, latency=0.5)
    port = free_port()
    async with run_server(*args, env=env, port=port) as server, aiohttp.ClientSession(server.url) as http:
        ids = [await submit_async(http, n) for n in range(5)]
        async with http.ws_connect(f"/ws?prediction_id={ids[0]}") as ws:
            status = None
            while status != "running":  # past its place in line (`queue` messages) while it waits
                status = (await ws.receive_json(timeout=10)).get("prediction", {}).get("status")
            server.proc.send_signal(signal.SIGTERM)  # under load: one running, four queued
            final = await ws.receive_json(timeout=10)
            assert final["type"] == "update" and final["prediction"]["status"] == "succeeded"  # pushed before closing
            assert (await ws.receive_json(timeout=10))["type"] == "shutdown"
            closing = await ws.receive(timeout=10)
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        assert await asyncio.wait_for(server.proc.wait(), 30) == 0
    assert [int(x) for x in log.read_text().split()] == [0]  # the running one finished; nothing else started
    async with run_server(*args, env={**env, "ZYPHER_TEST_LATENCY": "0"}, port=port) as server:
        async with aiohttp.ClientSession(server.url) as http:
            records = await wait_all_terminal(http, ids)
    assert {r["status"] for r in records.values()} == {"succeeded"}
    assert Counter(int(x) for x in log.read_text().split()) == Counter(range(5))  # each exactly once
