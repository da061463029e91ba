"""The real `zypher-ws serve` process, driven over HTTP."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from helpers import run_server, wait_all_terminal

HOLDOUT = Path(__file__).parent / "data" / "digits_holdout.npz"
pytestmark = pytest.mark.slow  # real server processes


async def test_real_process_serves_digits_sync_and_async() -> None:
    with np.load(HOLDOUT) as data:
        image, label = data["images"][3].tolist(), int(data["labels"][3])
    async with (
        run_server("--workers", "1", "--store", "memory://") as server,
        aiohttp.ClientSession(server.url) as http,
    ):
        assert (await http.get("/readyz")).status == 200
        resp = await http.post("/predict", json={"input": image})
        assert resp.status == 200
        assert (await resp.json())["result"]["label"] == label

        resp = await http.post("/predict", json={"input": image}, headers={"Async-Mode": "true"})
        assert resp.status == 202
        pid = (await resp.json())["prediction_id"]
        assert resp.headers["Location"] == f"/predict/{pid}"
        pushed = (await wait_all_terminal(http, [pid], timeout=10))[pid]  # heard over a WebSocket
        record = await (await http.get(resp.headers["Location"])).json()
        assert record == pushed and record["status"] == "succeeded"
        assert record["result"]["label"] == label
    assert server.proc.returncode == 0  # SIGTERM is a clean shutdown
    assert any("POST /predict" in line for line in server.log)


async def test_process_executor_runs_the_model_in_worker_processes_that_each_load_it() -> None:
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    args = ("--model", "pid_model:PidModel", "--executor", "process", "--workers", "2", "--store", "memory://")
    async with run_server(*args, env=env) as server, aiohttp.ClientSession(server.url) as http:
        responses = await asyncio.gather(*(http.post("/predict", json={"input": n}) for n in range(40)))
        results = [(await r.json())["result"] for r in responses]
    assert [r["square"] for r in results] == [n * n for n in range(40)]
    pids = {r["pid"] for r in results}
    assert server.proc.pid not in pids and len(pids) <= 2
    assert all(r["loaded_in"] == r["pid"] for r in results)  # each process loaded its own copy


@pytest.mark.parametrize(("executor", "nice"), [("thread", 10), ("process", 10), ("thread", 0)])
async def test_the_model_runs_at_a_lower_priority_than_the_event_loop(executor: str, nice: int) -> None:
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    args = ("--model", "pid_model:PidModel", "--executor", executor, "--model-nice", str(nice), "--store", "memory://")
    async with run_server(*args, env=env) as server, aiohttp.ClientSession(server.url) as http:
        result = (await (await http.post("/predict", json={"input": 3})).json())["result"]
        loop_nice = os.getpriority(os.PRIO_PROCESS, server.proc.pid)  # the main thread's
    assert result["square"] == 9
    assert result["nice"] == min(19, loop_nice + nice)
