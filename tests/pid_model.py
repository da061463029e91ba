"""A pure-Python model that answers with the process that ran it and that thread's niceness."""

from __future__ import annotations

import os
import threading
from typing import Any


class PidModel:
    name = "pid"
    version = "1"
    input_schema: dict[str, Any] = {"type": "integer"}
    output_schema: dict[str, Any] = {"type": "object"}

    def load(self) -> None:
        self.loaded_in = os.getpid()

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return [{"pid": os.getpid(), "loaded_in": self.loaded_in, "nice": nice, "square": x * x} for x in inputs]
