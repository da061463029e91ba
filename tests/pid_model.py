"""A pure-Python model that answers with the id of the process that ran it (for --executor process)."""

from __future__ import annotations

import os
from typing import Any


class PidModel:
    name = "pid"
    version = "1"
    input_schema: dict[str, Any] = {"type": "integer"}
    output_schema: dict[str, Any] = {"type": "object"}

    def load(self) -> None:
        self.loaded_in = os.getpid()

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return [{"pid": os.getpid(), "loaded_in": self.loaded_in, "square": x * x} for x in inputs]
