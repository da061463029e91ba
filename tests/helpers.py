"""Running the real `zypher-ws` command in tests."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

STARTUP_TIMEOUT = 30.0


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
    *args: str, env: dict[str, str] | None = None, cwd: str | None = None, port: int | None = None
) -> AsyncIterator[ServerProcess]:
    """Start `python -m zypher_ws serve ARGS` (on a free port by default); yield once ready; SIGTERM it after."""
    port = port or free_port()
    # Both lines come from the server's own log: it listens, and the model has loaded (or there is none).
    ready = ("Running on", "loaded and ready" if "--workers" not in args or _workers(args) else "no workers")
    async with _run(["serve", "--port", str(port), *args], ready, env, cwd, f"http://127.0.0.1:{port}") as server:
        yield server


@asynccontextmanager
async def run_worker(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[ServerProcess]:
    """Start `python -m zypher_ws worker ARGS`; yield once its model is loaded; SIGTERM it after."""
    async with _run(["worker", *args], ("loaded and ready", "worker taking predictions"), env, None, "") as worker:
        yield worker


def _workers(args: tuple[str, ...]) -> int:
    return int(args[args.index("--workers") + 1])


@asynccontextmanager
async def _run(
    argv: list[str], ready: tuple[str, ...], env: dict[str, str] | None, cwd: str | None, url: str
) -> AsyncIterator[ServerProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "zypher_ws",
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
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
