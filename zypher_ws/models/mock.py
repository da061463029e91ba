"""`mock`: the prototype's simulated model, for demos and load tests.

Any JSON input; a deterministic result; a fixed latency per call, like a remote accelerator.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spec import ModelSpec


class MockModel:
    name = "mock"
    version = "1.0.0"
    input_schema: dict[str, Any] = {"description": "any JSON value"}
    output_schema: dict[str, Any] = {
        "type": "object",
        "required": ["prediction", "digest"],
        "properties": {
            "prediction": {"type": "number", "description": "a number in [0, 1) derived from the input"},
            "digest": {"type": "string", "description": "sha256 of the input's canonical JSON"},
        },
    }

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency = latency_ms / 1000.0

    def load(self) -> None:
        pass

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        if self.latency:
            time.sleep(self.latency)  # runs in the executor; one wait per call, whatever the batch size
        return [self._predict(x) for x in inputs]

    @staticmethod
    def _predict(x: Any) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(x, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        return {"prediction": int(digest[:8], 16) / 2**32, "digest": digest}


def from_spec(spec: ModelSpec) -> MockModel:
    """The `mock` built-in: its latency from the spec's options (`latency_ms`)."""
    return MockModel(latency_ms=float(spec.options.get("latency_ms", 0.0)))
