"""The `peers` suite: zypher-ws as the Quick start runs it against LitServe, BentoML, MLServer and Ray
Serve (its default proxy and its HAProxy mode) on the same mock model, each with its own batching and
one worker, in the same rounds, with the ratios paired within a round.

Each peer runs in a virtual environment of its own, with pinned versions, that this suite creates on
first use under ~/.cache/zypher-bench/peers/ (ZYPHER_BENCH_CACHE moves it) and reuses afterwards; a peer
that cannot be installed or started is skipped with the reason printed. The peers' apps are the
*_app.py files beside this one; bench/peers/mock_model.py repeats the mock model's few lines for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.harness import SERVER_CPU, Figure, Run, Server, _process_tree, free_port, server, table, wrk
from bench.peers.mock_model import MockModel

if TYPE_CHECKING:
    from bench.suites import Options

HERE = Path(__file__).resolve().parent
PY = sys.executable
BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("ZYPHER_BENCH_CACHE", Path.home() / ".cache" / "zypher-bench")) / "peers"
INSTALL_TIMEOUT_S = 1800
INPUT = [1, 2, 3]  # the defaults suite's input
WARM_UP_S = 2  # of load before each measured run, not counted: Ray's first seconds are its slowest
DRAIN_TIMEOUT_S = 180
# Telemetry off; Ray keeps to loopback and one local cluster of its own.
QUIET = {"BENTOML_DO_NOT_TRACK": "True", "RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "1"}


@dataclass(frozen=True)
class Scenario:
    name: str
    latency_ms: int
    connections: int
    target: float  # zypher-ws ÷ every peer, the aim


SCENARIOS = (
    Scenario("`mock` 0 ms, sync c=32", 0, 32, 3.0),
    Scenario("`mock` 50 ms (batches of 32), sync c=256", 50, 256, 2.0),
)


@dataclass(frozen=True)
class Venv:
    """A peer's virtual environment: its directory name and the pinned requirements pip installs."""

    key: str
    version: str
    requirements: tuple[str, ...]

    @property
    def path(self) -> Path:
        return CACHE / f"{self.key}-{self.version}"


VENVS = {
    "litserve": Venv("litserve", "0.2.19", ("litserve==0.2.19",)),
    "bentoml": Venv("bentoml", "1.4.40", ("bentoml==1.4.40",)),
    # uvloop 0.22 and later make MLServer 1.7.1's inference worker die at start.
    "mlserver": Venv("mlserver", "1.7.1", ("mlserver==1.7.1", "uvloop==0.21.0")),
    "ray": Venv("ray", "2.60.0", ("ray[serve]==2.60.0",)),
}


@dataclass(frozen=True)
class Peer:
    """One server of the suite. `argv` gets the venv's bin folder (None for zypher-ws) and the scenario's
    latency, and may hold {port}; `body` makes the request body for an input."""

    name: str
    venv: str | None
    config: str
    argv: Callable[[Path, int], list[str]]
    ready_path: str
    predict_path: str
    body: Callable[[Any], Any]
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 60.0


def _zypher(bin_: Path, latency_ms: int) -> list[str]:
    # `zypher-ws serve --model mock` exactly as the Quick start runs it (see the defaults suite): the
    # default SQLite store in a fresh working directory, INFO logs; only --port added.
    extra = ["--mock-latency-ms", str(latency_ms)] if latency_ms else []
    return [str(BIN / "zypher-ws"), "serve", "--port", "{port}", "--model", "mock", *extra]


def _mlserver(bin_: Path, latency_ms: int) -> list[str]:
    ports = [f"MLSERVER_GRPC_PORT={free_port()}", f"MLSERVER_METRICS_PORT={free_port()}"]
    return ["env", "MLSERVER_HOST=127.0.0.1", "MLSERVER_HTTP_PORT={port}", *ports,
            str(bin_ / "mlserver"), "start", str(HERE / "mlserver_model")]  # fmt: skip


def _v2_body(x: Any) -> Any:
    return {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [json.dumps(x)]}]}


RAY_HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

PEERS = (
    Peer(
        "zypher-ws (defaults)", None,
        "`zypher-ws serve --model mock` as the Quick start runs it: SQLite store (`zypher.db`, fresh), INFO "
        "logs, batches of 32, 2 ms batch delay, 2 model calls in flight",
        _zypher, "/readyz", "/predict", lambda x: {"input": x},
    ),
    Peer(
        "LitServe 0.2.19", "litserve",
        "`LitServer(accelerator='cpu', devices=1, workers_per_device=1, fast_queue=True)`, "
        "`LitAPI(max_batch_size=32, batch_timeout=0.002)`, one API server process, INFO logs",
        lambda b, _: [str(b / "python"), str(HERE / "litserve_app.py"), "--port", "{port}"],
        "/health", "/predict", lambda x: {"input": x},
    ),
    Peer(
        "BentoML 1.4.40", "bentoml",
        "`@bentoml.service(workers=1)`, `@bentoml.api(batchable=True, max_batch_size=32)` (adaptive "
        "batching, default `max_latency_ms` 60000), `bentoml serve`, INFO logs",
        lambda b, _: [str(b / "bentoml"), "serve", "bentoml_app:Mock", "--host", "127.0.0.1", "--port", "{port}"],
        "/readyz", "/predict", lambda x: {"inputs": [x]},
    ),
    Peer(
        "MLServer 1.7.1", "mlserver",
        "`mlserver start`, a custom runtime, adaptive batching `max_batch_size` 32, `max_batch_time` 0.002, "
        "default `parallel_workers` 1, V2 protocol, default `debug` (DEBUG logs, access lines)",
        _mlserver, "/v2/models/mock/ready", "/v2/models/mock/infer", _v2_body,
        env={"PYTHONPATH": str(HERE)},  # where its model-settings.json finds `mlserver_app`
    ),
    Peer(
        "Ray Serve 2.60 (default proxy)", "ray",
        "one replica, `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)`, "
        "`max_ongoing_requests=1024`, the model in a thread, Ray's default HTTP proxy, loopback only",
        lambda b, _: [str(b / "python"), str(HERE / "ray_app.py"), "--port", "{port}"],
        "/predict", "/predict", lambda x: {"input": x}, ready_timeout=180.0,
    ),
    Peer(
        "Ray Serve 2.60 (HAProxy)", "ray",
        "the same with `RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (HAProxy ingress)",
        lambda b, _: [str(b / "python"), str(HERE / "ray_app.py"), "--port", "{port}"],
        "/predict", "/predict", lambda x: {"input": x}, env=RAY_HAPROXY, ready_timeout=180.0,
    ),
)  # fmt: skip
NAMES = tuple(VENVS)  # what --peers selects (zypher-ws always runs)


class Skipped(Exception):
    """A peer that cannot run here; the message says why."""


def ensure_venv(venv: Venv) -> Path:
    """The venv's bin folder, installing the pinned requirements on first use; Skipped if pip fails."""
    want = "\n".join(venv.requirements) + "\n"
    marker = venv.path / ".zypher-bench-installed"
    if marker.exists() and marker.read_text() == want:
        return venv.path / "bin"
    started = time.monotonic()
    print(f"  peers: installing {' '.join(venv.requirements)} into {venv.path} ...", file=sys.stderr, flush=True)
    try:
        if not (venv.path / "bin" / "python").exists():
            subprocess.run([PY, "-m", "venv", str(venv.path)], check=True, capture_output=True, text=True)
        pip = [str(venv.path / "bin" / "python"), "-m", "pip", "install", "-q", *venv.requirements]
        done = subprocess.run(pip, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise Skipped(f"could not create its venv: {_clip(exc.stderr or exc.stdout or str(exc))}") from exc
    except subprocess.TimeoutExpired as exc:
        raise Skipped(f"pip install took more than {INSTALL_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line] or done.stderr.splitlines()[-3:]
        raise Skipped(f"`pip install {' '.join(venv.requirements)}` failed: {_clip(' / '.join(errors), 150, 250)}")
    marker.write_text(want)
    print(f"  peers: {venv.key} installed in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return venv.path / "bin"


# -- one run: a server started afresh, checked, pinned, warmed, measured --------------------------------


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _cpus(pid: int) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@contextmanager
def _server(peer: Peer, bin_: Path, scenario: Scenario) -> Iterator[Server]:
    """The peer's server, pinned to the server core in a fresh working directory; when it stops, any
    process it left behind is killed."""
    seen: dict[int, str | None] = {}
    env = {**QUIET, "BENCH_MOCK_LATENCY_MS": str(scenario.latency_ms), **peer.env}
    # BentoML imports its service from the working directory; the others get a fresh, empty one.
    # A short path: HAProxy refuses a socket path of more than 97 bytes, and Ray adds 56 to this one.
    with tempfile.TemporaryDirectory(prefix="zbp-", dir="/tmp" if Path("/tmp").is_dir() else None) as tmp:
        cwd = HERE if peer.venv == "bentoml" else Path(tmp)
        env["BENCH_PEER_TMP"] = tmp  # Ray's session files
        try:
            with server(peer.argv(bin_, scenario.latency_ms), ready_path=peer.ready_path, env=env, cwd=cwd,
                        ready_timeout=peer.ready_timeout) as s:  # fmt: skip
                seen.update((pid, _start_time(pid)) for pid in _process_tree(s.proc.pid))
                try:
                    yield s
                finally:
                    seen.update((pid, _start_time(pid)) for pid in _process_tree(s.proc.pid))
        finally:
            _reap(seen)


def _unpinned(s: Server) -> list[str]:
    """A note if any process of the server may run off the server core (children inherit taskset's
    affinity, unless a framework sets its own)."""
    tree = _process_tree(s.proc.pid)
    stray = [pid for pid in tree if (_cpus(pid) or SERVER_CPU) != SERVER_CPU]
    if not stray:
        return []
    names = ", ".join(f"{_comm(pid)} on {_cpus(pid)}" for pid in stray[:5])
    return [f"{len(stray)} of {len(tree)} processes not pinned to core {SERVER_CPU}: {names}"]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return str(pid)


def _reap(seen: dict[int, str | None]) -> None:
    """SIGKILL what a server left running (Ray's daemons, say), once it has had a few seconds to stop."""
    deadline = time.monotonic() + 10
    while True:
        alive = [pid for pid, started in seen.items() if started is not None and _start_time(pid) == started]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _check(s: Server, peer: Peer, timeout: float = 30.0) -> None:
    """One request: the answer must carry the mock model's result for INPUT, as zypher-ws computes it."""
    digest = MockModel().predict_batch([INPUT])[0]["digest"]
    request = urllib.request.Request(
        s.url + peer.predict_path,
        data=json.dumps(peer.body(INPUT)).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        text = resp.read().decode(errors="replace")
    if digest not in text:
        raise RuntimeError(f"{peer.name} answered without the mock model's result: {text[:300]}")


def _measure(peer: Peer, bin_: Path, scenario: Scenario, opts: Options) -> tuple[Run, list[str]]:
    """One measured run; its `extra` holds the seconds from start to ready and the peak RSS (MiB) of the
    server's processes, summed."""
    started = time.monotonic()
    with _server(peer, bin_, scenario) as s:
        ready_s = time.monotonic() - started
        _check(s, peer)
        url, body = s.url + peer.predict_path, peer.body(INPUT)
        wrk(url, connections=scenario.connections, duration=WARM_UP_S, body=body)  # every server alike
        # wrk leaves a connection's last request behind when it stops: up to 256 predictions the server
        # still runs. One more request, answered after them, lets the measured run start on an empty queue.
        _check(s, peer, timeout=DRAIN_TIMEOUT_S)
        run = wrk(url, connections=scenario.connections, duration=opts.duration, body=body)
        run.extra.update(ready_s=ready_s, rss_mib=s.peak_rss_mib())
        return run, _unpinned(s)  # every process the run needed has started by now


def _measure_retrying(peer: Peer, bin_: Path, scenario: Scenario, opts: Options) -> tuple[Run, list[str]]:
    """_measure, started once more if the first start fails: on a busy core Ray Serve's controller can
    give up on its proxy's health check while it starts, and a second start usually goes through."""
    try:
        return _measure(peer, bin_, scenario, opts)
    except Exception as exc:
        print(f"  peers: {peer.name} failed ({_clip(str(exc), 200, 0)}); once more", file=sys.stderr, flush=True)
    return _measure(peer, bin_, scenario, opts)


# -- the suite -----------------------------------------------------------------------------------------


def peers(opts: Options) -> list[str]:
    chosen = set(opts.peers or NAMES)
    bins: dict[str | None, Path] = {None: BIN}
    skipped: dict[str, str] = {}
    for key, venv in VENVS.items():
        if key not in chosen:
            continue
        try:
            bins[key] = ensure_venv(venv)
        except Skipped as why:
            skipped[key] = str(why)
            print(f"  peers: {key} skipped: {why}", file=sys.stderr, flush=True)
    running = [p for p in PEERS if p.venv in bins]
    failed: dict[str, str] = {}  # a peer that would not start or answer, twice: skipped from then on
    keys = ("rps", "p50", "p99", "errors", "ready_s", "rss_mib")
    figs = {(sc.name, p.name): {k: Figure() for k in keys} for sc in SCENARIOS for p in running}
    paired = {(sc.name, p.name): Figure() for sc in SCENARIOS for p in running}
    notes: dict[str, set[str]] = {}
    for round_no in range(opts.repeat):
        order = running if round_no % 2 == 0 else running[::-1]
        for sc in SCENARIOS:
            this_round: dict[str, float] = {}
            for peer in order:
                if peer.name in failed:
                    continue
                try:
                    run, why = _measure_retrying(peer, bins[peer.venv], sc, opts)
                except Exception as exc:  # a peer that fails twice is reported, not fatal to the suite
                    failed[peer.name] = f"{type(exc).__name__}: {_clip(str(exc))}"
                    print(f"  peers: {peer.name} failed: {failed[peer.name]}", file=sys.stderr, flush=True)
                    continue
                notes.setdefault(peer.name, set()).update(why)
                if run.requests == 0:
                    notes[peer.name].add(
                        f"{sc.name}: no answer completed within a {opts.duration:g} s run (its latency is longer "
                        "than the run, so its rate is not measured; a longer --duration measures it)"
                    )
                print(f"  peers: {peer.name}, {sc.name}: {run.rps:.0f}/s", file=sys.stderr, flush=True)
                this_round[peer.name] = run.rps
                values = (run.rps, run.p50_ms, run.p99_ms, run.errors, run.extra["ready_s"], run.extra["rss_mib"])
                for key, value in zip(keys, values, strict=True):
                    figs[(sc.name, peer.name)][key].add(value)
            ours = this_round.get(PEERS[0].name)
            for name, value in this_round.items():
                if ours is not None and name != PEERS[0].name and value > 0:
                    paired[(sc.name, name)].add(ours / value)
        print(f"  peers: round {round_no + 1} done", file=sys.stderr, flush=True)
    return _report(running, figs, paired, skipped, failed, notes)


HEADER = ["server", "requests/s", "p50 ms", "p99 ms", "errors", "start to ready s", "peak RSS MiB", "zypher-ws ÷ this"]


def _clip(text: str, head: int = 300, tail: int = 900) -> str:
    text = " ".join(text.split())
    if len(text) <= head + tail:
        return text
    return f"{text[:head]} …" + (f" {text[-tail:]}" if tail else "")


def _report(
    running: list[Peer],
    figs: dict[tuple[str, str], dict[str, Figure]],
    paired: dict[tuple[str, str], Figure],
    skipped: dict[str, str],
    failed: dict[str, str],
    notes: dict[str, set[str]],
) -> list[str]:
    out = [
        table(
            "peers: the servers (each started afresh for every run, pinned to the server core, fresh working "
            f"directory; {WARM_UP_S} s of the same load, not counted, before each measured run)",
            ["server", "configuration"],
            [[p.name, p.config] for p in PEERS],
        )
    ]
    for sc in SCENARIOS:
        rows = []
        for p in running:
            g = figs[(sc.name, p.name)]
            ratio = paired[(sc.name, p.name)]
            shown = "" if p is PEERS[0] else (ratio.show(2, "×") if ratio.values else "—")
            rows.append([
                p.name, g["rps"].show(), g["p50"].show(2), g["p99"].show(2), g["errors"].show(),
                g["ready_s"].show(1), g["rss_mib"].show(), shown,
            ])  # fmt: skip
        ratios = [paired[(sc.name, p.name)] for p in running[1:] if paired[(sc.name, p.name)].values]
        least = min((r.median for r in ratios), default=float("nan"))
        verdict = (
            f"zypher-ws ÷ the fastest peer: {least:.2f}× (target ≥ {sc.target:g}×: "
            f"{'met' if least >= sc.target else 'not met'})"
            if ratios
            else "no peer measured"
        )
        out.append(
            table(
                f"peers: {sc.name}, POST, body {json.dumps(INPUT)} in each server's own request shape "
                "(ratios are medians of per-round ratios)",
                HEADER,
                rows,
            )
        )
        out.append(f"\n{verdict}")
    for key, why in skipped.items():
        out.append(f"\nSkipped {key}: {why}")
    for name, why in failed.items():
        out.append(f"\nFailed {name} (twice; not run after this): {why}")
    for name, found in notes.items():
        for note in sorted(found):
            out.append(f"\nNote on {name}: {note}")
    return out
