"""A user model whose factory is given its ModelSpec, imported by tests as `configured_model:Scaler`."""

from __future__ import annotations

from typing import Any

from zypher_ws.models import ModelSpec


class Scaler:
    """Multiplies numbers by `options.factor`; reads its version folder's `factor.txt` when there is one."""

    input_schema: dict[str, Any] = {"type": "number"}
    output_schema: dict[str, Any] = {"type": "object", "properties": {"scaled": {"type": "number"}}}

    def __init__(self, spec: ModelSpec) -> None:
        self.name = spec.name or "scaler"
        self.version = spec.version or "0.1"
        self.spec = spec
        self.factor = float(spec.options.get("factor", 1))

    def load(self) -> None:
        if self.spec.path is not None and (self.spec.path / "factor.txt").is_file():
            self.factor = float((self.spec.path / "factor.txt").read_text())

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return [{"scaled": self.factor * x} for x in inputs]
