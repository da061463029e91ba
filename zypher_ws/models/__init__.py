"""Models: the contract (base.py), the built-ins, the runtimes that make models from files and code
(runtimes.py), and what to serve, from `--model` options and a repository (spec.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from ..settings import Settings
from .base import Model, Runtime
from .digits import DigitsModel
from .errors import MissingExtra, ModelConfigError, ModelLoadError, ModelSetupError, NotAModel
from .mock import MockModel
from .runtimes import RUNTIMES, build
from .spec import (
    BUILTINS,
    ModelConfig,
    ModelSpec,
    default_version,
    parse_model_option,
    resolve_default,
    scan_repository,
    versions_of,
)
from .tensors import DATATYPES, TensorMetadata, TensorSpec, tensor_metadata

__all__ = [
    "BUILTINS", "DATATYPES", "RUNTIMES", "DigitsModel", "MissingExtra", "MockModel", "Model", "ModelConfig",
    "ModelConfigError", "ModelLoadError", "ModelSetupError", "ModelSpec", "NotAModel", "Runtime",
    "TensorMetadata", "TensorSpec", "build", "build_model", "default_version", "model_specs",
    "parse_model_option", "resolve_default", "scan_repository", "tensor_metadata", "versions_of",
]  # fmt: skip


def model_specs(
    models: Sequence[str],
    *,
    repository: str | Path | None = None,
    default_model: str | None = None,
    mock_latency_ms: float = 0.0,
) -> list[ModelSpec]:
    """Everything to serve: each `--model` in order, then every version in `--model-repository`, with
    the default marked (`--default-model`, else the first `--model`, else the repository's first model
    by name). `mock_latency_ms` is the global `--mock-latency-ms` for the `mock` built-in."""
    specs = [parse_model_option(text) for text in models]
    if repository is not None:
        specs += scan_repository(repository)
    specs = [_with_mock_latency(spec, mock_latency_ms) for spec in specs]
    return resolve_default(specs, default_model)


def build_model(settings: Settings) -> Model:
    """Instantiate (not load) the one model that `--model` names."""
    (spec,) = model_specs([settings.model], mock_latency_ms=settings.mock_latency_ms)
    return build(spec)


def _with_mock_latency(spec: ModelSpec, latency_ms: float) -> ModelSpec:
    if spec.factory != BUILTINS["mock"] or "latency_ms" in spec.options:
        return spec
    config = dataclasses.replace(spec.config, options={**spec.options, "latency_ms": latency_ms})
    return dataclasses.replace(spec, config=config)
