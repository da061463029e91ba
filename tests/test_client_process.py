"""The client against `zypher-ws serve` processes: a watch that carries on across a restart."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_one_terminal_each_in_order, free_port, recording_env, run_server
from zypher_ws.client import AsyncClient, Chunk, Client, Prediction, RetryPolicy

ARGS = ("--model", "recording_model:RecordingModel", "--workers", "1", "--max-batch-size", "1")
RETRY = RetryPolicy(total=60, initial=0.05, maximum=0.5)  # a restart takes a few seconds here


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "stop"), [("async", signal.SIGKILL), ("sync", signal.SIGTERM)], ids=["async-kill", "sync-term"]
)
async def test_watch_yields_every_terminal_state_once_across_a_server_restart(
    tmp_path: Path, kind: str, stop: signal.Signals
) -> None:
    """SQLite keeps what was accepted; the client reconnects, subscribes again, and each prediction's
    terminal state comes exactly once, whether it finished before the stop, during it or after."""
    args = (*ARGS, "--store", f"sqlite:///{tmp_path / 'z.db'}", "--shutdown-timeout", "5")
    env = recording_env(tmp_path / "executions.log", latency=0.2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    states: list[Prediction] = []
    some_finished = asyncio.Event()

    def note(state: Prediction) -> None:
        states.append(state)
        if state.terminal:
            loop.call_soon_threadsafe(some_finished.set)

    async with AsyncClient(url, retry=RETRY) as client:
        async with run_server(*args, env=env, port=port) as server:
            ids = [(await client.submit({"n": n})).prediction_id for n in range(8)]
            if kind == "async":

                async def follow() -> int:
                    async for state in client.watch(ids):
                        note(state)
                    return client._live.connects

                watching = asyncio.ensure_future(follow())
            else:

                def follow_sync() -> int:
                    with Client(url, retry=RETRY) as sync_client:
                        for state in sync_client.watch(ids):
                            note(state)
                        return sync_client._async._live.connects

                watching = asyncio.ensure_future(asyncio.to_thread(follow_sync))
            await asyncio.wait_for(some_finished.wait(), 30)
            server.proc.send_signal(stop)
            await asyncio.wait_for(server.proc.wait(), 30)
        finished_before = sum(s.terminal for s in states)
        assert 0 < finished_before < len(ids)  # the restart came in the middle
        async with run_server(*args, env=env, port=port):  # still slow: snapshots of unfinished ones
            connects = await asyncio.wait_for(watching, 60)
    assert_one_terminal_each_in_order(states, ids)
    assert {s.status.value for s in states if s.terminal} == {"succeeded"}
    assert connects >= 2
    assert {s.result["n"] for s in states if s.terminal} == set(range(8))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_a_stream_yields_every_chunk_once_across_a_server_restart(tmp_path: Path, stop: signal.Signals) -> None:
    """A stream cut by a crash (or a stop) is run again after the restart, from the chunks committed; the
    client resumes after the last chunk it has (from_index), so it yields each index once, in order."""
    chunks = 40
    args = ("--model", "mock", "--mock-stream-chunks", str(chunks), "--mock-latency-ms", "40",
            "--store", f"sqlite:///{tmp_path / 'z.db'}", "--shutdown-timeout", "0.5")  # fmt: skip
    port = free_port()
    loop = asyncio.get_running_loop()
    got: list[Any] = []
    some = asyncio.Event()

    async with AsyncClient(f"http://127.0.0.1:{port}", retry=RETRY) as client:

        async def follow() -> list[Any]:
            items = []
            async for item in client.stream(pid):
                items.append(item)
                if isinstance(item, Chunk):
                    got.append(item)
                    if len(got) == 5:
                        loop.call_soon(some.set)
            return items

        async with run_server(*args, port=port) as server:
            pid = (await client.submit({"prompt": "restart"}, stream=True)).prediction_id
            streaming = asyncio.ensure_future(follow())
            await asyncio.wait_for(some.wait(), 30)
            server.proc.send_signal(stop)
            await server.proc.wait()
        async with run_server(*args, port=port):
            items = await asyncio.wait_for(streaming, 60)
    assert [(c.index, c.value) for c in items if isinstance(c, Chunk)] == [
        (i, {"index": i, "token": f"t{i} "}) for i in range(chunks)
    ]
    last = items[-1]
    assert isinstance(last, Prediction) and last.succeeded and items.index(last) == len(items) - 1
    assert client._streams.connects >= 2  # it did connect again
