"""The chaos suite's model: every execution of an input `{"n": N}` appends `N` to a log, fsynced before it
answers, so the suite can count how many times each prediction ran against the attempts its record shows.

`BENCH_EXEC_LOG` names the log (shared by several processes: each batch is one O_APPEND write);
`BENCH_LATENCY` is the seconds each batch takes (default 0.01). Serve it with
`--model bench.chaos_model:CountingModel`.
"""

from __future__ import annotations

import os
import time
from typing import Any


class CountingModel:
    name = "counting"
    version = "1"
    input_schema: dict[str, Any] = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    output_schema: dict[str, Any] = {"type": "object"}

    def __init__(self) -> None:
        self.log_path = os.environ["BENCH_EXEC_LOG"]
        self.latency = float(os.environ.get("BENCH_LATENCY", "0.01"))

    def load(self) -> None:
        pass

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        time.sleep(self.latency)  # the model's own time, in its executor thread
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(f"{x['n']}\n" for x in inputs).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return [{"n": x["n"]} for x in inputs]
