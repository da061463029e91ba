"""Helpers for tests that go through HTTP: looking into an app, and running the real `zypher-ws` command."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from fakes import TERMINAL, WAIT
from zypher_ws.backends.memory import MemoryStore
from zypher_ws.backends.redis.keys import RedisKeys
from zypher_ws.client import Prediction
from zypher_ws.http.keys import SERVICE, SETTINGS

STARTUP_TIMEOUT = 30.0
TESTS = str(Path(__file__).parent)

ClientFactory = Callable[..., Awaitable[TestClient]]
"""The `make_client` fixture: make_client(model=None, wait_loaded=True, **settings) -> a test client."""


# -- looking into an app ------------------------------------------------------------------------------


def listener_count(app: web.Application) -> int:
    """How many listeners the app's event bus holds (sockets, SSE streams and sync requests waiting)."""
    count: int = app[SERVICE].bus.listener_count()
    return count


async def stored_count(app: web.Application) -> int:
    """How many prediction records the app's backend holds."""
    store, settings = app[SERVICE].store, app[SETTINGS]
    if isinstance(store, MemoryStore):
        return len(store)
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return len([key async for key in client.scan_iter(match=RedisKeys(settings.redis_prefix).record("*"))])
    finally:
        await client.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    """A bounded poll with a pause, for state the server changes on its own schedule with nothing to
    wait on (a handler's cleanup after a close): checks every 10 ms, fails after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        await asyncio.sleep(0.01)


# -- a client of a real server ----------------------------------------------------------------------------


def recording_env(log: Path, latency: float = 0.01) -> dict[str, str]:
    """The environment of a server running tests/recording_model.py, which logs each execution to `log`."""
    return {
        "ZYPHER_TEST_EXEC_LOG": str(log),
        "ZYPHER_TEST_LATENCY": str(latency),
        "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
    }


async def submit_async(http: aiohttp.ClientSession, n: int) -> str:
    """Submit {"n": n} to the recording model asynchronously; the prediction id of its 202."""
    resp = await http.post("/predict", json={"input": {"n": n}}, headers={"Async-Mode": "true"})
    assert resp.status == 202, await resp.text()
    return str((await resp.json())["prediction_id"])


SUBSCRIPTIONS_PER_SOCKET = 100  # well under the outbox (256), so the snapshots alone never overflow it


async def wait_all_terminal(http: aiohttp.ClientSession, ids: list[str], timeout: float = 60) -> dict[str, Any]:
    """Every prediction's terminal record by id, as pushed to WebSocket subscriptions (no polling)."""

    async def follow(chunk: list[str]) -> dict[str, Any]:
        records: dict[str, Any] = {}
        async with http.ws_connect("/ws") as ws:
            await ws.send_json({"op": "subscribe", "prediction_ids": chunk})
            while len(records) < len(chunk):
                message = await ws.receive_json()
                if message["type"] == "queue":
                    continue  # a queued prediction's place in line
                assert message["type"] in ("subscribed", "update"), message
                record = message["prediction"]
                if record["status"] in TERMINAL:
                    records[record["prediction_id"]] = record
        return records

    chunks = [ids[i : i + SUBSCRIPTIONS_PER_SOCKET] for i in range(0, len(ids), SUBSCRIPTIONS_PER_SOCKET)]
    found = await asyncio.wait_for(asyncio.gather(*(follow(chunk) for chunk in chunks)), timeout)
    return {pid: record for records in found for pid, record in records.items()}


def assert_one_terminal_each_in_order(states: list[Prediction], ids: list[str]) -> None:
    """What a client's watch promises, per id: ranks strictly rising (so no state twice), the last one
    terminal, and exactly one terminal state."""
    by_id: dict[str, list[Prediction]] = {pid: [] for pid in ids}
    for state in states:
        by_id[state.prediction_id].append(state)
    for pid, seen in by_id.items():
        ranks = [s.status.rank for s in seen]
        assert ranks == sorted(set(ranks)), (pid, [s.status for s in seen])
        assert seen and seen[-1].terminal, (pid, [s.status for s in seen])
    assert Counter(s.prediction_id for s in states if s.terminal) == Counter(ids)


# -- the real command -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: asyncio.subprocess.Process
    url: str
    log: list[str]


@asynccontextmanager
async def run_server(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    port: int | None = None,
    also: tuple[str, ...] = (),
    lose_redis_cancels: bool = False,
) -> AsyncIterator[ServerProcess]:
    """Start `python -m zypher_ws serve ARGS` (on a free port by default); yield once ready (and each line
    of `also` is logged: "model NAME version V" for every model of several); SIGTERM it after.
    `lose_redis_cancels`: every cancel of a Redis command in flight goes missing in it (lost_cancels.py)."""
    port = port or free_port()
    # Both lines come from the server's own log: it listens, and the (first) model is loaded or, where
    # workers run elsewhere, described.
    ready = ("Running on", "and ready" if "--workers" not in args or _workers(args) else "(it runs in worker", *also)
    url = f"http://127.0.0.1:{port}"
    async with _run(["serve", "--port", str(port), *args], ready, env, cwd, url, lose_redis_cancels) as server:
        yield server


@asynccontextmanager
async def run_worker(
    *args: str, env: dict[str, str] | None = None, lose_redis_cancels: bool = False
) -> AsyncIterator[ServerProcess]:
    """Start `python -m zypher_ws worker ARGS`; yield once its model is loaded; SIGTERM it after."""
    ready = ("loaded and ready", "worker serving")
    async with _run(["worker", *args], ready, env, None, "", lose_redis_cancels) as worker:
        yield worker


def _workers(args: tuple[str, ...]) -> int:
    return int(args[args.index("--workers") + 1])


# `python -m zypher_ws`, with every cancel of a Redis command in flight lost first.
LOSING_CANCELS = "import lost_cancels; lost_cancels.install(); from zypher_ws.cli import main; main()"


@asynccontextmanager
async def _run(
    argv: list[str],
    ready: tuple[str, ...],
    env: dict[str, str] | None,
    cwd: str | None,
    url: str,
    lose_redis_cancels: bool = False,
) -> AsyncIterator[ServerProcess]:
    environ = {**os.environ, **(env or {})}
    command = ["-m", "zypher_ws"]
    if lose_redis_cancels:
        command = ["-c", LOSING_CANCELS]
        environ["PYTHONPATH"] = os.pathsep.join([TESTS, environ.get("PYTHONPATH", "")])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
        cwd=cwd,
    )
    log: list[str] = []
    assert proc.stderr is not None
    stderr = proc.stderr

    async def until_ready() -> None:
        waiting_for = set(ready)
        while waiting_for:
            line = (await stderr.readline()).decode()
            if not line:
                raise RuntimeError(f"{argv[0]} exited during startup:\n" + "".join(log))
            log.append(line)
            waiting_for = {marker for marker in waiting_for if marker not in line}

    try:
        await asyncio.wait_for(until_ready(), STARTUP_TIMEOUT)
        drain = asyncio.create_task(_drain(stderr, log))
        yield ServerProcess(proc, url, log)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if "drain" in locals():
            await drain


async def _drain(stream: asyncio.StreamReader, log: list[str]) -> None:
    while line := await stream.readline():
        log.append(line.decode())


# -- a webhook receiver ---------------------------------------------------------------------------------


@dataclass
class Delivered:
    """One request a Receiver got."""

    path_qs: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request. It answers from `answers` (a status,
    or a status and headers), one per request, then 200. `start` may come after the service has begun
    sending (a receiver that was down), on the port chosen up front."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.answers: list[int | tuple[int, dict[str, str]]] = []
        self.hold: asyncio.Event | None = None  # while set to an unset event, requests wait for it
        self.on_delivery: Callable[[Delivered], Awaitable[None]] | None = None  # run before answering
        self.got: list[Delivered] = []
        self._arrived: asyncio.Queue[Delivered] = asyncio.Queue()
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        delivered = Delivered(request.path_qs, dict(request.headers), await request.read())
        self.got.append(delivered)
        self._arrived.put_nowait(delivered)
        if self.hold is not None:
            await self.hold.wait()
        if self.on_delivery is not None:
            await self.on_delivery(delivered)
        answer = self.answers.pop(0) if self.answers else 200
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return web.Response(status=status, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def next(self, timeout: float = WAIT) -> Delivered:
        """The next request to arrive (waiting for it at most `timeout` seconds)."""
        return await asyncio.wait_for(self._arrived.get(), timeout)

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
