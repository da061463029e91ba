"""The runtimes, by name: the one registry. A runtime is one module with a `RUNTIME` description."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import onnx_runtime, python_runtime, sklearn_runtime
from .base import Model, Runtime

if TYPE_CHECKING:
    from .spec import ModelSpec

RUNTIMES: dict[str, Runtime] = {
    runtime.name: runtime for runtime in (onnx_runtime.RUNTIME, sklearn_runtime.RUNTIME, python_runtime.RUNTIME)
}


def build(spec: ModelSpec) -> Model:
    """The model a spec describes, built by its runtime; not loaded (load() runs in the executor)."""
    return RUNTIMES[spec.runtime].build(spec)
