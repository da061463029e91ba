"""The chaos benchmark's SIGKILL attack, one round: it runs, and its verdict is a pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_one_sigkill_round_loses_nothing() -> None:
    argv = [sys.executable, "-m", "bench.chaos", "attack", "sigkill", "--chaos-rounds", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| SIGKILL "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    accepted, lost, over_run, verdict = int(cells[1].replace(",", "")), cells[4], cells[5], cells[-1]
    assert accepted > 0 and (lost, over_run, verdict) == ("0", "0", "pass"), row
