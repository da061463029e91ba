"""`mock`: the prototype's simulated model, for demos and load tests.

Any JSON input; a deterministic result; a fixed latency per call, like a remote accelerator.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..progress import Progress

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

    def __init__(self, latency_ms: float = 0.0, stream_chunks: int = 0) -> None:
        self.latency = latency_ms / 1000.0
        if stream_chunks:
            self.stream_chunks = stream_chunks
            # Only a mock told to stream offers predict_stream: the service asks `stream: true` of no other.
            self.predict_stream = self._stream

    def load(self) -> None:
        pass

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        if self.latency:
            time.sleep(self.latency)  # runs in the executor; one wait per call, whatever the batch size
        return [self._predict(x) for x in inputs]

    def _stream(self, input: Any) -> Iterator[Any]:
        """`stream_chunks` chunks, one per latency tick: `{"index": i, "token": "t<i> "}`. Progress after each."""
        n = self.stream_chunks
        for i in range(n):
            if self.latency:
                time.sleep(self.latency)
            yield {"index": i, "token": f"t{i} "}
            yield Progress((i + 1) / n)

    @staticmethod
    def _predict(x: Any) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(x, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        return {"prediction": int(digest[:8], 16) / 2**32, "digest": digest}


def from_spec(spec: ModelSpec) -> MockModel:
    """The `mock` built-in: its latency and streaming from the spec's options (`latency_ms`, `stream_chunks`)."""
    return MockModel(
        latency_ms=float(spec.options.get("latency_ms", 0.0)), stream_chunks=int(spec.options.get("stream_chunks", 0))
    )
