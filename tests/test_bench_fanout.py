"""The C fan-out load client (bench/fanout.c, the `live` suite's): it builds, measures a real server, and
reads frames the way RFC 6455 lets a server send them (split over reads, fragmented, pings between).
Nothing here is a speed: only that every socket heard its prediction finish, at a delay that is not
negative."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bench import native
from fakes import WAIT, GatedModel
from helpers import ClientFactory

SOCKETS = 20


@pytest.fixture(scope="module")
def fanout_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built by the bench's own builder, into a cache of this module's (CI has gcc: no skip)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(native, "CACHE", tmp_path_factory.mktemp("bench-cache"))
    try:
        return native.binary("fanout")
    finally:
        mp.undo()


@asynccontextmanager
async def fanout(binary: Path, port: int, sockets: int) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        str(binary), "--host", "127.0.0.1", "--port", str(port), "--sockets", str(sockets), "--timeout", "30",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), WAIT * 4)
    assert raw, "the client exited early"
    answer: dict[str, Any] = json.loads(raw)
    return answer


async def start(proc: asyncio.subprocess.Process, prediction_id: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(prediction_id.encode() + b"\n")
    await proc.stdin.drain()
    proc.stdin.close()


class StampedGate(GatedModel):
    """The gated model, its results stamped with the time it answered, as bench/push_model.py does."""

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        results = super().predict_batch(inputs)
        done_at = time.time()
        return [{**result, "done_at": done_at} for result in results]


async def test_the_c_client_measures_every_socket_of_a_real_server(
    make_client: ClientFactory, fanout_binary: Path
) -> None:
    model = StampedGate()
    client = await make_client(model=model)
    async with fanout(fanout_binary, client.port, SOCKETS) as proc:
        assert await line(proc) == {"ready": SOCKETS}  # every socket upgraded before the prediction exists
        resp = await client.post("/predict", json={"input": {"x": 1}}, headers={"Async-Mode": "true"})
        assert resp.status == 202, await resp.text()
        await start(proc, (await resp.json())["prediction_id"])
        assert await line(proc) == {"subscribed": SOCKETS}
        model.release.set()  # only now: every socket hears it finish as a push
        result = await line(proc)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    assert result["pushed"] == SOCKETS and result["stamp"] == "done_at", result
    assert (result["snapshots"], result["closed"], result["errors"], result["timed_out"]) == (0, 0, 0, 0)
    for clock in ("delays", "kernel_delays"):
        assert len(result[clock]) == SOCKETS and min(result[clock]) >= 0, (clock, result[clock])


# -- a scripted server: frames as RFC 6455 lets a server send them -------------------------------------

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B53"


def server_frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        return head + bytes([n]) + payload
    if n < 1 << 16:
        return head + bytes([126]) + struct.pack("!H", n) + payload
    return head + bytes([127]) + struct.pack("!Q", n) + payload


async def client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One frame from the client, which must mask it (RFC 6455 section 5.3): its opcode and payload."""
    b0, b1 = await reader.readexactly(2)
    assert b1 & 0x80, "a client frame must be masked"
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4)
    data = await reader.readexactly(n)
    return b0 & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def record(status: str, **extra: Any) -> dict[str, Any]:
    return {"prediction_id": "p-1", "status": status, "result": None, "completed_at": None, **extra}


async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Upgrade, take the subscribe, then send the snapshot, a 70 kB message (a 64-bit length), a ping,
    and the terminal update cut into two fragments (a ping between them), itself cut mid-header across
    writes: the second half goes only once the pong for the first ping came, so the client has read
    and kept a partial frame."""
    head = await reader.readuntil(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
    key = {name.lower(): value for name, value in fields.items()}[b"sec-websocket-key"]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip
    opcode, subscribe = await client_frame(reader)
    assert (opcode, json.loads(subscribe)) == (0x1, {"op": "subscribe", "prediction_id": "p-1"})
    done_at = time.time()
    terminal = json.dumps(
        {"type": "update", "prediction": record("succeeded", result={"done_at": done_at, "pad": "x" * 300})},
        separators=(",", ":"),
    ).encode()
    first, second = server_frame(terminal[:150], fin=False), server_frame(terminal[150:], opcode=0x0)
    snapshot = json.dumps({"type": "subscribed", "prediction": record("running")}, separators=(",", ":"))
    big = json.dumps({"type": "output", "chunk": "y" * 70_000}, separators=(",", ":"))
    writer.write(server_frame(snapshot.encode()) + server_frame(big.encode()) + server_frame(b"one", 0x9) + first[:3])
    # The pong: the client has read up to the ping (and, most likely, the partial header written with it).
    assert await client_frame(reader) == (0xA, b"one")
    writer.write(first[3:] + server_frame(b"two", 0x9) + second)
    assert await client_frame(reader) == (0xA, b"two")
    await reader.read()  # until the client closes
    writer.close()


async def test_the_c_client_reads_partial_fragmented_and_interleaved_frames(fanout_binary: Path) -> None:
    failures: list[BaseException] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await scripted(reader, writer)
        except BaseException as exc:  # report it in the test, not in the server's logs
            failures.append(exc)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, fanout(fanout_binary, port, 3) as proc:
        assert await line(proc) == {"ready": 3}
        await start(proc, "p-1")
        assert await line(proc) == {"subscribed": 3}
        result = await line(proc)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    assert not failures, failures
    assert result["pushed"] == 3 and result["stamp"] == "done_at", result
    assert len(result["delays"]) == 3 and min(result["delays"]) >= 0


# -- the build: once per source, again when it changes ---------------------------------------------------


def test_a_build_is_reused_until_its_source_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources, cache = tmp_path / "src", tmp_path / "cache"
    sources.mkdir()
    source = sources / "fanout.c"
    source.write_bytes((native.SOURCES / "fanout.c").read_bytes())
    monkeypatch.setattr(native, "SOURCES", sources)
    monkeypatch.setattr(native, "CACHE", cache)
    first = native.binary("fanout")
    built_at = first.stat().st_mtime_ns
    assert native.binary("fanout") == first and first.stat().st_mtime_ns == built_at  # not built again
    source.write_bytes(source.read_bytes() + b"\n/* changed */\n")
    second = native.binary("fanout")
    assert second != first and os.access(second, os.X_OK)
    assert not first.exists()  # the stale build is gone


def test_without_gcc_the_reason_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "CACHE", tmp_path)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(native.NoCompiler, match="gcc is not installed"):
        native.binary("fanout")
