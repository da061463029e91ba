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
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "zypher_ws",
        "serve",
        "--port",
        str(port),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    log: list[str] = []
    assert proc.stderr is not None
    stderr = proc.stderr

    async def until_ready() -> None:
        # Both lines come from the server's own log: it listens, and the model has loaded.
        waiting_for = {"Running on", "loaded and ready"}
        while waiting_for:
            line = (await stderr.readline()).decode()
            if not line:
                raise RuntimeError("server exited during startup:\n" + "".join(log))
            log.append(line)
            waiting_for = {marker for marker in waiting_for if marker not in line}

    try:
        await asyncio.wait_for(until_ready(), STARTUP_TIMEOUT)
        drain = asyncio.create_task(_drain(stderr, log))
        yield ServerProcess(proc, f"http://127.0.0.1:{port}", log)
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
