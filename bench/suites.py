"""The benchmark suites. Each starts its servers as processes, drives them from the other core and
returns printable tables. Figures are medians over `repeat` runs with the spread (min–max)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import native, onnx_digits
from bench.chaos import InvariantsFailed, chaos
from bench.clients import percentiles
from bench.harness import (
    LOAD_CPU,
    ROOT,
    SERVER_CPU,
    Figure,
    Run,
    Server,
    pinned,
    ratio,
    server,
    table,
    wrk,
)
from bench.models import CPU_TUNING, DIGIT, MODELS, sample, serve_args
from bench.peers.suite import peers

PY = sys.executable
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Options:
    duration: float = 3.0
    repeat: int = 3
    models: tuple[str, ...] = MODELS
    chaos_rounds: int = 100  # SIGKILL rounds of the chaos suite
    peers: tuple[str, ...] = ()  # the peers suite's servers besides zypher-ws (empty: all)


def zypher(*extra: str) -> list[str]:
    # All load comes from one address standing for many clients: no per-address socket or connection limit.
    base = [
        "--port",
        "{port}",
        "--log-level",
        "WARNING",
        "--ws-max-per-client",
        "0",
        "--max-connections-per-client",
        "0",
    ]
    return [PY, "-m", "zypher_ws", "serve", *base, *extra]


def clients(cpu: str, *args: str) -> dict[str, Any]:
    run = subprocess.run(pinned(cpu, [PY, "-m", "bench.clients", *args]), cwd=ROOT, capture_output=True, text=True)
    if run.returncode:  # say why: a load client's traceback is the first thing to read
        raise RuntimeError(f"bench.clients {' '.join(args)} exited {run.returncode}:\n{run.stderr[-3000:]}")
    out = run.stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def e2e(s: Server, kind: str, model: str, opts: Options, concurrency: int = 128) -> Run:
    r = clients(
        LOAD_CPU, "e2e", "--url", s.url, "--kind", kind, "--concurrency", str(concurrency),
        "--duration", str(opts.duration), "--body", json.dumps(sample(model)),
    )  # fmt: skip
    return Run(rps=r["rps"], p50_ms=r["p50_ms"], p99_ms=r["p99_ms"], errors=r["errors"])


# -- throughput: zypher-ws against the ceiling, the model limit and the prototype -------------------------

SYNC, SYNC1, ASYNC_SUBMIT, ASYNC_E2E = "sync c=32", "sync c=1", "async submit c=32", "async e2e c=128"
SYNC256 = "sync c=256"


def _servers(model: str) -> dict[str, tuple[list[str], str, dict[str, str]]]:
    proto_env = {"BENCH_MODEL": model}
    return {
        "zypher-ws": (zypher("--store", "memory://", "--max-queue", "300000", *serve_args(model)), "/readyz", {}),
        "ceiling": ([PY, "-m", "bench.ceiling", "--port", "{port}", "--model", model], "/healthz", {}),
        "prototype (flask run)": (
            [str(BIN / "flask"), "--app", "bench.prototype:app", "run", "--port", "{port}"],
            "/healthz",
            proto_env,
        ),
        "prototype (gunicorn)": (
            [
                str(BIN / "gunicorn"),
                "-b",
                "127.0.0.1:{port}",
                "-k",
                "gthread",
                "--threads",
                "64",
                "-w",
                "1",
                "bench.prototype:app",
            ],
            "/healthz",
            proto_env,
        ),
    }


def _modes(name: str, model: str) -> list[str]:
    modes = [SYNC1] if model == "mock" else []
    modes += [SYNC, SYNC256]
    if name != "ceiling":
        modes += [ASYNC_E2E, ASYNC_SUBMIT]  # submit last: it leaves a backlog behind
    return modes


def throughput(opts: Options) -> list[str]:
    out = []
    for model in opts.models:
        rps: dict[tuple[str, str], Figure] = {}
        p50: dict[tuple[str, str], Figure] = {}
        p99: dict[tuple[str, str], Figure] = {}
        ratios: dict[tuple[str, str], Figure] = {}
        added = Figure()  # one client: p50 of zypher-ws minus the ceiling's, per round
        peak: dict[str, float] = {}
        # Rounds outermost: every server runs once per round, so a slow spell on this shared machine
        # hits one round of all of them, and the ratios are taken within a round (paired).
        for round_no in range(opts.repeat):
            this_round: dict[tuple[str, str], float] = {}
            for name, (argv, ready, env) in _servers(model).items():
                with server(argv, ready_path=ready, env=env) as s:
                    for mode in _modes(name, model):
                        run = _run_mode(s, name, model, mode, opts)
                        this_round[(name, mode)] = run.rps
                        rps.setdefault((name, mode), Figure()).add(run.rps)
                        p50.setdefault((name, mode), Figure()).add(run.p50_ms)
                        p99.setdefault((name, mode), Figure()).add(run.p99_ms)
                    peak[name] = max(peak.get(name, 0.0), s.peak_rss_mib())
            for (name, mode), value in this_round.items():
                if name != "zypher-ws" and value > 0:
                    ratios.setdefault((name, mode), Figure()).add(this_round[("zypher-ws", mode)] / value)
            if ("ceiling", SYNC1) in p50:
                added.add(p50[("zypher-ws", SYNC1)].values[-1] - p50[("ceiling", SYNC1)].values[-1])
            print(f"  {model}: round {round_no + 1} done", file=sys.stderr, flush=True)
        limit = Figure()
        for _ in range(opts.repeat):
            limit.add(clients(SERVER_CPU, "model-limit", "--model", model, "--duration", str(opts.duration))["rps"])
        rows = []
        for (name, mode), fig in rps.items():
            paired = ratios.get((name, mode))
            rows.append([
                name, mode, fig.show(), p50[(name, mode)].show(2), p99[(name, mode)].show(2), f"{peak[name]:.0f}",
                "" if name == "zypher-ws" else (paired.show(2, "×") if paired else "—"),
            ])  # fmt: skip
        out.append(
            table(
                f"model `{model}` (model limit without HTTP: {limit.show()} predictions/s; "
                "ratios are medians of per-round ratios)",
                ["server", "mode", "completed/s", "p50 ms", "p99 ms", "peak RSS MiB", "zypher-ws ÷ this"],
                rows,
            )
        )
        if added.values:
            out.append(f"\nOne client, sync, `{model}`: p50 added by zypher-ws over the ceiling: {added.show(3)} ms")
    return out


def _run_mode(s: Server, name: str, model: str, mode: str, opts: Options) -> Run:
    body = {"input": sample(model)}
    if mode == SYNC1:
        return wrk(s.url + "/predict", connections=1, duration=opts.duration, body=body)
    if mode == SYNC:
        return wrk(s.url + "/predict", connections=32, duration=opts.duration, body=body)
    if mode == SYNC256:
        return wrk(s.url + "/predict", connections=256, duration=opts.duration, body=body)
    if mode == ASYNC_SUBMIT:
        return wrk(
            s.url + "/predict", connections=32, duration=opts.duration, body=body, headers={"Async-Mode": "true"}
        )
    return e2e(s, "zypher" if name == "zypher-ws" else "prototype", model, opts)


# -- the cpu model against the one-core bound --------------------------------------------------------------


def cpu_bound(opts: Options) -> list[str]:
    """The `cpu` model, sync c=256, against the most one core can serve: 1 / (the model's time per input
    at its best batch size, no HTTP + the ceiling's CPU per HTTP request, `mock` c=32), both measured in
    the same round on the server core. zypher-ws tuned as in the throughput suite (memory://, WARNING
    logs, batches of 128) and with the default store and logs (same batches)."""
    servers = {
        "zypher-ws tuned (memory://, WARNING, batches of 128)": zypher("--store", "memory://", *serve_args("cpu")),
        "zypher-ws, default store and logs, batches of 128": [
            str(BIN / "zypher-ws"), "serve", "--port", "{port}", *serve_args("cpu"),
        ],
    }  # fmt: skip
    limit, ceiling_us, bound = Figure(), Figure(), Figure()
    rates = {name: Figure() for name in servers}
    shares = {name: Figure() for name in servers}
    body = {"input": sample("cpu")}
    for round_no in range(opts.repeat):
        limit.add(clients(SERVER_CPU, "model-limit", "--model", "cpu", "--duration", str(opts.duration))["rps"])
        with server([PY, "-m", "bench.ceiling", "--port", "{port}", "--model", "mock"]) as s:
            before = s.cpu_seconds()
            run = wrk(s.url + "/predict", connections=32, duration=opts.duration, body={"input": sample("mock")})
            ceiling_us.add(1e6 * (s.cpu_seconds() - before) / max(1, run.requests))
        bound.add(1 / (1 / limit.values[-1] + ceiling_us.values[-1] / 1e6))
        names = list(servers) if round_no % 2 == 0 else list(servers)[::-1]
        for name in names:
            with (
                tempfile.TemporaryDirectory(prefix="zypher-bench-") as cwd,
                server(servers[name], ready_path="/readyz", cwd=cwd) as s,
            ):
                wrk(s.url + "/predict", connections=256, duration=1, body=body)  # warm up, not counted
                rates[name].add(wrk(s.url + "/predict", connections=256, duration=opts.duration, body=body).rps)
            shares[name].add(rates[name].values[-1] / bound.values[-1])
        print(f"  cpu: round {round_no + 1} done", file=sys.stderr, flush=True)
    rows = [[name, rates[name].show(), shares[name].show(2, "×")] for name in servers]
    return [
        table(
            f"model `cpu`, sync c=256, against the one-core bound: model alone {limit.show()} predictions/s, "
            f"ceiling {ceiling_us.show()} µs of CPU per request, bound {bound.show()} predictions/s "
            "(each share is the median of the shares within a round)",
            ["server", "predictions/s", "÷ bound"],
            rows,
        )
    ]


PROBE_RATE = 100  # health checks per second: a busy load balancer, not a load of its own


def responsiveness(opts: Options) -> list[str]:
    """GET /healthz latency, probed at a fixed rate, while the CPU model saturates the server core
    (sync, 256 connections): zypher-ws as it runs by default (SQLite store, batches of 32), zypher-ws
    with the larger batches the throughput suite gives this model, and the ceiling."""
    rows = []
    cpu = ["--model", "bench.cpu_model:CpuModel"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv, ready in (
            ("zypher-ws", zypher("--store", f"sqlite:///{tmp}/r.db", *cpu), "/readyz"),
            (
                "zypher-ws " + " ".join(CPU_TUNING),
                zypher("--store", f"sqlite:///{tmp}/t.db", *serve_args("cpu")),
                "/readyz",
            ),
            ("ceiling", [PY, "-m", "bench.ceiling", "--port", "{port}", "--model", "cpu"], "/healthz"),
        ):
            p50, p99, load = Figure(), Figure(), Figure()
            with server(argv, ready_path=ready) as s:
                for _ in range(opts.repeat):
                    loaded: list[Run] = []

                    def saturate(s: Server = s, loaded: list[Run] = loaded) -> None:
                        body = {"input": sample("cpu")}
                        loaded.append(wrk(s.url + "/predict", connections=256, duration=opts.duration + 1, body=body))

                    t = threading.Thread(target=saturate)
                    t.start()
                    time.sleep(0.5)  # let the load reach full speed before measuring
                    probe = clients(
                        LOAD_CPU, "probe", "--url", s.url + "/healthz", "--rate", str(PROBE_RATE),
                        "--duration", str(opts.duration),
                    )  # fmt: skip
                    t.join()
                    p50.add(probe["p50_ms"])
                    p99.add(probe["p99_ms"])
                    load.add(loaded[0].rps)
            rows.append([name, load.show(), p50.show(2), p99.show(2)])
    return [table(f"event-loop responsiveness under full CPU load (model `cpu`, sync c=256; GET /healthz "
                  f"{PROBE_RATE} times a second; zypher-ws on its default SQLite store)",
                  ["server", "predictions/s", "GET /healthz p50 ms", "GET /healthz p99 ms"], rows)]  # fmt: skip


def flood(opts: Options, count: int = 200_000) -> list[str]:
    """Memory under a flood of `count` async submissions behind a model that never finishes one:
    zypher-ws holding them all queued (to price one queued prediction), zypher-ws with its default bound
    (the rest must be refused, memory flat), and the prototype (whose queue has no bound)."""
    body = json.dumps(sample("mock"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scenarios = [
            (f"zypher-ws, --max-queue {count:,}", zypher("--store", f"sqlite:///{tmp}/a.db", "--max-queue", str(count),
                                                         *serve_args("stuck")), "/readyz", {}),
            ("zypher-ws, default --max-queue 1,024", zypher("--store", f"sqlite:///{tmp}/b.db", *serve_args("stuck")),
             "/readyz", {}),
            ("prototype (flask run)", [str(BIN / "flask"), "--app", "bench.prototype:app", "run", "--port", "{port}"],
             "/healthz", {"BENCH_MODEL": "stuck"}),
        ]  # fmt: skip
        for name, argv, ready, env in scenarios:
            with server(argv, ready_path=ready, env=env) as s:
                before = s.rss_mib()
                run = clients(LOAD_CPU, "flood", "--url", s.url, "--count", str(count), "--body", body)
                after = s.rss_mib()
            per = (after - before) * 1024 * 1024 / max(1, run["accepted"])
            rows.append([
                name, f"{run['rps'] + run['refused_rps']:.0f}", f"{run['accepted']:,}", f"{run['refused']:,}",
                f"{before:.0f}", f"{after:.0f}", f"{per:.0f}" if run["accepted"] >= count // 2 else "—",
            ])  # fmt: skip
    return [
        table(
            f"flood: {count:,} async submissions behind a model that never finishes (zypher-ws on SQLite)",
            [
                "server",
                "answers/s",
                "accepted",
                "refused (503)",
                "RSS before MiB",
                "RSS after MiB",
                "bytes per accepted",
            ],
            rows,
        )
    ]


# -- the durable store against the memory store -------------------------------------------------------


def stores(opts: Options) -> list[str]:
    """SQLite against memory, in rounds (each round starts both once) with the ratios paired per round."""
    names = ("memory://", "sqlite (FULL)")
    keys = ("submit", "sync1_p50", "sync1_p99", "sync32", "sync32_p99")
    f = {name: {k: Figure() for k in keys} for name in names}
    paired = {"submit": Figure(), "sync32": Figure()}  # SQLite ÷ memory within one round
    body = {"input": sample("mock")}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(opts.repeat):
            for name, store in zip(names, ("memory://", f"sqlite:///{tmp}/full{round_}.db"), strict=True):
                argv = zypher("--store", store, "--max-queue", "300000", "--model", "mock")
                with server(argv, ready_path="/readyz") as s:
                    one = wrk(s.url + "/predict", connections=1, duration=opts.duration, body=body)
                    many = wrk(s.url + "/predict", connections=32, duration=opts.duration, body=body)
                    submit = wrk(
                        s.url + "/predict", connections=32, duration=opts.duration, body=body,
                        headers={"Async-Mode": "true"},
                    )  # fmt: skip
                for key, value in zip(keys, (submit.rps, one.p50_ms, one.p99_ms, many.rps, many.p99_ms), strict=True):
                    f[name][key].add(value)
            mem, sql = f["memory://"], f["sqlite (FULL)"]
            for key, figure in paired.items():
                figure.add(sql[key].values[-1] / mem[key].values[-1])
    rows = [
        [name, g["submit"].show(), g["sync1_p50"].show(2), g["sync1_p99"].show(2), g["sync32"].show(),
         g["sync32_p99"].show(2)]
        for name, g in f.items()
    ]  # fmt: skip
    return [
        table(
            "store: SQLite (the durable default) against memory, model `mock` 0 ms",
            ["store", "async submit/s c=32", "sync p50 ms c=1", "sync p99 ms c=1", "sync/s c=32", "sync p99 ms c=32"],
            rows,
        ),
        f"\nSQLite ÷ memory, medians of per-round ratios: async submit {paired['submit'].show(2, '×')}, "
        f"sync c=32 {paired['sync32'].show(2, '×')}",
    ]


# -- the defaults, as the Quick start runs them, against the ceiling -------------------------------------

# `zypher-ws serve --model mock` as the Quick start runs it: the default store (sqlite:///zypher.db in the
# working directory, a fresh one per run), INFO logs, every other option at its default. `--port` is the
# one flag added, to a free port, which changes nothing else.
DEFAULTS: dict[str, tuple[list[str], str, dict[str, str]]] = {
    "ceiling": ([PY, "-m", "bench.ceiling", "--port", "{port}", "--model", "mock"], "/healthz", {}),
    "defaults": ([str(BIN / "zypher-ws"), "serve", "--port", "{port}", "--model", "mock"], "/readyz", {}),
    "defaults, async": ([str(BIN / "zypher-ws"), "serve", "--port", "{port}", "--model", "mock"], "/readyz",
                        {"Async-Mode": "true"}),
    "--store memory://, async": (
        [str(BIN / "zypher-ws"), "serve", "--port", "{port}", "--model", "mock", "--store", "memory://"],
        "/readyz",
        {"Async-Mode": "true"},
    ),
    # The Quick start's own server, the `digits` model, sent the README's digit, against the ceiling
    # calling the same model inline: what a new user who points wrk at it measures.
    "ceiling, digits": ([PY, "-m", "bench.ceiling", "--port", "{port}", "--model", "digits"], "/healthz", {}),
    "defaults, digits": ([str(BIN / "zypher-ws"), "serve", "--port", "{port}"], "/readyz", {}),
}  # fmt: skip
DEFAULTS_BODIES = {"ceiling, digits": {"input": DIGIT}, "defaults, digits": {"input": DIGIT}}
"""Each run's body where it is not `{"input": [1, 2, 3]}` (mock's)."""
DEFAULTS_CONNECTIONS = 32


def defaults(opts: Options) -> list[str]:
    """The defaults against the ceiling (sync) and against the memory store (async submit), `mock` 0 ms,
    c=32; and the Quick start's `zypher-ws serve` (`digits`, the README's digit) against the ceiling
    calling `digits` inline. Rounds outermost, the order reversed every other round; every run starts its
    server afresh in a new working directory, and the ratios are paired within a round."""
    keys = ("rps", "p50", "p99", "cpu_us", "errors")
    f = {name: {k: Figure() for k in keys} for name in DEFAULTS}
    against = {
        "defaults": "ceiling",
        "defaults, async": "--store memory://, async",
        "defaults, digits": "ceiling, digits",
    }
    paired = {name: Figure() for name in against}  # ÷ the ceiling, ÷ memory:// async, ÷ the digits ceiling
    names = list(DEFAULTS)
    for round_no in range(opts.repeat):
        for name in names if round_no % 2 == 0 else names[::-1]:
            argv, ready, headers = DEFAULTS[name]
            with (
                tempfile.TemporaryDirectory(prefix="zypher-bench-") as cwd,
                server(argv, ready_path=ready, cwd=cwd) as s,
            ):
                before = s.cpu_seconds()
                run = wrk(
                    s.url + "/predict",
                    connections=DEFAULTS_CONNECTIONS,
                    duration=opts.duration,
                    body=DEFAULTS_BODIES.get(name, {"input": [1, 2, 3]}),
                    headers=headers,
                )
                used = s.cpu_seconds() - before
            values = (run.rps, run.p50_ms, run.p99_ms, 1e6 * used / max(1, run.requests), run.errors)
            for key, value in zip(keys, values, strict=True):
                f[name][key].add(value)
        for name, base in against.items():
            paired[name].add(f[name]["rps"].values[-1] / f[base]["rps"].values[-1])
        print(f"  defaults: round {round_no + 1} done", file=sys.stderr, flush=True)
    modes = {"ceiling": "sync", "defaults": "sync", "defaults, async": "async submit",
             "--store memory://, async": "async submit", "ceiling, digits": "sync, the README's digit",
             "defaults, digits": "sync, the README's digit"}  # fmt: skip
    shown = {"defaults": "÷ ceiling ", "defaults, async": "÷ memory:// async ", "defaults, digits": "÷ ceiling "}
    rows = [
        [f"`{_command(DEFAULTS[name][0])}`", modes[name], g["rps"].show(), g["p50"].show(2), g["p99"].show(2),
         g["cpu_us"].show(), g["errors"].show(), shown[name] + paired[name].show(2, "×") if name in paired else ""]
        for name, g in f.items()
    ]  # fmt: skip
    return [
        table(
            f"the defaults: `mock` 0 ms (and the Quick start's own `digits`), c={DEFAULTS_CONNECTIONS}, each run "
            "a fresh server in a fresh working directory (ratios are medians of per-round ratios)",
            ["server", "mode", "requests/s", "p50 ms", "p99 ms", "server CPU µs/request", "errors", "ratio"],
            rows,
        )
    ]


# -- the regression guard CI runs: a collapse of the defaults' hot path fails it -------------------------

GUARD_FLOOR = 0.25  # the defaults' sync rate over the ceiling's, in the same run; the target is 0.5


def guard(opts: Options) -> list[str]:
    """The defaults against the ceiling, sync c=32, rounds paired: fails (InvariantsFailed) only when the
    median ratio falls below GUARD_FLOOR, a collapse no noisy machine explains. Absolute targets stay in
    the `defaults` suite; this is CI's one-minute smoke (`python -m bench guard --duration 5`)."""
    ratios, rates = Figure(), {name: Figure() for name in ("ceiling", "defaults")}
    for round_no in range(opts.repeat):
        for name in ("ceiling", "defaults") if round_no % 2 == 0 else ("defaults", "ceiling"):
            argv, ready, _ = DEFAULTS[name]
            with (
                tempfile.TemporaryDirectory(prefix="zypher-bench-") as cwd,
                server(argv, ready_path=ready, cwd=cwd) as s,
            ):
                run = wrk(s.url + "/predict", connections=DEFAULTS_CONNECTIONS, duration=opts.duration,
                          body={"input": [1, 2, 3]})  # fmt: skip
            rates[name].add(run.rps)
        ratios.add(rates["defaults"].values[-1] / rates["ceiling"].values[-1])
    verdict = "ok" if ratios.median >= GUARD_FLOOR else f"COLLAPSE: below {GUARD_FLOOR}×"
    lines = [
        table(
            f"regression guard: the defaults against the ceiling, `mock` 0 ms, sync c={DEFAULTS_CONNECTIONS}",
            ["ceiling requests/s", "defaults requests/s", "defaults ÷ ceiling", "verdict"],
            [[rates["ceiling"].show(), rates["defaults"].show(), ratios.show(2, "×"), verdict]],
        )
    ]
    if ratios.median < GUARD_FLOOR:
        raise InvariantsFailed(lines)
    return lines


def _command(argv: list[str]) -> str:
    """The command line as a reader would type it: no interpreter path, no port."""
    words = [Path(argv[0]).name if argv[0] != PY else "python", *argv[1:]]
    out: list[str] = []
    for word in words:
        if word == "{port}":
            out.pop()  # its --port
        else:
            out.append(word)
    return " ".join(out)


# -- live results: push latency to many sockets, memory of idle sockets -------------------------------


FANOUT_PROCESSES = 4  # Python client processes sharing the sockets: no one client's backlog is in the figure
PUSH_MODEL = ("--model", "bench.push_model:PushModel")
PUSH_WAIT_MS = 1500  # the model's wait: long enough for every socket to subscribe before it answers


def fanout(s: Server, sockets: int, processes: int, client: list[str] | None = None) -> dict[str, list[float]]:
    """`sockets` WebSockets over `processes` client processes, all subscribed to one async prediction of
    bench/push_model.py: each socket's delay in seconds from its completion (the model's `done_at`) to
    its terminal update, as `delays` (the client's clock after the read) and, from the C client,
    `kernel_delays` (the kernel's receive stamp). `client` is the C client's executable (bench/fanout.c);
    without it, `python -m bench.clients fanout`. Both say {"ready": n}, read the id from stdin, and
    answer one JSON line."""

    def argv(n: int) -> list[str]:
        if client is None:
            return [PY, "-m", "bench.clients", "fanout", "--url", s.url, "--sockets", str(n)]
        return [*client, "--host", "127.0.0.1", "--port", str(s.port), "--sockets", str(n)]

    shares = [sockets // processes + (i < sockets % processes) for i in range(processes)]
    procs = [
        subprocess.Popen(pinned(LOAD_CPU, argv(n)), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for n in shares
        if n
    ]
    try:
        for proc in procs:  # every socket open before the prediction exists
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a fan-out client exited before it was ready ({proc.wait()})")
            json.loads(line)["ready"]
        request = urllib.request.Request(
            s.url + "/predict", data=json.dumps({"input": {"wait_ms": PUSH_WAIT_MS}}).encode(), method="POST",
            headers={"Content-Type": "application/json", "Async-Mode": "true"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as resp:
            pid = json.loads(resp.read())["prediction_id"]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(pid + "\n")
            proc.stdin.close()
        got: dict[str, list[float]] = {"delays": [], "kernel_delays": []}
        for proc in procs:
            assert proc.stdout is not None
            answer = proc.stdout.read()
            if proc.wait(timeout=60):
                raise RuntimeError(f"a fan-out client exited {proc.returncode} (its stderr is above)")
            out = json.loads(answer.strip().splitlines()[-1])
            for key, values in got.items():
                values += out.get(key, [])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return got


def fanout_client() -> tuple[list[str] | None, str]:
    """The C fan-out client's argv, built on first use; or None and the reason it cannot be."""
    try:
        return [str(native.binary("fanout"))], ""
    except native.NoCompiler as exc:
        print(f"live: the C fan-out client is skipped: {exc}", file=sys.stderr, flush=True)
        return None, str(exc)


@dataclass(frozen=True)
class FanoutRun:
    client: str  # its label
    sockets: int
    processes: int
    native: bool  # the C client (bench/fanout.c), else the Python one

    def clocks(self) -> tuple[tuple[str, str], ...]:
        """(the client's key, the row's name for it): the C client's two clocks come from the same runs."""
        after_read = ("delays", "after its read")
        return (after_read, ("kernel_delays", "kernel receive stamp")) if self.native else (after_read,)


def live(opts: Options, sockets: int = 1000, idle_sockets: int = 19_000) -> list[str]:
    c_client, why_not = fanout_client()
    runs = [
        FanoutRun("Python", 1, 1, native=False),
        FanoutRun("Python", sockets, FANOUT_PROCESSES, native=False),
        FanoutRun("C (epoll)", sockets, 1, native=True),
    ]
    figures: dict[tuple[int, str], tuple[Figure, Figure, list[int]]] = {}  # (run, clock): p50, p99, missing
    with server(zypher("--store", "memory://", *PUSH_MODEL), ready_path="/readyz") as s:
        for _ in range(opts.repeat):  # interleaved: the Python and the C clients share the machine's moments
            for index, run in enumerate(runs):
                if run.native and c_client is None:
                    continue
                got = fanout(s, run.sockets, run.processes, c_client if run.native else None)
                for key, _ in run.clocks():
                    p50, p99, missing = figures.setdefault((index, key), (Figure(), Figure(), []))
                    pct = percentiles(got[key])
                    p50.add(pct["p50_ms"])
                    p99.add(pct["p99_ms"])
                    missing.append(run.sockets - len(got[key]))
    rows = []
    for index, run in enumerate(runs):
        for key, clock in run.clocks():
            row = [
                f"{run.sockets:,} socket(s) watching one prediction",
                f"{run.client}, {run.processes} process(es)",
                clock,
            ]
            if (index, key) not in figures:
                rows.append([*row, "—", "—", f"skipped: {why_not}"])
                continue
            p50, p99, missing = figures[(index, key)]
            rows.append([*row, p50.show(1), p99.show(1), str(sum(missing))])
    out = [
        table(
            "push latency: from completion (the model's own full-precision stamp) to each socket's terminal "
            "update; the Python sockets are spread over client processes that time each frame right after "
            "its recv(2), before parsing it; the C client reads all its sockets through one epoll and also "
            "reports the kernel's receive stamp",
            ["scenario", "client", "clock", "p50 ms", "p99 ms", "updates missing"],
            rows,
        )
    ]
    with server(zypher("--store", "memory://", "--model", "mock"), ready_path="/readyz") as s:
        before = s.rss_mib()
        proc = subprocess.Popen(
            pinned(
                LOAD_CPU,
                [PY, "-m", "bench.clients", "idle", "--url", s.url, "--sockets", str(idle_sockets), "--hold", "3"],
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        opened = json.loads(proc.stdout.readline())["open"]
        time.sleep(1)  # let the server settle with every socket open
        during = s.rss_mib()
        proc.wait()
    per = (during - before) * 1024 * 1024 / max(1, opened)
    out.append(
        table(
            "idle WebSockets",
            ["sockets held", "server RSS before MiB", "with sockets MiB", "KiB per socket"],
            [[f"{opened:,}", f"{before:.0f}", f"{during:.0f}", f"{per / 1024:.1f}"]],
        )
    )
    return out


# -- streaming: chunks fanned out to subscribers, queue positions of a long queue --------------------------

STREAM_MODEL = ("--model", "bench.stream_model:StreamModel")


def streaming(opts: Options, fanouts: tuple[int, ...] = (1, 100, 1000), queued: int = 10_000) -> list[str]:
    # One worker and single-prediction batches: the queue moves one prediction at a time, which is what
    # changes every queued prediction's position. Outboxes big enough that a thousand sockets read by one
    # load process are not dropped as slow while the model yields flat out.
    argv = zypher(
        "--store", "memory://", *STREAM_MODEL, "--workers", "1", "--max-batch-size", "1",
        "--max-queue", str(2 * queued), "--ws-outbox", "100000", "--ws-outbox-bytes", str(256 * 1024 * 1024),
    )  # fmt: skip
    flat, paced = [], []
    with server(argv, ready_path="/readyz") as s:
        for n in fanouts:
            wait_ms = str(1500 + 3 * n)  # time for every socket to subscribe before the first chunk
            rate, pushed, got, dropped = Figure(), Figure(), Figure(), Figure()
            codes: set[int] = set()  # how the server closed the ones it dropped
            p50, p99 = Figure(), Figure()
            for _ in range(opts.repeat):
                r = clients(LOAD_CPU, "stream", "--url", s.url, "--sockets", str(n), "--chunks", "2000",
                            "--wait-ms", wait_ms)  # fmt: skip
                rate.add(r["per_socket_per_s"])
                pushed.add(r["pushed_per_s"])
                got.add(r["min_received"])
                dropped.add(r["dropped"])
                codes.update(r["close_codes"])
                r = clients(LOAD_CPU, "stream", "--url", s.url, "--sockets", str(n), "--chunks", "200",
                            "--interval-ms", "10", "--wait-ms", wait_ms)  # fmt: skip
                p50.add(r["p50_ms"])
                p99.add(r["p99_ms"])
            closed = f" (close {', '.join(map(str, sorted(codes)))})" if codes else ""
            flat.append([f"{n:,}", rate.show(0), pushed.show(0), got.show(0), dropped.show(0) + closed])
            paced.append([f"{n:,}", p50.show(1), p99.show(1)])
    out = [
        table("streaming: one prediction yielding 2,000 chunks flat out, to N subscribers (one load process)",
              ["subscribers", "chunks/s per subscriber", "chunks/s pushed in all", "fewest live to one", "dropped"],
              flat),
        table("streaming: added latency per chunk, model yield to socket receipt (100 chunks/s)",
              ["subscribers", "p50 ms", "p99 ms"], paced),
    ]  # fmt: skip
    rows = []
    for sockets in (0, 1000):  # a fresh server each run: every run starts from the same empty queue
        updates, most, drained, cpu = Figure(), Figure(), Figure(), Figure()
        for _ in range(opts.repeat):
            with server(argv, ready_path="/readyz") as s:
                r = clients(LOAD_CPU, "positions", "--url", s.url, "--queued", str(queued), "--sockets", str(sockets),
                            "--duration", str(opts.duration), "--server-pid", str(s.proc.pid))  # fmt: skip
            updates.add(r["updates_per_s"])
            most.add(r["most_per_prediction_per_s"])
            drained.add(r["drained_per_s"])
            cpu.add(r["server_cpu_percent"])
        rows.append([f"{queued:,}", f"{sockets:,}", updates.show(0), most.show(2), drained.show(0), cpu.show(0)])
    out.append(
        table(
            f"queue positions: a moving queue of {queued:,} streaming predictions (one worker, 5 ms each)",
            ["queued", "subscribers", "position updates/s", "most per prediction/s", "dequeued/s", "server CPU %"],
            rows,
        )
    )
    return out


# -- scale-out on Redis -----------------------------------------------------------------------------------


@contextmanager
def redis_cluster(
    redis_url: str, prefix: str, workers: int, *, apis: int = 1, latency_ms: int = 50
) -> Iterator[list[Server]]:
    backend = ["--backend", "redis", "--redis-url", redis_url, "--redis-prefix", prefix, "--model", "mock"]
    mock = ["--mock-latency-ms", str(latency_ms), "--max-batch-size", "8", "--max-queue", "100000"]
    with ExitStack() as stack:
        servers = [stack.enter_context(server(zypher(*backend, *mock, "--workers", "0"), ready_path="/readyz"))
                   for _ in range(apis)]  # fmt: skip
        for _ in range(workers):
            proc = subprocess.Popen(
                [PY, "-m", "zypher_ws", "worker", *backend, *mock, "--workers", "1", "--log-level", "WARNING"],
                cwd=ROOT,
            )
            stack.callback(_stop, proc)
        yield servers


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def scale(opts: Options, redis_url: str) -> list[str]:
    rows = []
    base: Figure | None = None
    for workers in (1, 2, 4):
        fig = Figure()
        for rep in range(opts.repeat):
            with redis_cluster(redis_url, f"bench-{workers}-{rep}-{time.time_ns()}", workers) as (api,):
                fig.add(e2e(api, "zypher", "mock", opts, concurrency=128).rps)
        base = base or fig
        rows.append([str(workers), fig.show(), ratio(fig, base)])
    out = [table("Redis: completed predictions/s against worker processes (mock 50 ms, batch ≤ 8, one thread each)",
                 ["worker processes", "async e2e/s c=128", "÷ one worker"], rows)]  # fmt: skip
    rows = []
    for n in (1, 1000):
        p50, p99 = Figure(), Figure()
        for rep in range(opts.repeat):
            prefix = f"bench-push-{rep}-{time.time_ns()}"
            with redis_cluster(redis_url, prefix, 1, apis=2, latency_ms=1500) as (a, b):
                # A model this slow lets every socket subscribe before it finishes.
                r = clients(LOAD_CPU, "push", "--url", a.url, "--ws-url", b.url, "--sockets", str(n))
                p50.add(r["p50_ms"])
                p99.add(r["p99_ms"])
        rows.append([f"{n:,} socket(s) on API B", p50.show(1), p99.show(1)])
    out.append(table("Redis: push latency across instances (submitted on API A, worker process, watched on API B)",
                     ["scenario", "p50 ms", "p99 ms"], rows))  # fmt: skip
    return out


# -- the Open Inference Protocol against the native route, on the same server ------------------------

OIP_CONNECTIONS = 32
OIP_BATCH = 8  # rows per request in the batched modes


def oip_bodies(rows: int) -> dict[str, tuple[bytes, dict[str, str]]]:
    """The digit as `rows` rows: an OIP infer request in JSON, and in binary (as tritonclient sends it,
    outputs asked as binary too)."""
    import numpy as np

    pixels = np.array([DIGIT] * rows, dtype=np.float32)
    tensor = {"name": "X", "datatype": "FP32", "shape": [rows, 64]}
    as_json = json.dumps({"inputs": [{**tensor, "data": pixels.reshape(-1).tolist()}]}).encode()
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": pixels.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    binary_headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return {
        "json": (as_json, {"Content-Type": "application/json"}),
        "binary": (header + pixels.tobytes(), binary_headers),
    }


def oip(opts: Options) -> list[str]:
    """OIP infer (JSON and binary, one row and a batch of rows per request) against the native
    `/models/{name}/predict`, all on one zypher-ws serving digits-onnx, in the same rounds."""
    name = onnx_digits.NAME
    argv = zypher("--store", "memory://", "--max-queue", "300000", *serve_args(name))
    one, batch = oip_bodies(1), oip_bodies(OIP_BATCH)
    native = json.dumps({"input": DIGIT}).encode()
    modes: dict[str, tuple[str, bytes, dict[str, str], int]] = {
        "native predict": (f"/models/{name}/predict", native, {"Content-Type": "application/json"}, 1),
        "OIP infer, JSON": (f"/v2/models/{name}/infer", *one["json"], 1),
        "OIP infer, binary": (f"/v2/models/{name}/infer", *one["binary"], 1),
        f"OIP infer, JSON, {OIP_BATCH} rows": (f"/v2/models/{name}/infer", *batch["json"], OIP_BATCH),
        f"OIP infer, binary, {OIP_BATCH} rows": (f"/v2/models/{name}/infer", *batch["binary"], OIP_BATCH),
    }
    rps: dict[str, Figure] = {m: Figure() for m in modes}
    p50: dict[str, Figure] = {m: Figure() for m in modes}
    p99: dict[str, Figure] = {m: Figure() for m in modes}
    ratios: dict[str, Figure] = {m: Figure() for m in modes}
    errors = dict.fromkeys(modes, 0)
    for round_no in range(opts.repeat):
        with server(argv, ready_path="/readyz") as s:
            this_round = {}
            for mode, (path, body, headers, rows) in modes.items():
                run = wrk(
                    s.url + path, connections=OIP_CONNECTIONS, duration=opts.duration, raw_body=body, headers=headers
                )
                this_round[mode] = run.rps * rows
                rps[mode].add(run.rps)
                p50[mode].add(run.p50_ms)
                p99[mode].add(run.p99_ms)
                errors[mode] += run.errors
            for mode, value in this_round.items():
                if this_round["native predict"] > 0:
                    ratios[mode].add(value / this_round["native predict"])
        print(f"  oip: round {round_no + 1} done", file=sys.stderr, flush=True)
    rows_out = [
        [
            mode, rps[mode].show(), Figure([v * modes[mode][3] for v in rps[mode].values]).show(),
            p50[mode].show(2), p99[mode].show(2), ratios[mode].show(2, "×"), str(errors[mode]),
        ]
        for mode in modes
    ]  # fmt: skip
    return [
        table(
            f"`{name}`, sync, {OIP_CONNECTIONS} connections: the Open Inference Protocol against the native route "
            "(ratios: rows/s over the native route's, per round)",
            ["mode", "requests/s", "rows/s", "p50 ms", "p99 ms", "rows/s ÷ native", "errors"],
            rows_out,
        )
    ]


SUITES: dict[str, Callable[[Options], list[str]]] = {
    "throughput": throughput,
    "responsiveness": responsiveness,
    "flood": flood,
    "stores": stores,
    "live": live,
    "defaults": defaults,
    "cpu": cpu_bound,
    "oip": oip,
    "chaos": chaos,
    "guard": guard,
    "peers": peers,
    "streaming": streaming,
}
DEFAULT = ("throughput", "responsiveness", "flood", "stores", "live", "defaults", "cpu")  # `python -m bench` alone
