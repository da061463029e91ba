"""Scale-out with real processes on a real Redis: API and worker processes, crashes, Redis restarts."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from helpers import (
    ServerProcess,
    eventually,
    free_port,
    recording_env,
    run_server,
    run_worker,
    submit_async,
    wait_all_terminal,
)
from zypher_ws.backends.redis.keys import RedisKeys

ASYNC = {"Async-Mode": "true"}
pytestmark = pytest.mark.slow  # real server, worker and Redis processes
MODEL = ("--model", "recording_model:RecordingModel")


def backend_args(settings: dict[str, str]) -> tuple[str, ...]:
    return ("--backend", "redis", "--redis-url", settings["redis_url"], "--redis-prefix", settings["redis_prefix"])


async def wait_status(http: aiohttp.ClientSession, ids: list[str], status: str, timeout: float = 30) -> None:
    """Wait until every id shows `status`, watching over one WebSocket."""
    async with http.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_ids": ids})
        waiting = set(ids)

        async def until_seen() -> None:
            async for msg in ws:
                message = json.loads(msg.data)
                if "prediction" not in message:
                    continue  # a queued prediction's place in line
                record = message["prediction"]
                if record["status"] == status:
                    waiting.discard(record["prediction_id"])
                    if not waiting:
                        return

        await asyncio.wait_for(until_seen(), timeout)


async def test_two_api_and_two_worker_processes(redis_settings: dict[str, str], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    backend = backend_args(redis_settings)
    async with AsyncExitStack() as stack:
        api_env = recording_env(tmp_path / "api.log")  # API processes only read the model's schema
        api_a = await stack.enter_async_context(run_server(*backend, *MODEL, "--workers", "0", env=api_env))
        api_b = await stack.enter_async_context(run_server(*backend, *MODEL, "--workers", "0", env=api_env))
        metrics_port = free_port()
        for i, log in enumerate(logs):
            env = {**recording_env(log, latency=0.005), "ZYPHER_TEST_GATE": str(gate)}
            extra = ("--metrics-port", str(metrics_port)) if i == 0 else ()
            await stack.enter_async_context(run_worker(*backend, *MODEL, "--workers", "2", *extra, env=env))
        http_a = await stack.enter_async_context(aiohttp.ClientSession(api_a.url))
        http_b = await stack.enter_async_context(aiohttp.ClientSession(api_b.url))

        # Submitted on A, watched on B: B is pushed what a worker process did (running, behind the gate,
        # then the result).
        pid = await submit_async(http_a, 0)
        await wait_status(http_b, [pid], "running")
        async with http_b.ws_connect("/ws") as ws:
            await ws.send_json({"op": "subscribe", "prediction_id": pid})
            first = await ws.receive_json(timeout=10)
            assert (first["type"], first["prediction"]["status"]) == ("subscribed", "running")
            gate.touch()
            done = await ws.receive_json(timeout=10)
            assert (done["type"], done["prediction"]["status"]) == ("update", "succeeded")
            assert done["prediction"]["prediction_id"] == pid and done["prediction"]["result"] == {"n": 0}

        # Many predictions through both API processes: each runs exactly once across the workers.
        ids = await asyncio.gather(*(submit_async((http_a, http_b)[n % 2], n) for n in range(1, 301)))
        records = await wait_all_terminal(http_b, list(ids))
        # A worker process has no HTTP API, but serves its own metrics when asked to.
        metrics = await (await http_a.get(f"http://127.0.0.1:{metrics_port}/metrics")).text()
    assert {r["status"] for r in records.values()} == {"succeeded"}
    runs = [Counter(int(line) for line in log.read_text().split()) for log in logs]
    succeeded = next(
        line
        for line in metrics.splitlines()
        if line.startswith("zypher_predictions_total{") and 'status="succeeded"' in line
    )
    assert float(succeeded.split()[-1]) == sum(runs[0].values())  # what that worker ran, it counted
    assert runs[0] + runs[1] == Counter(range(301))  # every n once, none twice
    assert runs[0] and runs[1]  # both workers took part


@pytest.mark.parametrize("max_attempts", [2, 1])
async def test_sigkill_a_worker_holding_a_batch(
    redis_settings: dict[str, str], tmp_path: Path, max_attempts: int
) -> None:
    backend = (*backend_args(redis_settings), "--claim-idle", "1", "--max-attempts", str(max_attempts))
    held_log, rescue_log = tmp_path / "held.log", tmp_path / "rescue.log"
    async with AsyncExitStack() as stack:
        api_env = recording_env(tmp_path / "api.log")
        api = await stack.enter_async_context(run_server(*backend, *MODEL, "--workers", "0", env=api_env))
        http = await stack.enter_async_context(aiohttp.ClientSession(api.url))
        # This worker's gate never opens: it takes all five and holds them until it is killed.
        holder_env = {**recording_env(held_log), "ZYPHER_TEST_GATE": str(tmp_path / "never")}
        holding = ("--workers", "5", "--max-batch-size", "1")
        async with run_worker(*backend, *MODEL, *holding, env=holder_env) as holder:
            ids = [await submit_async(http, n) for n in range(5)]
            await wait_status(http, ids, "running")
            holder.proc.send_signal(signal.SIGKILL)
            await holder.proc.wait()
        await stack.enter_async_context(run_worker(*backend, *MODEL, env=recording_env(rescue_log)))
        records = await wait_all_terminal(http, ids, timeout=15)  # claim time 1 s, plus a read or two
        if max_attempts == 1:
            # The rescuing worker adds each dead-letter entry just after the record failed (and was
            # announced), so the last may still be on its way: give it a moment, with the worker alive.
            async def all_dead_lettered() -> bool:
                return sorted(await _dead_letter_ids(redis_settings)) == sorted(ids)

            await eventually(all_dead_lettered, "every lost prediction in the dead-letter stream")
        dead_letter = await _dead_letter_ids(redis_settings)
    assert not held_log.exists()  # the killed worker never finished anything
    if max_attempts == 2:
        assert all(r["status"] == "succeeded" and r["attempts"] == 2 for r in records.values())
        assert sorted(int(x) for x in rescue_log.read_text().split()) == list(range(5))
        assert dead_letter == []
    else:
        assert all(r["status"] == "failed" and r["error"]["code"] == "worker_lost" for r in records.values())
        assert not rescue_log.exists()
        assert sorted(dead_letter) == sorted(ids)


async def _dead_letter_ids(settings: dict[str, str]) -> list[str]:
    client = aioredis.Redis.from_url(settings["redis_url"], decode_responses=True)
    try:
        entries = await client.xrange(RedisKeys(settings["redis_prefix"]).dead_letter)
        return [fields["id"] for _, fields in entries]
    finally:
        await client.aclose()


# -- SIGTERM: a prompt exit, even where redis-py loses the cancel of a command in flight ---------------

# How long a process on Redis may take to exit after SIGTERM, beyond --shutdown-timeout: it waits for
# one bounded read of the queue (1 s) and of the event channel (1 s). Losing a cancel once cost a worker
# its whole --shutdown-timeout and more; losing every one (lost_cancels.py) held it for ever.
EXIT_WITHIN = 10.0


async def exits_after_sigterm(process: ServerProcess, within: float = EXIT_WITHIN) -> None:
    process.proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.proc.wait(), within)
    except asyncio.TimeoutError:
        raise AssertionError(f"still running {within} s after SIGTERM:\n" + "".join(process.log)) from None
    assert process.proc.returncode == 0, "".join(process.log)


# Each SIGTERM test runs with redis-py's cancels kept and with every one lost (lost_cancels.py).
losing_cancels_or_not = pytest.mark.parametrize("lose_cancels", [False, True], ids=["cancels-kept", "cancels-lost"])


def sigterm_setup(redis_settings: dict[str, str], log: Path) -> tuple[dict[str, str], tuple[str, ...]]:
    """The environment (recording runs to `log`) and backend arguments of a process to stop."""
    return recording_env(log), backend_args(redis_settings)


@losing_cancels_or_not
async def test_sigterm_ends_an_idle_worker_at_once(
    redis_settings: dict[str, str], tmp_path: Path, lose_cancels: bool
) -> None:
    """Idle, its worker tasks wait in XREADGROUP (BLOCK 1000) and its claims loop sleeps. With a long
    --shutdown-timeout, given here whatever the default: waiting workers must not wait it out."""
    env, backend = sigterm_setup(redis_settings, tmp_path / "runs.log")
    idle = ("--workers", "3", "--shutdown-timeout", "60")
    async with run_worker(*backend, *MODEL, *idle, env=env, lose_redis_cancels=lose_cancels) as worker:
        await exits_after_sigterm(worker)


async def test_sigterm_ends_a_worker_holding_a_batch_after_the_shutdown_timeout(
    redis_settings: dict[str, str], tmp_path: Path
) -> None:
    """One worker task runs a batch that never ends, the other waits on the queue; every cancel of a
    Redis command is lost: the exit comes once the batch's --shutdown-timeout has run out, and the
    prediction is run again by the next worker."""
    env = {**recording_env(tmp_path / "held.log"), "ZYPHER_TEST_GATE": str(tmp_path / "never")}
    backend = (*backend_args(redis_settings), "--claim-idle", "1")
    async with AsyncExitStack() as stack:
        api_env = recording_env(tmp_path / "api.log")
        api = await stack.enter_async_context(run_server(*backend, *MODEL, "--workers", "0", env=api_env))
        http = await stack.enter_async_context(aiohttp.ClientSession(api.url))
        holding = ("--workers", "2", "--max-batch-size", "1", "--shutdown-timeout", "1")
        async with run_worker(*backend, *MODEL, *holding, env=env, lose_redis_cancels=True) as worker:
            pid = await submit_async(http, 7)
            await wait_status(http, [pid], "running")
            await exits_after_sigterm(worker, 1 + EXIT_WITHIN)
        assert any("abandoned" in line for line in worker.log), "".join(worker.log)
        await stack.enter_async_context(run_worker(*backend, *MODEL, env=recording_env(tmp_path / "rescue.log")))
        (record,) = (await wait_all_terminal(http, [pid], timeout=15)).values()
    assert record["status"] == "succeeded" and record["attempts"] == 2
    assert not (tmp_path / "held.log").exists()


@losing_cancels_or_not
async def test_sigterm_ends_an_api_process_listening_to_the_event_channel(
    redis_settings: dict[str, str], tmp_path: Path, lose_cancels: bool
) -> None:
    """Its listener waits on the Redis channel; a WebSocket follows a prediction no worker will take."""
    env, backend = sigterm_setup(redis_settings, tmp_path / "api.log")
    async with (
        run_server(*backend, *MODEL, "--workers", "0", env=env, lose_redis_cancels=lose_cancels) as api,
        aiohttp.ClientSession(api.url) as http,
    ):
        pid = await submit_async(http, 1)
        async with http.ws_connect("/ws") as ws:
            await ws.send_json({"op": "subscribe", "prediction_id": pid})
            assert (await ws.receive_json(timeout=10))["prediction"]["status"] == "queued"
            await exits_after_sigterm(api)
            assert (await ws.receive_json(timeout=10))["type"] == "shutdown"


# -- Redis itself going away ------------------------------------------------------------------------


@contextmanager
def redis_server(directory: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A Redis of this test's own that persists every write (AOF, fsync always)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    args = ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", ""]
    persist = ["--appendonly", "yes", "--appendfsync", "always"]
    proc = subprocess.Popen([binary, *args, *persist], stdout=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@asynccontextmanager
async def answering(url: str) -> AsyncIterator[None]:
    client = aioredis.Redis.from_url(url)

    async def ping() -> None:
        while True:
            try:
                await client.ping()
                return
            except aioredis.ConnectionError:
                await asyncio.sleep(0.05)  # polling a process we started until it listens

    try:
        await asyncio.wait_for(ping(), 10)
        yield
    finally:
        await client.aclose()


async def until_status(http: aiohttp.ClientSession, path: str, status: int, timeout: float = 15) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while True:
            resp = await http.get(path)
            if resp.status == status:
                body: dict[str, Any] = await resp.json()
                return body
            await asyncio.sleep(0.05)  # a client polling the service, as a load balancer would

    return await asyncio.wait_for(poll(), timeout)


async def test_redis_restart_loses_nothing_and_the_service_recovers_by_itself(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    gate = tmp_path / "gate"
    backend = ("--backend", "redis", "--redis-url", url, "--claim-idle", "2")
    with redis_server(tmp_path, port) as first:
        async with answering(url):
            pass
        async with AsyncExitStack() as stack:
            api_env = recording_env(tmp_path / "api.log")
            api = await stack.enter_async_context(run_server(*backend, *MODEL, "--workers", "0", env=api_env))
            env = {**recording_env(tmp_path / "runs.log"), "ZYPHER_TEST_GATE": str(gate)}
            await stack.enter_async_context(run_worker(*backend, *MODEL, "--max-batch-size", "4", env=env))
            http = await stack.enter_async_context(aiohttp.ClientSession(api.url))
            ids = [await submit_async(http, n) for n in range(12)]  # some running behind the gate, most queued

            first.kill()
            first.wait()
            resp = await http.post("/predict", json={"input": {"n": 99}}, headers=ASYNC)
            assert resp.status == 503 and resp.headers["Retry-After"]
            assert (await resp.json())["error"]["code"] == "backend_unavailable"
            assert (await until_status(http, "/readyz", 503))["error"]["code"] == "backend_unavailable"
            assert (await http.get("/healthz")).status == 200  # alive, just not ready

            with redis_server(tmp_path, port):
                await until_status(http, "/readyz", 200)  # recovers without a restart
                gate.touch()
                records = await wait_all_terminal(http, ids, timeout=30)
                assert {r["status"] for r in records.values()} == {"succeeded"}
                assert (await http.post("/predict", json={"input": {"n": 100}})).status == 200
    runs = Counter(int(x) for x in (tmp_path / "runs.log").read_text().split())
    assert runs == Counter([*range(12), 100])  # each once: nothing lost, nothing run twice


async def _follow_stream(ws: aiohttp.ClientWebSocketResponse, pid: str) -> tuple[list[Any], list[Any]]:
    """(the subscribed record's chunks, then every output's) of one prediction, until its end; asserts
    the outputs' indexes run on from the snapshot's chunks without a gap or a repeat."""
    snapshot: list[Any] | None = None
    chunks: list[Any] = []
    while True:
        message = await ws.receive_json(timeout=30)
        if message["type"] == "subscribed":
            snapshot = list(message["prediction"]["result"] or [])
            if message["prediction"]["status"] == "succeeded":
                return snapshot, chunks
        elif message["type"] == "output":
            assert snapshot is not None and message["index"] == len(snapshot) + len(chunks)
            chunks.append(message["chunk"])
        elif message["type"] == "update" and message["prediction"]["status"] == "succeeded":
            assert snapshot is not None and snapshot + chunks == message["prediction"]["result"]
            return snapshot, chunks


async def test_a_worker_process_streams_to_subscribers_on_other_api_processes(
    redis_settings: dict[str, str], tmp_path: Path
) -> None:
    """The generator runs in a worker process; subscribers on two API processes, one from the start and
    one joining mid-stream, and an SSE stream resumed with Last-Event-ID, get every chunk once, in order."""
    backend = backend_args(redis_settings)
    streaming = ("--model", "mock", "--mock-stream-chunks", "400", "--mock-latency-ms", "2")
    async with AsyncExitStack() as stack:
        api_a = await stack.enter_async_context(run_server(*backend, *streaming, "--workers", "0"))
        api_b = await stack.enter_async_context(run_server(*backend, *streaming, "--workers", "0"))
        await stack.enter_async_context(run_worker(*backend, *streaming, "--stream-commit-ms", "50"))
        http_a = await stack.enter_async_context(aiohttp.ClientSession(api_a.url))
        http_b = await stack.enter_async_context(aiohttp.ClientSession(api_b.url))
        everything = [{"index": i, "token": f"t{i} "} for i in range(400)]
        async with http_b.ws_connect("/ws") as early, http_b.ws_connect("/ws") as late:
            resp = await http_a.post("/predict", json={"input": "x", "stream": True}, headers=ASYNC)
            pid = (await resp.json())["prediction_id"]
            await early.send_json({"op": "subscribe", "prediction_id": pid})
            following = asyncio.ensure_future(_follow_stream(early, pid))

            # Join once the store shows some chunks committed: mid-stream, past a commit.
            async def some_committed() -> bool:
                record = await (await http_a.get(f"/predict/{pid}")).json()
                return bool(record["result"])

            await eventually(some_committed, "chunks committed", timeout=30)
            await late.send_json({"op": "subscribe", "prediction_id": pid})
            late_snapshot, late_chunks = await _follow_stream(late, pid)
            early_snapshot, early_chunks = await asyncio.wait_for(following, 30)
        assert early_snapshot + early_chunks == everything
        assert late_snapshot + late_chunks == everything
        assert late_snapshot and late_chunks, "the late subscriber did not join mid-stream"
        resp = await http_a.get(f"/predict/{pid}/events", headers={"Last-Event-ID": "349"})
        body = await resp.text()
    ids = [line[4:] for line in body.splitlines() if line.startswith("id: ")]
    assert ids == [str(i) for i in range(350, 400)]
