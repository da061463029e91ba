"""The `mock` model for the peers' apps: the same results and waits as `zypher_ws.models.mock.MockModel`.

The peers run in virtual environments of their own, where zypher_ws is not installed, so its few lines
are repeated here (standard library only): a deterministic result per input (the sha256 of its canonical
JSON) and `latency_ms` of sleep per batch call, whatever the batch size. Keep the two in step;
tests/test_bench_peers.py checks that they agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any


class MockModel:
    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency = latency_ms / 1000.0

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        if self.latency:
            time.sleep(self.latency)  # one wait per call, whatever the batch size
        return [self._predict(x) for x in inputs]

    @staticmethod
    def _predict(x: Any) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(x, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        return {"prediction": int(digest[:8], 16) / 2**32, "digest": digest}


# Every peer batches as zypher-ws does by default: at most 32 inputs, waiting at most 2 ms for company.
MAX_BATCH = 32
BATCH_WAIT_S = 0.002


def from_env() -> MockModel:
    """The model the suite asks for: BENCH_MOCK_LATENCY_MS (0 or 50)."""
    return MockModel(latency_ms=float(os.environ.get("BENCH_MOCK_LATENCY_MS", "0")))
