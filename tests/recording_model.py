"""A model for crash tests: appends every execution to the file named by ZYPHER_TEST_EXEC_LOG.

With ZYPHER_TEST_GATE set, each batch waits until that file exists: a gate a test in another process
can open (or never open, for a worker that is to be killed holding its batch).
"""

from __future__ import annotations

import os
import time
from typing import Any


class RecordingModel:
    name = "recording"
    version = "1"
    input_schema: dict[str, Any] = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    output_schema: dict[str, Any] = {"type": "object"}

    def __init__(self) -> None:
        self.log_path = os.environ["ZYPHER_TEST_EXEC_LOG"]
        self.latency = float(os.environ.get("ZYPHER_TEST_LATENCY", "0.01"))
        self.gate = os.environ.get("ZYPHER_TEST_GATE")

    def load(self) -> None:
        pass

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        while self.gate and not os.path.exists(self.gate):
            time.sleep(0.01)  # the model's own wait, in its executor thread
        time.sleep(self.latency)
        with open(self.log_path, "a") as log:
            for x in inputs:
                log.write(f"{x['n']}\n")
            log.flush()
            os.fsync(log.fileno())
        return [{"n": x["n"]} for x in inputs]
