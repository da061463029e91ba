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
    scan_model,
    scan_repository,
    versions_of,
)
from .tensors import DATATYPES, TensorMetadata, TensorSpec, tensor_metadata

__all__ = [
    "BUILTINS",
    "DATATYPES",
    "RUNTIMES",
    "DigitsModel",
    "MissingExtra",
    "MockModel",
    "Model",
    "ModelConfig",
    "ModelConfigError",
    "ModelLoadError",
    "ModelSetupError",
    "ModelSpec",
    "NotAModel",
    "Runtime",
    "TensorMetadata",
    "TensorSpec",
    "build",
    "build_model",
    "build_models",
    "configured_specs",
    "default_version",
    "model_specs",
    "parse_model_option",
    "resolve_default",
    "scan_model",
    "scan_repository",
    "spec_of",
    "tensor_metadata",
    "versions_of",
]  # fmt: skip


def model_specs(
    models: Sequence[str],
    *,
    repository: str | Path | None = None,
    default_model: str | None = None,
    mock_latency_ms: float = 0.0,
    mock_stream_chunks: int = 0,
) -> list[ModelSpec]:
    """Everything to serve: each `--model` in order, then every version in `--model-repository`, with
    the default marked (`--default-model`, else the first `--model`, else the repository's first model
    by name). `mock_latency_ms` is the global `--mock-latency-ms` for the `mock` built-in.

    With a repository, a `--model NAME` naming one of its models picks it: then only the picked ones of
    the repository are served (`zypher-ws worker --model-repository DIR --model big` runs one model).
    """
    found = scan_repository(repository) if repository is not None else []
    in_repository = {spec.name for spec in found}
    picked = [text.strip() for text in models if text.strip() in in_repository]
    for text in models:
        name = text.strip()
        if repository is not None and name not in in_repository and name not in BUILTINS and ":" not in name:
            known = ", ".join(sorted(n for n in in_repository if n))
            raise ModelConfigError(f"--model {name}: no such model in --model-repository {repository} ({known})")
    specs = [parse_model_option(text) for text in models if text.strip() not in in_repository]
    specs += [spec for spec in found if not picked or spec.name in picked]
    if default_model is None and picked and models[0].strip() == picked[0]:
        default_model = picked[0]  # the first --model is the default, picked from the repository or not
    specs = [_with_mock_options(spec, mock_latency_ms, mock_stream_chunks) for spec in specs]
    return resolve_default(specs, default_model)


def configured_specs(settings: Settings) -> list[ModelSpec]:
    """The model versions the settings name: `--model` (digits with neither it nor a repository),
    `--model-repository`, `--default-model`."""
    return model_specs(
        settings.model or (() if settings.model_repository else ("digits",)),
        repository=settings.model_repository or None,
        default_model=settings.default_model or None,
        mock_latency_ms=settings.mock_latency_ms,
        mock_stream_chunks=settings.mock_stream_chunks,
    )


def build_models(settings: Settings) -> list[tuple[ModelSpec, Model]]:
    """Every configured model version with its model, built (not loaded: that runs in its executor)."""
    return [(spec, build(spec)) for spec in configured_specs(settings)]


def build_model(settings: Settings) -> Model:
    """Instantiate (not load) the default model the settings name."""
    (model,) = [model for spec, model in build_models(settings) if spec.is_default]
    return model


def spec_of(model: Model, *, source: str = "a model object") -> ModelSpec:
    """The spec of a model given as an object (tests, embedding): served as itself, the default."""
    return ModelSpec(name=model.name, version=model.version, runtime="python", is_default=True, source=source)


def _with_mock_options(spec: ModelSpec, latency_ms: float, stream_chunks: int) -> ModelSpec:
    """The global --mock-latency-ms and --mock-stream-chunks, where the mock's own options do not say."""
    if spec.factory != BUILTINS["mock"]:
        return spec
    options = {"latency_ms": latency_ms, "stream_chunks": stream_chunks, **spec.options}
    config = dataclasses.replace(spec.config, options=options)
    return dataclasses.replace(spec, config=config)
