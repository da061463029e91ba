"""The model contract. Plain synchronous code: the service runs it in an executor, so it never sees asyncio."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Model(Protocol):
    name: str
    version: str
    input_schema: dict[str, Any]
    """JSON Schema of one input (OpenAPI 3.0 compatible, since it is published in the spec)."""
    output_schema: dict[str, Any]
    """JSON Schema of one output."""

    def load(self) -> None:
        """Load weights; called once, in the executor, before the first prediction."""

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        """Return one JSON-serialisable output per input, in order. May raise."""
