"""Load that wrk cannot make: async end-to-end, WebSocket push latency, idle sockets; and the model limit.

Each command runs as its own process (pinned by the caller) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import selectors
import socket
import statistics
import struct
import sys
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.harness import cpu_seconds

TERMINAL = {"succeeded", "failed", "canceled"}


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(samples)
    return {
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


def completed_at(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["completed_at"].replace("Z", "+00:00")).timestamp()


def completion(record: dict[str, Any]) -> float:
    """When the prediction finished: the `done_at` bench/push_model.py puts in its result (the wall clock's
    full precision, as the model answered), else the record's `completed_at` (1 ms)."""
    result = record.get("result")
    if isinstance(result, dict) and isinstance(result.get("done_at"), float):
        return result["done_at"]
    return completed_at(record)


# -- async end-to-end: submit with Async-Mode, then wait for the result --------------------------------


async def e2e(url: str, kind: str, concurrency: int, duration: float, body: Any) -> dict[str, Any]:
    """`concurrency` clients, each: submit async, then wait until done (zypher: WebSocket push;
    prototype: polling GET every 5 ms, as its clients had to)."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=conn) as http:

        async def client() -> None:
            nonlocal errors
            ws = await http.ws_connect("/ws") if kind == "zypher" else None
            try:
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    resp = await http.post("/predict", json={"input": body}, headers={"Async-Mode": "true"})
                    if resp.status != 202:
                        errors += 1
                        await resp.read()
                        continue
                    pid = (await resp.json())["prediction_id"]
                    if ws is not None:
                        await ws.send_json({"op": "subscribe", "prediction_id": pid})
                        while True:
                            msg = json.loads((await ws.receive()).data)
                            if msg.get("prediction", {}).get("status") in TERMINAL:
                                break
                    else:
                        # The prototype offers nothing but polling.
                        while (await http.get(f"/predict/{pid}")).status != 200:  # noqa: ASYNC110
                            await asyncio.sleep(0.005)
                    latencies.append(time.perf_counter() - t0)
            finally:
                if ws is not None:
                    await ws.close()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"rps": len(latencies) / elapsed, "errors": errors, **percentiles(latencies)}


# -- push latency: many sockets, each watching a prediction, all finishing together ---------------------


async def push(url: str, sockets: int, urls: list[str]) -> dict[str, Any]:
    """`sockets` WebSockets (spread over `urls`), all subscribed to one prediction submitted on `url`;
    the delay from its completion (the record's completed_at) to each socket's update.

    The server's model must take long enough (about a second) for every socket to subscribe first.
    """
    delays: list[float] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        wss = [await http.ws_connect(f"{urls[i % len(urls)]}/ws") for i in range(sockets)]
        resp = await http.post(url + "/predict", json={"input": {"push": 1}}, headers={"Async-Mode": "true"})
        pid = (await resp.json())["prediction_id"]
        for ws in wss:
            await ws.send_json({"op": "subscribe", "prediction_id": pid})

        async def watch(ws: aiohttp.ClientWebSocketResponse) -> None:
            while True:
                msg = json.loads((await ws.receive()).data)
                record = msg["prediction"]
                if record["status"] in TERMINAL:
                    if msg["type"] == "update":  # finished while we were watching: a real push
                        delays.append(time.time() - completion(record))
                    return

        await asyncio.wait_for(asyncio.gather(*(watch(ws) for ws in wss)), 120)
        for ws in wss:
            await ws.close()
    return {"sockets": sockets, "pushed": len(delays), **percentiles(delays)}


# -- streaming: one prediction's chunks to many sockets; queue positions of a long queue -----------------

STREAM_FIELD = {"stream": True}  # what asks for a model's stream in a request body


async def stream(url: str, sockets: int, chunks: int, interval_ms: float, wait_ms: float) -> dict[str, Any]:
    """`sockets` WebSockets subscribed to one streaming prediction of bench/stream_model.py: the chunks
    each received live (`output` messages), the rate they came at, and the delay from the model's yield
    (the chunk's own timestamp) to each receipt. The model waits `wait_ms` first, so that every socket
    has subscribed before its first chunk."""
    delays: list[float] = []
    received: list[int] = []
    spans: list[tuple[float, float]] = []
    closes: list[int] = []  # close codes of sockets the server dropped
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        wss = [await http.ws_connect(f"{url}/ws", max_msg_size=0) for _ in range(sockets)]
        body = {"input": {"chunks": chunks, "interval_ms": interval_ms, "wait_ms": wait_ms}, **STREAM_FIELD}
        resp = await http.post(url + "/predict", json=body, headers={"Prefer": "respond-async"})
        pid = (await resp.json())["prediction_id"]
        for ws in wss:
            await ws.send_json({"op": "subscribe", "prediction_id": pid})

        async def watch(ws: aiohttp.ClientWebSocketResponse) -> None:
            count, first, last = 0, 0.0, 0.0
            while True:
                frame = await ws.receive()
                if frame.type is not aiohttp.WSMsgType.TEXT:  # the server dropped it (a reader too slow)
                    closes.append(ws.close_code or 0)
                    break
                msg = json.loads(frame.data)
                now = time.time()
                if msg["type"] == "output":
                    delays.append(now - msg["chunk"]["t"])
                    count += 1
                    first, last = first or now, now
                elif "prediction" in msg and msg["prediction"]["status"] in TERMINAL:
                    break
            received.append(count)
            if count > 1:
                spans.append((first, last))

        await asyncio.wait_for(asyncio.gather(*(watch(ws) for ws in wss)), 600)
        for ws in wss:
            await ws.close()
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0.0
    return {
        "sockets": sockets,
        "chunks": chunks,
        "min_received": min(received, default=0),
        "dropped": len(closes),
        "close_codes": sorted(set(closes)),
        "per_socket_per_s": (chunks - 1) / statistics.median(b - a for a, b in spans) if spans else 0.0,
        "pushed_per_s": sum(received) / span if span else 0.0,
        **percentiles(delays),
    }


async def positions(url: str, queued: int, sockets: int, duration: float, server_pid: int) -> dict[str, Any]:
    """A worker held by one prediction while `queued` more wait behind it, `sockets` WebSockets each
    watching one of them (spread along the queue); then the holder is canceled and the queue runs for
    `duration` seconds: the position updates the sockets got, and the server's CPU meanwhile."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=conn) as http:

        async def submit(body: dict[str, Any]) -> str:
            resp = await http.post(
                "/predict", json={"input": body, **STREAM_FIELD}, headers={"Prefer": "respond-async"}
            )
            record = await resp.json()
            if resp.status != 202:
                raise RuntimeError(f"submit answered {resp.status}: {record}")
            return str(record["prediction_id"])

        holder = await submit({"hold_ms": 600_000})
        ids: list[str] = []
        todo = iter(range(queued))

        async def submitter() -> None:
            for _ in todo:
                ids.append(await submit({"hold_ms": 5}))

        await asyncio.gather(*(submitter() for _ in range(64)))
        step = max(1, len(ids) // max(1, sockets))
        watched = ids[::step][:sockets]
        wss = [await http.ws_connect("/ws") for _ in watched]
        for ws, pid in zip(wss, watched, strict=True):
            await ws.send_json({"op": "subscribe", "prediction_id": pid})
            while json.loads((await ws.receive()).data)["type"] != "queue":
                pass  # its snapshot, then its place in line at once: the window counts only the moves
        updates: dict[str, int] = {}

        async def count(ws: aiohttp.ClientWebSocketResponse) -> None:
            while True:
                msg = json.loads((await ws.receive()).data)
                if msg["type"] == "queue":  # {type, prediction_id, queue_position, estimated_start_at}
                    updates[msg["prediction_id"]] = updates.get(msg["prediction_id"], 0) + 1

        async def position(pid: str) -> int:
            async with http.get(f"/predict/{pid}") as resp:
                return int((await resp.json()).get("queue_position") or 0)

        counting = [asyncio.create_task(count(ws)) for ws in wss]
        before_position, before_cpu, started = await position(ids[-1]), cpu_seconds(server_pid), time.monotonic()
        await (await http.delete(f"/predict/{holder}")).read()
        await asyncio.sleep(duration)  # the measured window: the queue runs
        elapsed, cpu = time.monotonic() - started, cpu_seconds(server_pid) - before_cpu
        after_position = await position(ids[-1])
        for task in counting:
            task.cancel()
        await asyncio.gather(*counting, return_exceptions=True)
        for ws in wss:
            await ws.close()
    return {
        "queued": len(ids),
        "sockets": len(wss),
        "updates_per_s": sum(updates.values()) / elapsed,
        "most_per_prediction_per_s": max(updates.values(), default=0) / elapsed,
        "drained_per_s": (before_position - after_position) / elapsed,
        "server_cpu_percent": 100 * cpu / elapsed,
    }


# -- push fan-out, measured by several cheap clients -------------------------------------------------------


class _RawSocket:
    """A WebSocket on a plain socket: the handshake, one masked text frame out, and the server's
    unmasked frames in. No JSON is parsed until the timing is over, so a frame costs the client one
    recv(2), and its receive time is the server's figure, not the client's backlog."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the WebSocket handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    def send_text(self, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + struct.pack("!H", n)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def frames(self) -> list[bytes]:
        """The complete frames' payloads in the buffer (taken out of it)."""
        out = []
        while len(self.buffer) >= 2:
            n, at = self.buffer[1] & 0x7F, 2
            if n == 126:
                if len(self.buffer) < 4:
                    break
                n, at = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif n == 127:
                if len(self.buffer) < 10:
                    break
                n, at = struct.unpack("!Q", self.buffer[2:10])[0], 10
            if len(self.buffer) < at + n:
                break
            out.append(self.buffer[at : at + n])
            self.buffer = self.buffer[at + n :]
        return out


_TERMINAL_BYTES = tuple(f'"status":"{status}"'.encode() for status in TERMINAL)


def fanout(url: str, sockets: int) -> dict[str, Any]:
    """`sockets` WebSockets that say {"ready": n} once open, read a prediction id from stdin, subscribe
    to it, and report each socket's delay from its completion (`completion`) to the terminal update.
    Several of these processes share one prediction (bench/suites.py, `live`); bench/fanout.c is the
    same client in C, speaking the same way to the suite."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raws = [_RawSocket(host, port) for _ in range(sockets)]
    print(json.dumps({"ready": len(raws)}), flush=True)
    pid = sys.stdin.readline().strip()
    subscribe = json.dumps({"op": "subscribe", "prediction_id": pid}).encode()
    selector = selectors.DefaultSelector()
    for raw in raws:
        raw.send_text(subscribe)
        raw.sock.setblocking(False)
        selector.register(raw.sock, selectors.EVENT_READ, raw)
    arrived: list[tuple[float, bytes]] = []
    deadline = time.monotonic() + 120
    while len(arrived) < len(raws) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            raw = key.data
            raw.buffer += raw.sock.recv(1 << 16)
            now = time.time()  # before anything else is done for this socket
            for payload in raw.frames():
                if any(t in payload for t in _TERMINAL_BYTES):
                    arrived.append((now, payload))
                    selector.unregister(raw.sock)
                    break
    delays = []
    for now, payload in arrived:
        message = json.loads(payload)
        if message["type"] == "update":  # finished while we were watching: a real push
            delays.append(now - completion(message["prediction"]))
    for raw in raws:
        raw.sock.close()
    return {"sockets": sockets, "pushed": len(delays), "delays": delays}


# -- idle sockets ----------------------------------------------------------------------------------------


async def idle(url: str, sockets: int, hold: float) -> dict[str, Any]:
    """Open `sockets` idle WebSockets, print when all are open, hold them `hold` seconds."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        wss = []
        for _ in range(sockets):
            wss.append(await http.ws_connect(url + "/ws", heartbeat=None))
        print(json.dumps({"open": len(wss)}), flush=True)
        await asyncio.sleep(hold)  # holding the sockets while the caller measures the server
        for ws in wss:
            await ws.close()
    return {"sockets": len(wss)}


# -- flood: a fixed number of async submissions, as fast as they are accepted ----------------------------


async def flood(url: str, count: int, concurrency: int, body: Any) -> dict[str, Any]:
    accepted = refused = 0
    remaining = count
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=conn) as http:

        async def client() -> None:
            nonlocal accepted, refused, remaining
            while remaining > 0:
                remaining -= 1
                resp = await http.post("/predict", json={"input": body}, headers={"Async-Mode": "true"})
                await resp.read()
                if resp.status == 202:
                    accepted += 1
                else:
                    refused += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"rps": accepted / elapsed, "refused_rps": refused / elapsed, "accepted": accepted, "refused": refused}


async def probe(url: str, rate: float, duration: float) -> dict[str, Any]:
    """GET `url` at a fixed rate, the way a health checker or a load balancer does, and time each answer.

    Open loop: a slow answer does not delay the next probe, so queueing inside the server shows.
    """
    latencies: list[float] = []
    failures = 0

    async def one(http: aiohttp.ClientSession) -> None:
        nonlocal failures
        t0 = time.perf_counter()
        async with http.get(url) as resp:
            await resp.read()
            if resp.status != 200:
                failures += 1
        latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession() as http:
        await one(http)  # open the connection first
        latencies.clear()
        tasks = []
        started = time.perf_counter()
        for i in range(int(rate * duration)):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))  # pacing, not syncing
            tasks.append(asyncio.create_task(one(http)))
        await asyncio.gather(*tasks)
    return {"probes": len(latencies), "failures": failures, **percentiles(latencies)}


# -- the model limit: no HTTP, the model alone at its best batch size -----------------------------------


def model_limit(name: str, duration: float) -> dict[str, Any]:
    from bench.models import bench_model, sample

    model = bench_model(name)
    model.load()
    best: dict[str, Any] = {"rps": 0.0, "batch": 0}
    for batch in (1, 8, 32, 128, 256):
        inputs = [sample(name)] * batch
        model.predict_batch(inputs)
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration / 4:
            model.predict_batch(inputs)
            calls += 1
        rate = calls * batch / (time.perf_counter() - t0)
        if rate > best["rps"]:
            best = {"rps": rate, "batch": batch}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("e2e")
    p.add_argument("--url", required=True)
    p.add_argument("--kind", choices=["zypher", "prototype"], required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--body", required=True)
    p = sub.add_parser("push")
    p.add_argument("--url", required=True)
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--ws-url", action="append", default=[])
    p = sub.add_parser("fanout")
    p.add_argument("--url", required=True)
    p.add_argument("--sockets", type=int, default=250)
    p = sub.add_parser("idle")
    p.add_argument("--url", required=True)
    p.add_argument("--sockets", type=int, default=5000)
    p.add_argument("--hold", type=float, default=3.0)
    p = sub.add_parser("flood")
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--body", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=3.0)
    p = sub.add_parser("stream")
    p.add_argument("--url", required=True)
    p.add_argument("--sockets", type=int, default=1)
    p.add_argument("--chunks", type=int, default=2000)
    p.add_argument("--interval-ms", type=float, default=0.0)
    p.add_argument("--wait-ms", type=float, default=1500.0)
    p = sub.add_parser("positions")
    p.add_argument("--url", required=True)
    p.add_argument("--queued", type=int, default=10_000)
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--server-pid", type=int, required=True)
    p = sub.add_parser("model-limit")
    p.add_argument("--model", required=True)
    p.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    if args.cmd == "e2e":
        out = asyncio.run(e2e(args.url, args.kind, args.concurrency, args.duration, json.loads(args.body)))
    elif args.cmd == "push":
        out = asyncio.run(push(args.url, args.sockets, args.ws_url or [args.url]))
    elif args.cmd == "fanout":
        out = fanout(args.url, args.sockets)
    elif args.cmd == "flood":
        out = asyncio.run(flood(args.url, args.count, args.concurrency, json.loads(args.body)))
    elif args.cmd == "probe":
        out = asyncio.run(probe(args.url, args.rate, args.duration))
    elif args.cmd == "stream":
        out = asyncio.run(stream(args.url, args.sockets, args.chunks, args.interval_ms, args.wait_ms))
    elif args.cmd == "positions":
        out = asyncio.run(positions(args.url, args.queued, args.sockets, args.duration, args.server_pid))
    elif args.cmd == "idle":
        out = asyncio.run(idle(args.url, args.sockets, args.hold))
    else:
        out = model_limit(args.model, args.duration)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
