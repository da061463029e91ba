"""`python -m bench [SUITE ...]`: run benchmark suites and print their tables (Markdown).

Suites: throughput, responsiveness, flood, stores, live (push latency to 1 and 1,000 WebSockets, by
Python clients and by a C client that gcc builds on first use into ~/.cache/zypher-bench; idle sockets'
memory), defaults, cpu (the cpu model against the
one-core bound measured in the same round), oip (the Open Inference Protocol on
digits-onnx against the native route), scale (needs a Redis: --redis-url), chaos (processes killed,
Redis restarted, the disk filled: it exits 1 if a prediction was lost or ran more often than its record
says), guard (CI's smoke: it exits 1 if the defaults collapse below 0.25x the ceiling in the same run),
streaming (one streaming prediction's chunks to 1, 100 and 1,000 subscribers: chunks per second and the
added latency per chunk; the cost of queue-position updates with 10,000 queued), and peers (LitServe,
BentoML, MLServer and Ray Serve against the defaults, each installed on first use in a venv of its own
under ~/.cache/zypher-bench/peers). Servers run pinned to core 0 and load comes from core 1 (taskset);
wrk must be installed.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.chaos import InvariantsFailed
from bench.harness import machine, require_wrk
from bench.models import MODELS
from bench.peers.suite import NAMES as PEER_NAMES
from bench.suites import DEFAULT, SUITES, Options, scale


def main() -> None:
    names = [*SUITES, "scale"]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "suites", nargs="*", choices=[*names, []], help=f"default: {' '.join(DEFAULT)} (all: {', '.join(names)})"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measured run (default 3)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median and spread are shown")
    parser.add_argument("--models", default=",".join(MODELS), help=f"throughput models (default {','.join(MODELS)})")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for the scale suite")
    parser.add_argument("--chaos-rounds", type=int, default=100, help="SIGKILL rounds of the chaos suite")
    parser.add_argument(
        "--peers", default=",".join(PEER_NAMES), help=f"the peers suite's servers (default {','.join(PEER_NAMES)})"
    )
    args = parser.parse_args()
    require_wrk()
    models = tuple(args.models.split(","))
    chosen_peers = tuple(p for p in args.peers.split(",") if p)
    if unknown := set(chosen_peers) - set(PEER_NAMES):
        parser.error(f"--peers: unknown {', '.join(sorted(unknown))} (one of {', '.join(PEER_NAMES)})")
    opts = Options(
        duration=args.duration, repeat=args.repeat, models=models, chaos_rounds=args.chaos_rounds, peers=chosen_peers
    )
    chosen = args.suites or list(DEFAULT)
    failed = []
    print(f"# zypher-ws benchmarks\n\n{machine()}; {opts.repeat} runs of {opts.duration:g} s per figure: "
          f"median (min–max).\nCommand: python -m bench {' '.join(sys.argv[1:])}")  # fmt: skip
    for name in chosen:
        started = time.monotonic()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            lines = scale(opts, args.redis_url) if name == "scale" else SUITES[name](opts)
        except InvariantsFailed as failure:
            lines = failure.lines
            failed.append(name)
        print("\n".join(lines), flush=True)
        print(f"{name} took {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    if failed:
        sys.exit(f"bench: invariants failed in {', '.join(failed)} (see the tables above)")


if __name__ == "__main__":
    main()
