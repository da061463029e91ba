"""A model for crash tests: appends every execution to the file named by ZYPHER_TEST_EXEC_LOG."""

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

    def load(self) -> None:
        pass

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        time.sleep(self.latency)
        with open(self.log_path, "a") as log:
            for x in inputs:
                log.write(f"{x['n']}\n")
            log.flush()
            os.fsync(log.fileno())
        return [{"n": x["n"]} for x in inputs]
