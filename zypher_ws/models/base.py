"""The model contract. Plain synchronous code: the service runs it in an executor, so it never sees asyncio."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .spec import ModelSpec


@runtime_checkable
class Model(Protocol):
    name: str
    version: str

    @property
    def input_schema(self) -> dict[str, Any]:
        """JSON Schema of one input (OpenAPI 3.0 compatible, since it is published in the spec)."""

    @property
    def output_schema(self) -> dict[str, Any]:
        """JSON Schema of one output."""

    def load(self) -> None:
        """Load weights; called once, in the executor, before the first prediction."""

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        """Return one JSON-serialisable output per input, in order. May raise."""


@dataclass(frozen=True)
class Runtime:
    """How models of one kind are made (runtimes.RUNTIMES has them all, by name)."""

    name: str
    build: Callable[[ModelSpec], Model]
    """The model a spec describes, not loaded yet (load() runs in the executor)."""
    files: tuple[str, ...]
    """The well-known file names of its models in a repository's version folder, preferred first."""
    extra: str | None
    """The pip extra that installs its packages (`pip install "zypher-ws[extra]"`), if any."""
