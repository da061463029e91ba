"""SIGTERM under load: answer everyone at once, exit on time whatever the model does, lose nothing."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import free_port, run_server

pytestmark = pytest.mark.slow  # real processes

WAIT = 10.0
SHUTDOWN_TIMEOUT = 2.0


async def sse_events(resp: aiohttp.ClientResponse, out: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
    kind = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: ") and kind is not None:
            await out.put((kind, json.loads(line[len("data: ") :])))
    await out.put(("eof", {}))


async def queue_depth(http: aiohttp.ClientSession) -> float:
    text = await (await http.get("/metrics")).text()
    found = re.search(r"^zypher_queue_depth\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


async def test_sigterm_under_load_answers_everyone_and_exits_within_the_shutdown_timeout(tmp_path: Path) -> None:
    db = tmp_path / "z.db"
    port = free_port()
    stuck = ("--model", "mock", "--mock-latency-ms", "60000", "--workers", "1", "--store", f"sqlite:///{db}")
    async with (
        run_server(*stuck, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), port=port) as server,
        aiohttp.ClientSession(server.url) as http,
    ):
        # One prediction runs (its model call takes a minute), two sync requests wait behind it.
        resp = await http.post("/predict", json={"input": "long"}, headers={"Async-Mode": "true"})
        running_id = (await resp.json())["prediction_id"]
        events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        stream = await http.get(f"/predict/{running_id}/events")
        reader = asyncio.create_task(sse_events(stream, events))
        ws = await http.ws_connect(f"/ws?prediction_id={running_id}")
        while (await asyncio.wait_for(events.get(), WAIT))[1].get("prediction", {}).get("status") != "running":
            pass  # past its place in line (`queue` events) while it waits
        sync_requests = [asyncio.create_task(http.post("/predict", json={"input": n})) for n in range(2)]

        async def both_waiting() -> None:
            while await queue_depth(http) < 2:  # noqa: ASYNC110 - a bounded poll of /metrics, as a monitor does
                await asyncio.sleep(0.05)

        await asyncio.wait_for(both_waiting(), WAIT)

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # Every waiting sync request answers at once, with the id and Location of its durable prediction.
        answers = await asyncio.wait_for(asyncio.gather(*sync_requests), WAIT)
        assert [a.status for a in answers] == [202, 202]
        sync_ids = []
        for answer in answers:
            record = await answer.json()
            assert record["status"] == "queued"
            assert answer.headers["Location"] == f"/predict/{record['prediction_id']}"
            sync_ids.append(record["prediction_id"])
        # Streams and sockets hear why they end.
        assert (await asyncio.wait_for(events.get(), WAIT))[0] == "shutdown"
        assert (await asyncio.wait_for(events.get(), WAIT))[0] == "eof"
        messages = []
        while (msg := await ws.receive(timeout=WAIT)).type is aiohttp.WSMsgType.TEXT:
            messages.append(json.loads(msg.data))
        assert messages[-1]["type"] == "shutdown"
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)  # going away
        # The minute-long model call does not hold the exit.
        await asyncio.wait_for(server.proc.wait(), SHUTDOWN_TIMEOUT + WAIT)
        elapsed = time.monotonic() - signalled
        await reader
    assert server.proc.returncode == 0
    assert elapsed < SHUTDOWN_TIMEOUT + 3.0, elapsed
    assert any("abandoned" in line for line in server.log), "".join(server.log)

    # Nothing accepted was lost: the next start runs all three.
    async with (
        run_server("--model", "mock", "--workers", "1", "--store", f"sqlite:///{db}", port=port) as server,
        aiohttp.ClientSession(server.url) as http,
    ):
        # Recovery queues them before the service accepts anything: new work finishes after them.
        assert (await http.post("/predict", json={"input": 0})).status == 200
        for pid in [running_id, *sync_ids]:
            record = await (await http.get(f"/predict/{pid}")).json()
            assert record["status"] == "succeeded", record
