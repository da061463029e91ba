"""`digits`: a small neural network for 8x8 handwritten digits, run with numpy alone.

Trained on scikit-learn's digits data by scripts/train_digits.py; the weights ship in digits_weights.npz.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import numpy as np

_PIXEL = {"type": "number", "minimum": 0, "maximum": 16}
_FLAT = {
    "type": "array",
    "items": _PIXEL,
    "minItems": 64,
    "maxItems": 64,
    "description": "64 pixel intensities from 0 (white) to 16 (black), row by row",
}
_ROWS = {
    "type": "array",
    "minItems": 8,
    "maxItems": 8,
    "description": "8 rows of 8 pixel intensities",
    "items": {"type": "array", "items": _PIXEL, "minItems": 8, "maxItems": 8},
}


class DigitsModel:
    name = "digits"
    version = "1.0.0"
    input_schema: dict[str, Any] = {"oneOf": [_FLAT, _ROWS]}
    output_schema: dict[str, Any] = {
        "type": "object",
        "required": ["label", "probabilities"],
        "properties": {
            "label": {"type": "integer", "minimum": 0, "maximum": 9},
            "probabilities": {"type": "array", "items": {"type": "number"}, "minItems": 10, "maxItems": 10},
        },
    }

    def __init__(self) -> None:
        self._layers: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def load(self) -> None:
        with files("zypher_ws.models").joinpath("digits_weights.npz").open("rb") as f, np.load(f) as w:
            self._layers = (w["w1"], w["b1"], w["w2"], w["b2"])

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        if self._layers is None:
            raise RuntimeError("model not loaded")
        w1, b1, w2, b2 = self._layers
        x = np.asarray(inputs, dtype=np.float32).reshape(len(inputs), 64) / 16.0
        hidden = np.maximum(x @ w1 + b1, 0.0)
        logits = hidden @ w2 + b2
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        return [{"label": int(row.argmax()), "probabilities": [round(float(p), 6) for p in row]} for row in probs]
