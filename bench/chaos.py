"""The chaos suite: the service SIGKILLed, Redis restarted, the disk filled, SIGTERM, slow clients.

Each attack runs under a stream of async and sync submissions of `{"n": N}` (each N once) to the counting
model (bench/chaos_model.py), which logs every execution. Afterwards every accepted prediction is read
back: lost (not found, or not finished) and ran-more-than-attempts (executions logged past the record's
`attempts`) must both be 0. Meanwhile /healthz is probed at a fixed rate from another process.

Every attack is bounded in time; everything runs on loopback. The probe of /healthz also runs as
`python -m bench.chaos watch --url URL`, printing one JSON line when it gets SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from bench.harness import LOAD_CPU, QUIET_ENV, ROOT, SERVER_CPU, Figure, free_port, pinned, table
from bench.models import DIGIT

if TYPE_CHECKING:
    from bench.suites import Options

PY = sys.executable
MODEL = ("--model", "bench.chaos_model:CountingModel")
ASYNC = {"Async-Mode": "true"}
TERMINAL = {"succeeded", "failed", "canceled"}
PROBE_RATE = 20.0  # /healthz a second: a load balancer's health check, not a load of its own
PROBE_TIMEOUT = 1.0  # seconds; a probe past it counts as a timeout (and at this value in the percentiles)
READY_TIMEOUT = 60.0
SETTLE_TIMEOUT = 120.0  # for every accepted prediction to be finished, once the attack is over
CLAIM_IDLE = "3"  # Redis: seconds before live workers take over a killed worker's batch (default 45)
SLOW_READ_TIMEOUT = 5  # --read-timeout for the slow-upload attack (default 30), to keep it short
# digits: 200,000 out-of-range pixels (586 KiB as compact JSON), an error each in both branches of its oneOf
BAD_INPUT = json.dumps({"input": [17] * 200_000}, separators=(",", ":")).encode()


class InvariantsFailed(Exception):
    """An attack lost a prediction or ran one more often than its record says; carries the tables."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("chaos invariants failed")
        self.lines = lines


# -- processes of the suite's own, killed by their pid ------------------------------------------------


class Proc:
    """A process pinned to a core, its output in a log file; started, signalled and reaped by pid."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cpu: str = SERVER_CPU) -> None:
        self.argv, self.log, self.env, self.cpu = argv, log, env or {}, cpu
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *pinned(self.cpu, self.argv),
                cwd=ROOT,
                env={**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT), **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        """The exit status, or None if it is still running after `timeout` seconds."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            return None

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self, timeout: float = 30) -> None:
        self.signal(signal.SIGTERM)
        if self.proc is not None and await self.wait(timeout) is None:
            await self.kill()

    def tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def serve_argv(port: int, *extra: str) -> list[str]:
    base = ["--port", str(port), "--log-level", "WARNING"]
    return [PY, "-m", "zypher_ws", "serve", *base, *extra]


async def until_ready(http: aiohttp.ClientSession, proc: Proc, path: str = "/readyz") -> float:
    """Seconds until `path` answers 200 (polling a process we started); raises if it exits or never does."""
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT:
        if not proc.alive:
            raise RuntimeError(f"{proc.argv[2:4]} exited while starting:\n{proc.tail()}")
        try:
            async with http.get(path, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{path} not ready after {READY_TIMEOUT:g} s:\n{proc.tail()}")


async def until_logged(proc: Proc, marker: str) -> None:
    """Wait for `marker` in a process's log (a worker has no HTTP to poll)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while marker not in proc.tail(1 << 20):
        if not proc.alive or time.monotonic() > deadline:
            raise RuntimeError(f"no {marker!r} from {proc.argv[2:4]}:\n{proc.tail()}")
        await asyncio.sleep(0.05)


# -- the load: streams of async and sync submissions, each input once ---------------------------------


def counted_input(n: int) -> Any:
    return {"n": n}


@dataclass
class Load:
    """What the service accepted (an answer carrying a prediction id) and what it refused, by code."""

    make_input: Callable[[int], Any] = counted_input
    counted: bool = True  # the model logs each execution of `n`
    accepted: dict[str, int] = field(default_factory=dict)  # prediction_id -> n
    answered_wrong: int = 0  # a 200 whose result is not the one for its input
    answers: Counter[str] = field(default_factory=Counter)  # "sync 202": a sync request answered 202
    refused: Counter[str] = field(default_factory=Counter)
    unreachable: int = 0
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    async def stream(self, http: aiohttp.ClientSession, *, sync: bool, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        while not stop.is_set():
            n = next(self.numbers)
            try:
                async with http.post(
                    "/predict", json={"input": self.make_input(n)}, headers=None if sync else ASYNC, timeout=timeout
                ) as resp:
                    status, body = resp.status, await resp.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                self.unreachable += 1
                await asyncio.sleep(0.05)  # down or restarting: a client tries again shortly
                continue
            if status in (200, 202, 500) and isinstance(body, dict) and "prediction_id" in body:
                self.accepted[body["prediction_id"]] = n
                self.answers[f"{'sync' if sync else 'async'} {status}"] += 1
                if self.counted and status == 200 and body.get("result") != {"n": n}:
                    self.answered_wrong += 1
            else:
                error = body.get("error", {}) if isinstance(body, dict) else {}
                self.refused[f"{status} {error.get('code', '')}".strip()] += 1
                await asyncio.sleep(0.05)  # refused (503, Retry-After): back off a little

    @asynccontextmanager
    async def running(
        self, http: aiohttp.ClientSession, *, async_streams: int = 3, sync_streams: int = 2
    ) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self.stream(http, sync=False, stop=stop)) for _ in range(async_streams)]
        tasks += [asyncio.create_task(self.stream(http, sync=True, stop=stop)) for _ in range(sync_streams)]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def settle(http: aiohttp.ClientSession, ids: list[str], timeout: float = SETTLE_TIMEOUT) -> dict[str, Any]:
    """Each prediction's record once finished; None where the service does not know it (404). Ids still
    unfinished at the deadline map to their last record (or are missing if never read)."""
    records: dict[str, Any] = {}
    pending = list(ids)
    limit = asyncio.Semaphore(32)
    deadline = time.monotonic() + timeout

    async def read(pid: str) -> None:
        async with limit:
            try:
                async with http.get(f"/predict/{pid}", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    if resp.status == 404:
                        records[pid] = None
                    elif resp.status == 200:
                        records[pid] = await resp.json()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # asked again on the next pass

    while pending and time.monotonic() < deadline:
        await asyncio.gather(*(read(pid) for pid in pending))
        pending = [p for p in pending if p not in records or (records[p] and records[p]["status"] not in TERMINAL)]
        if pending:
            await asyncio.sleep(0.2)  # a client polling for its results
    return records


# -- /healthz, probed from another process ---------------------------------------------------------


async def watch(url: str, rate: float, timeout: float) -> dict[str, Any]:
    """GET `url` `rate` times a second (open loop, a new connection each, `timeout` each) until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    latencies: list[float] = []
    counts = Counter[str]()

    async def one(http: aiohttp.ClientSession) -> None:
        t0 = time.perf_counter()
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                counts["ok" if resp.status == 200 else "not_200"] += 1
        except asyncio.TimeoutError:
            counts["timeouts"] += 1
            latencies.append(timeout)
            return
        except (aiohttp.ClientError, OSError):
            counts["down"] += 1  # refused or reset: nothing listening
            return
        latencies.append(time.perf_counter() - t0)

    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as http:
        print("watching", flush=True)
        started = time.perf_counter()
        for i in itertools.count():
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)  # pacing, and the stop signal
                except asyncio.TimeoutError:
                    pass
            if stop.is_set():
                break
            tasks.append(asyncio.create_task(one(http)))
        await asyncio.gather(*tasks)
    ordered = sorted(latencies)
    pct = {
        f"p{q}_ms": ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] * 1000 if ordered else float("nan")
        for q in (50, 99)
    }
    return {"probes": len(tasks), **{k: counts[k] for k in ("ok", "not_200", "timeouts", "down")}, **pct}


@asynccontextmanager
async def probing(url: str) -> AsyncIterator[dict[str, Any]]:
    """Probe `url` from a process on the load core for the duration of the block; the dict fills at exit."""
    argv = [PY, "-m", "bench.chaos", "watch", "--url", url, "--rate", str(PROBE_RATE)]
    proc = await asyncio.create_subprocess_exec(
        *pinned(LOAD_CPU, [*argv, "--timeout", str(PROBE_TIMEOUT)]),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)  # "watching": its SIGTERM handler is set
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT + 30)
        lines = out.decode().strip().splitlines()
        if not lines:
            raise RuntimeError(f"the /healthz prober printed no result (exit {proc.returncode})")
        result.update(json.loads(lines[-1]))


# -- one attack's figures and the invariants ----------------------------------------------------------


@dataclass
class Row:
    attack: str
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    over_run: int | None = None  # None: executions not counted (not the counting model)
    wrong: int = 0  # succeeded with another input's result, or without ever running
    exit_s: Figure | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (
            self.error is None and self.lost == 0 and not self.over_run and self.wrong == 0
        )

    def cells(self) -> list[str]:
        if self.skipped is not None:
            return [self.attack, *["—"] * 10, f"skipped: {self.skipped}"]
        p = self.probe
        timeout_ms = PROBE_TIMEOUT * 1000

        def ms(key: str) -> str:
            value = p.get(key, float("nan"))
            return "—" if value != value else (f"≥ {timeout_ms:.0f}" if value >= timeout_ms else f"{value:.1f}")

        verdict = "pass" if self.ok else "**FAIL**" + (f" ({self.error})" if self.error else "")
        return [
            self.attack,
            f"{self.accepted:,}",
            f"{self.succeeded:,}",
            f"{self.failed:,}",
            f"{self.lost:,}",
            "—" if self.over_run is None else f"{self.over_run:,}",
            self.exit_s.show(2) if self.exit_s else "—",
            ms("p50_ms"),
            ms("p99_ms"),
            f"{p.get('timeouts', 0)} / {p.get('probes', 0)}" if p else "—",
            f"{p.get('down', 0)}" if p else "—",
            verdict,
        ]


HEADER = [
    "attack",
    "accepted",
    "succeeded",
    "failed",
    "lost",
    "ran > attempts",
    "time to exit s",
    "/healthz p50 ms",
    "/healthz p99 ms",
    "probes timed out",
    "probes refused",
    "lost = 0, ran ≤ attempts",
]


def judge(row: Row, load: Load, records: dict[str, Any], exec_log: Path | None) -> Row:
    """Fill the row from what was accepted, the records read back and the execution log."""
    runs = Counter(int(x) for x in exec_log.read_text().split()) if exec_log and exec_log.exists() else Counter()
    row.accepted = len(load.accepted)
    row.wrong = load.answered_wrong
    row.over_run = 0 if load.counted else None
    lost: Counter[str] = Counter()  # how each lost one was last seen
    lost_ids: list[str] = []
    for pid, n in load.accepted.items():
        record = records.get(pid)
        if record is None or record["status"] not in TERMINAL:
            lost["not found (404)" if pid in records and record is None else _unfinished(record)] += 1
            lost_ids.append(pid)
            continue
        if record["status"] == "succeeded":
            row.succeeded += 1
            if load.counted and (record["result"] != {"n": n} or runs[n] == 0):
                row.wrong += 1
        else:
            row.failed += 1
        if load.counted and runs[n] > record["attempts"]:
            row.over_run = (row.over_run or 0) + 1
    row.lost = len(lost_ids)
    restarted = sum(1 for r in records.values() if r and r["attempts"] > 1)
    rerun = sum(1 for n in load.accepted.values() if runs[n] > 1)
    row.notes.append(
        f"started more than once (attempts > 1): {restarted:,}"
        + (f", ran more than once: {rerun:,}" if load.counted else "")
    )
    if lost:
        said = ", ".join(f"{n} {how}" for how, n in lost.most_common())
        row.notes.append(f"**lost**: {said} after {SETTLE_TIMEOUT:g} s; e.g. {', '.join(lost_ids[:3])}")
    if row.wrong:
        row.notes.append(f"{row.wrong} succeeded with a wrong result or without a logged execution")
    failed = Counter(
        r["error"]["code"] for r in records.values() if r and r["status"] == "failed" and r.get("error")
    )  # fmt: skip
    if failed:
        row.notes.append("failed: " + ", ".join(f"{n} {code}" for code, n in failed.most_common()))
    row.notes.append("answers: " + ", ".join(f"{n:,} × {kind}" for kind, n in sorted(load.answers.items())))
    if load.refused:
        row.notes.append("refused: " + ", ".join(f"{n:,} × {code}" for code, n in load.refused.most_common()))
    return row


def _unfinished(record: dict[str, Any] | None) -> str:
    if record is None:
        return "never read"
    return f"still {record['status']} (attempts {record['attempts']})"


# -- the attacks ------------------------------------------------------------------------------------


async def sigkill_sqlite(tmp: Path, rounds: int, seed: int = 14) -> Row:
    """SIGKILL the one process `rounds` times at random moments (one round in ten while it starts)."""
    row = Row(f"SIGKILL × {rounds}, SQLite")
    db, exec_log, port = tmp / "kill.db", tmp / "kill.exec", free_port()
    argv = serve_argv(port, "--store", f"sqlite:///{db}", *MODEL)
    env = {"BENCH_EXEC_LOG": str(exec_log)}
    rng = random.Random(seed)
    load = Load()
    ready, up, gone = Figure(), Figure(), Figure()
    url = f"http://127.0.0.1:{port}"
    last = Proc(argv, tmp / "kill.log", env)
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession(url))
        stack.push_async_callback(last.stop)  # whatever happens, nothing of ours outlives the attack
        async with probing(url + "/healthz") as row.probe, load.running(http):
            for _ in range(rounds):
                proc = await Proc(argv, tmp / "kill.log", env).start()
                try:
                    if rng.random() < 0.1:
                        await asyncio.sleep(rng.uniform(0, 2.0))  # while importing, loading, recovering
                    else:
                        ready.add(await until_ready(http, proc))
                        alive_for = rng.uniform(0.05, 1.0)
                        up.add(alive_for)
                        await asyncio.sleep(alive_for)
                finally:
                    killed = time.monotonic()
                    await proc.kill()
                    gone.add(time.monotonic() - killed)
            await until_ready(http, await last.start())
            await asyncio.sleep(1.0)  # the streams go on against the last start for a second
        records = await settle(http, list(load.accepted))
    row.notes.append(
        f"start to ready {ready.show(2)} s median (min–max); up {up.show(2)} s before each kill; "
        f"{rounds - len(ready.values)} killed while starting; SIGKILL to reaped {gone.show(2)} s (a process "
        "in the middle of an fsync goes only once it returns: probes meanwhile wait, and may time out)"
    )
    return judge(row, load, records, exec_log)


def redis_argv(port: int, directory: Path) -> list[str]:
    return [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", "",
        "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
    ]  # fmt: skip


async def until_redis(port: int) -> None:
    """Poll our own Redis with PING until it answers (it is loading its AOF meanwhile)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            answer = await asyncio.wait_for(reader.readline(), 1)
            writer.close()
            await writer.wait_closed()
            if answer.startswith(b"+PONG"):
                return
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"redis on port {port} never answered PING")


async def redis_restarts(tmp: Path, duration: float) -> Row:
    """One API process and two worker processes on a Redis of our own (AOF, fsync always): Redis
    SIGKILLed and restarted, a worker SIGKILLed and restarted, Redis SIGTERMed and restarted."""
    row = Row("Redis: 2 restarts, worker SIGKILL")
    rport, aport = free_port(), free_port()
    directory = tmp / "redis"
    directory.mkdir()
    exec_log = tmp / "redis.exec"
    env = {"BENCH_EXEC_LOG": str(exec_log)}
    backend = ["--backend", "redis", "--redis-url", f"redis://127.0.0.1:{rport}/0", "--claim-idle", CLAIM_IDLE]
    worker_argv = [PY, "-m", "zypher_ws", "worker", *backend, *MODEL, "--workers", "2", "--log-level", "INFO"]
    load = Load()
    url = f"http://127.0.0.1:{aport}"
    async with AsyncExitStack() as stack:
        redis = await Proc(redis_argv(rport, directory), tmp / "redis.log", cpu=SERVER_CPU).start()
        stack.push_async_callback(lambda: redis.kill())
        await until_redis(rport)
        api = await Proc(serve_argv(aport, *backend, *MODEL, "--workers", "0"), tmp / "redis-api.log", env).start()
        stack.push_async_callback(api.stop)
        workers = [Proc(worker_argv, tmp / f"redis-worker-{i}.log", env) for i in range(2)]
        for w in workers:
            await w.start()
            stack.push_async_callback(w.stop)
        http = await stack.enter_async_context(aiohttp.ClientSession(url))
        await until_ready(http, api)
        for w in workers:
            await until_logged(w, "worker serving")
        outage = Figure()
        async with probing(url + "/healthz") as row.probe, load.running(http):
            await asyncio.sleep(duration)
            for how in (signal.SIGKILL, None, signal.SIGTERM):
                if how is None:  # a worker, SIGKILLed holding its batches, and started again
                    await workers[0].kill()
                    await asyncio.sleep(0.5)
                    await workers[0].start()
                else:
                    t0 = time.monotonic()
                    redis.signal(how)
                    await redis.wait(30)
                    await asyncio.sleep(1.0)  # down for a second
                    await redis.start()
                    await until_redis(rport)
                    await until_ready(http, api)
                    outage.add(time.monotonic() - t0)
                await asyncio.sleep(duration)
        records = await settle(http, list(load.accepted))
    taken = [line for w in workers for line in w.tail(1 << 24).splitlines() if "took over" in line]
    row.notes.append(
        f"Redis down, then until /readyz 200 again: {outage.show(2)} s; workers took over a lost worker's "
        f"predictions {len(taken)} time(s) (--claim-idle {CLAIM_IDLE})"
    )
    return judge(row, load, records, exec_log)


async def command(*argv: str) -> tuple[int, str]:
    """Run a short command; its exit status and what it said."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        return 127, str(exc)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def readiness(http: aiohttp.ClientSession) -> str:
    """/readyz as "200" or "503 storage_full"."""
    try:
        async with http.get("/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return type(exc).__name__
    code = body.get("error", {}).get("code", "") if resp.status != 200 and isinstance(body, dict) else ""
    return f"{resp.status} {code}".strip()


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; returns it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0" * 512):
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


async def disk_full(tmp: Path, duration: float) -> Row:
    """SQLite on a tmpfs of 64 MiB mounted for the attack: filled under load, then freed, no restart.

    Large enough that the records the load writes after the space is freed (the database and its WAL
    grow with them) do not fill it again: 8 MiB did, at the rates the service reaches now.
    """
    row = Row("disk full then freed, SQLite on 64 MiB tmpfs")
    mnt = tmp / "tmpfs"
    mnt.mkdir()
    status, said = await command("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt))
    if status != 0:
        row.skipped = f"`mount -t tmpfs` failed here: {said[:120]}"
        return row
    exec_log, port = tmp / "full.exec", free_port()
    url = f"http://127.0.0.1:{port}"
    load = Load()
    readyz: Counter[str] = Counter()
    try:
        argv = serve_argv(port, "--store", f"sqlite:///{mnt / 'full.db'}", *MODEL)
        proc = await Proc(argv, tmp / "full.log", {"BENCH_EXEC_LOG": str(exec_log)}).start()
        try:
            async with aiohttp.ClientSession(url) as http:
                await until_ready(http, proc)
                async with probing(url + "/healthz") as row.probe, load.running(http):
                    await asyncio.sleep(duration)
                    filler = fill(mnt)
                    full_at = len(load.accepted)
                    refused_before = load.refused.copy()
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 2 * duration:
                        readyz[await readiness(http)] += 1
                        await asyncio.sleep(0.2)  # a load balancer's readiness check
                    accepted_while_full = len(load.accepted) - full_at
                    refused_full = load.refused["503 storage_full"] - refused_before["503 storage_full"]
                    filler.unlink()
                    freed = time.monotonic()
                    await until_ready(http, proc)
                    recovered = time.monotonic() - freed
                    await asyncio.sleep(duration)
                records = await settle(http, list(load.accepted))
        finally:
            await proc.stop()
    finally:
        await command("umount", "-l", str(mnt))
    row.notes.append(
        f"while full ({2 * duration:g} s): {refused_full:,} submissions refused 503 storage_full, "
        f"{accepted_while_full:,} accepted; /readyz answered "
        + ", ".join(f"{n} × {s}" for s, n in readyz.most_common())
        + f"; ready again {recovered:.2f} s after the file was deleted, without a restart"
    )
    return judge(row, load, records, exec_log)


async def sigterm(tmp: Path, duration: float, repeat: int, *, latency: float, shutdown_timeout: float) -> Row:
    """SIGTERM under load, `repeat` times (a fresh database each): the time to exit, and then a start
    with a fast model to finish what the stopped one kept."""
    stuck = latency > shutdown_timeout
    name = f"SIGTERM × {repeat}, model {latency * 1000:g} ms" + (f", --shutdown-timeout {shutdown_timeout:g}")
    row = Row(name, exit_s=Figure())
    exec_log = tmp / f"term-{latency:g}.exec"
    load = Load()
    records: dict[str, Any] = {}
    codes: list[int | None] = []
    bound = shutdown_timeout + 2.0
    for i in range(repeat):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        db = tmp / f"term-{latency:g}-{i}.db"
        args = ("--store", f"sqlite:///{db}", *MODEL, "--shutdown-timeout", f"{shutdown_timeout:g}")
        env = {"BENCH_EXEC_LOG": str(exec_log), "BENCH_LATENCY": str(latency)}
        mine = Load(numbers=load.numbers)
        async with aiohttp.ClientSession(url) as http:
            proc = await Proc(serve_argv(port, *args), tmp / "term.log", env).start()
            try:
                await until_ready(http, proc)
                async with probing(url + "/healthz") as probe, mine.running(http):
                    await asyncio.sleep(duration)
                    t0 = time.monotonic()
                    proc.signal(signal.SIGTERM)
                    codes.append(await proc.wait(bound + 15))
                    assert row.exit_s is not None
                    row.exit_s.add(time.monotonic() - t0)
            finally:
                await proc.kill()
            fast = await Proc(serve_argv(port, *args), tmp / "term.log", {**env, "BENCH_LATENCY": "0.01"}).start()
            try:
                await until_ready(http, fast)
                records.update(await settle(http, list(mine.accepted)))
            finally:
                await fast.stop()
        load.accepted.update(mine.accepted)
        load.refused.update(mine.refused)
        load.answers.update(mine.answers)
        load.answered_wrong += mine.answered_wrong
        for key in ("probes", "ok", "timeouts", "down", "not_200"):
            row.probe[key] = row.probe.get(key, 0) + probe.get(key, 0)
        for key in ("p50_ms", "p99_ms"):  # the worst run's
            row.probe[key] = max(row.probe.get(key, 0.0), probe.get(key, 0.0))
    assert row.exit_s is not None
    late = sum(1 for s in row.exit_s.values if s > bound)
    row.notes.append(
        f"exit statuses {codes}; {late} of {repeat} past --shutdown-timeout + 2 s ({bound:g} s)"
        + ("; the model calls still running were abandoned and ran again at the next start" if stuck else "")
        + "; /healthz p50 and p99 are the worst run's"
    )
    if late or any(code != 0 for code in codes):
        row.error = "exit late or not 0"
    return judge(row, load, records, exec_log)


async def slow_input(tmp: Path, repeat: int) -> Row:
    """The digits model fed an invalid input of ~586 KiB, `repeat` times in turn (each bounded),
    under a stream of valid submissions."""
    row = Row(f"slow input: invalid {len(BAD_INPUT) / 1024:.0f} KiB to digits × {repeat}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load = Load(make_input=lambda n: DIGIT, counted=False)
    times, statuses = Figure(), Counter[str]()
    proc = await Proc(serve_argv(port, "--store", f"sqlite:///{tmp / 'input.db'}"), tmp / "input.log").start()
    try:
        async with aiohttp.ClientSession(url) as http:
            await until_ready(http, proc)
            async with probing(url + "/healthz") as row.probe, load.running(http, async_streams=1, sync_streams=1):
                for _ in range(repeat):
                    t0 = time.monotonic()
                    try:
                        async with http.post(
                            "/predict", data=BAD_INPUT, headers={"Content-Type": "application/json"},
                            timeout=aiohttp.ClientTimeout(total=30),
                        ) as resp:  # fmt: skip
                            await resp.read()
                            statuses[str(resp.status)] += 1
                    except asyncio.TimeoutError:
                        statuses["no answer in 30 s"] += 1
                    times.add(time.monotonic() - t0)
                    await asyncio.sleep(1.0)
            records = await settle(http, list(load.accepted))
    finally:
        await proc.stop()
    row.notes.append(
        f"each invalid input answered in {times.show(2)} s median (min–max): "
        + ", ".join(f"{n} × {s}" for s, n in statuses.items())
        + "; the valid stream is the digits model (executions not counted)"
    )
    return judge(row, load, records, None)


async def trickle(port: int, *, head_only: bool, bound: float) -> str:
    """One client sending a request a byte a second: what happened to it within `bound` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # A head never ends (a header value that grows), a body never completes (JSON whitespace).
    writer.write(head + b"X-Slow: " if head_only else head + b"Content-Length: 1000\r\n\r\n" + b'{"input": {"n": ')

    async def dribble() -> None:
        while True:
            await asyncio.sleep(1.0)  # the slow client's pace
            writer.write(b"a" if head_only else b" ")
            await writer.drain()

    dribbling = asyncio.create_task(dribble())
    try:
        answer = await asyncio.wait_for(reader.read(64), bound)
        return "closed" if not answer else answer.split(b"\r\n", 1)[0].decode(errors="replace")[9:12]
    except asyncio.TimeoutError:
        return "still open"
    except OSError:
        return "closed"
    finally:
        dribbling.cancel()
        await asyncio.gather(dribbling, return_exceptions=True)
        writer.close()


async def slow_upload(tmp: Path, uploads: int = 300, heads: int = 100) -> Row:
    """`uploads` bodies and `heads` request heads trickled a byte a second, under the usual load."""
    row = Row(f"slow upload: {uploads} bodies + {heads} heads trickled, --read-timeout {SLOW_READ_TIMEOUT}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exec_log = tmp / "upload.exec"
    args = ("--store", f"sqlite:///{tmp / 'upload.db'}", *MODEL, "--read-timeout", str(SLOW_READ_TIMEOUT))
    proc = await Proc(serve_argv(port, *args), tmp / "upload.log", {"BENCH_EXEC_LOG": str(exec_log)}).start()
    load = Load()
    bound = SLOW_READ_TIMEOUT + 10.0
    try:
        async with aiohttp.ClientSession(url) as http:
            await until_ready(http, proc)
            async with probing(url + "/healthz") as row.probe, load.running(http):
                t0 = time.monotonic()
                ends = await asyncio.gather(
                    *(trickle(port, head_only=False, bound=bound) for _ in range(uploads)),
                    *(trickle(port, head_only=True, bound=bound) for _ in range(heads)),
                )
                took = time.monotonic() - t0
            records = await settle(http, list(load.accepted))
    finally:
        await proc.stop()
    bodies, heads_seen = Counter(ends[:uploads]), Counter(ends[uploads:])
    row.notes.append(
        f"trickled bodies: {', '.join(f'{n} × {s}' for s, n in bodies.items())}; "
        f"trickled heads: {', '.join(f'{n} × {s}' for s, n in heads_seen.items())}; all done in {took:.1f} s"
    )
    return judge(row, load, records, exec_log)


# -- the suite --------------------------------------------------------------------------------------


def attacks(opts: Options, tmp: Path) -> list[tuple[str, Callable[[], Any]]]:
    d, rep = opts.duration, opts.repeat
    return [
        ("sigkill", lambda: sigkill_sqlite(tmp, opts.chaos_rounds)),
        ("redis", lambda: redis_restarts(tmp, d)),
        ("disk-full", lambda: disk_full(tmp, d)),
        ("sigterm", lambda: sigterm(tmp, d, rep, latency=0.2, shutdown_timeout=30)),
        ("sigterm-stuck", lambda: sigterm(tmp, d, rep, latency=60, shutdown_timeout=2)),
        ("slow-input", lambda: slow_input(tmp, min(rep, 3))),
        ("slow-upload", lambda: slow_upload(tmp)),
    ]


async def run_attack(name: str, attack: Callable[[], Any]) -> Row:
    started = time.monotonic()
    try:
        row: Row = await attack()
    except Exception as exc:  # reported as a failed row: the other attacks still run
        row = Row(name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        row.notes.append(f"{type(exc).__name__}: {exc}"[:2000])
    print(f"  chaos {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return row


@contextmanager
def on_load_core() -> Iterator[None]:
    """The suite's own clients run on the load core, away from the servers'."""
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {int(LOAD_CPU)})
    except OSError:
        pass
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def chaos(opts: Options, only: Sequence[str] = (), keep: Path | None = None) -> list[str]:
    """Every attack in turn (or those named); raises InvariantsFailed, with the tables, if one lost a
    prediction, ran one more often than its record says, or could not be run. With `keep`, the
    databases, Redis files, execution logs and process logs stay in that directory."""
    rows: list[Row] = []
    with ExitStack() as stack:
        if keep is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="zypher-chaos-"))
        else:
            keep.mkdir(parents=True, exist_ok=False)
            tmp = str(keep)
        stack.enter_context(on_load_core())
        for name, attack in attacks(opts, Path(tmp)):
            if not only or name in only:
                rows.append(asyncio.run(run_attack(name, attack)))
    lines = [
        table(
            f"chaos: nothing accepted is lost (counting model, 10 ms a batch unless said; SQLite FULL; "
            f"GET /healthz {PROBE_RATE:g}/s from another process, {PROBE_TIMEOUT * 1000:g} ms timeout, "
            "a timed-out probe counted at the timeout)",
            HEADER,
            [r.cells() for r in rows],
        ),
        "",
        *[f"- {r.attack}: " + "; ".join(r.notes) for r in rows if r.notes],
    ]
    if not all(r.ok for r in rows):
        raise InvariantsFailed(lines)
    return lines


def main() -> None:
    from bench.suites import Options

    parser = argparse.ArgumentParser(prog="python -m bench.chaos")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("watch", help="probe a URL at a fixed rate until SIGTERM; print one JSON line")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, default=PROBE_RATE)
    p.add_argument("--timeout", type=float, default=PROBE_TIMEOUT)
    p = sub.add_parser("attack", help="run some attacks alone and print their table; exit 1 if one fails")
    p.add_argument("names", nargs="+", choices=[name for name, _ in attacks(Options(), Path())])
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chaos-rounds", type=int, default=100)
    p.add_argument("--keep", type=Path, help="a new directory to run in and keep (databases, logs)")
    args = parser.parse_args()
    if args.cmd == "watch":
        print(json.dumps(asyncio.run(watch(args.url, args.rate, args.timeout))), flush=True)
        return
    opts = Options(duration=args.duration, repeat=args.repeat, chaos_rounds=args.chaos_rounds)
    try:
        lines = chaos(opts, only=args.names, keep=args.keep)
    except InvariantsFailed as failure:
        print("\n".join(failure.lines), flush=True)
        sys.exit(1)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
