"""Shared plumbing: servers as pinned processes, wrk runs, peak memory, figures and tables."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = Path(__file__).with_name("wrk.lua")
SERVER_CPU, LOAD_CPU = "0", "1"  # server and load generator on different cores
# One core per side: numpy must not start threads that fight the server for its core.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: str, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else list(argv)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    port: int

    def peak_rss_mib(self) -> float:
        """Peak resident memory of the server and every process under it (gunicorn, process pools)."""
        return sum(_peak_rss_kib(pid) for pid in _process_tree(self.proc.pid)) / 1024

    def rss_mib(self) -> float:
        return sum(_rss_kib(pid) for pid in _process_tree(self.proc.pid)) / 1024

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server and the processes under it have used so far."""
        return cpu_seconds(self.proc.pid)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` and the processes under it have used so far."""
    return sum(_cpu_ticks(p) for p in _process_tree(pid)) / CLOCK_TICKS


@contextmanager
def server(
    argv: Sequence[str],
    *,
    ready_path: str = "/healthz",
    env: dict[str, str] | None = None,
    cwd: str | Path = ROOT,
    ready_timeout: float = 60.0,
) -> Iterator[Server]:
    """Run `argv` (with {port} filled in) pinned to the server core, in `cwd`; yield once `ready_path`
    answers 200 (within `ready_timeout` seconds)."""
    port = free_port()
    args = [a.format(port=port) for a in argv]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        pinned(SERVER_CPU, args),
        cwd=cwd,
        env={**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url + ready_path, proc, log, ready_timeout)
        yield Server(proc, url, port)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # a process starting up: poll it
    log.seek(0)
    raise RuntimeError(f"{url} not ready after {timeout:g} s: {log.read().decode(errors='replace')[-2000:]}")


def _process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                pass  # the thread ended meanwhile
    return pids


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def _rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


# -- load with wrk ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured run: completed requests per second and latency percentiles in ms."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    requests: int = 0  # every answer, errors included (wrk runs only)
    extra: dict[str, float] = field(default_factory=dict)


def wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    body: Any = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    raw_body: bytes | None = None,
) -> Run:
    """Closed-loop load from the load core. Non-2xx answers count as errors, not throughput.

    `body` is sent as JSON; `raw_body` as it is (give its Content-Type in `headers`)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".body") as body_file:
        env = {**os.environ, "BENCH_METHOD": method}
        if body is not None or raw_body is not None:
            body_file.write(raw_body if raw_body is not None else json.dumps(body).encode())
            body_file.flush()
            env["BENCH_BODY"] = body_file.name
        env["BENCH_HEADERS"] = "|".join(f"{k}: {v}" for k, v in (headers or {}).items())
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "60s",
            "-s",
            str(WRK_SCRIPT),
            url,
        ]
        out = subprocess.run(pinned(LOAD_CPU, argv), env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH "))
    r = json.loads(line[len("BENCH ") :])
    good = r["requests"] - r["non2xx"]
    return Run(
        rps=good / (r["duration_us"] / 1e6),
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        errors=r["non2xx"] + r["socket_errors"],
        requests=r["requests"],
    )


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is not installed (apt-get install wrk)")


# -- figures --------------------------------------------------------------------------------------------


@dataclass
class Figure:
    """Repeated measurements of one thing: reported as the median and the spread (min-max)."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def show(self, digits: int = 0, unit: str = "") -> str:
        if not self.values:
            return "—"
        if len(self.values) == 1:
            return f"{self.median:.{digits}f}{unit}"
        return f"{self.median:.{digits}f}{unit} ({min(self.values):.{digits}f}–{max(self.values):.{digits}f})"


def ratio(a: Figure, b: Figure) -> str:
    if not a.values or not b.values or b.median == 0:
        return "—"
    return f"{a.median / b.median:.2f}×"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([f"\n### {title}\n", line, sep, *body])


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"
