"""A CPU-bound numpy model of about 1.6-2 ms per single-item call (one core): a small dense network, batchable.

Memory-bound at batch 1 (each call streams the weights once), compute-bound in a batch, so batching
pays off the way it does for real dense models. Serve it with `--model bench.cpu_model:CpuModel`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

WIDTH = 64  # input features
HIDDEN = 2048
LAYERS = 3


class CpuModel:
    name = "cpu-dense"
    version = "1"
    input_schema: dict[str, Any] = {
        "type": "array",
        "items": {"type": "number"},
        "minItems": WIDTH,
        "maxItems": WIDTH,
    }
    output_schema: dict[str, Any] = {"type": "object", "properties": {"score": {"type": "number"}}}

    def __init__(self) -> None:
        self.weights: list[np.ndarray] = []

    def load(self) -> None:
        rng = np.random.default_rng(0)
        shapes = [(WIDTH, HIDDEN)] + [(HIDDEN, HIDDEN)] * (LAYERS - 1) + [(HIDDEN, 1)]
        self.weights = [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in shapes]

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        x = np.asarray(inputs, dtype=np.float32)
        for w in self.weights[:-1]:
            x = np.maximum(x @ w, 0.0)
        scores = (x @ self.weights[-1])[:, 0]
        return [{"score": round(float(s), 6)} for s in scores]


def sample_input(i: int = 0) -> list[float]:
    return [((i * 31 + j * 7) % 17) / 17.0 for j in range(WIDTH)]
