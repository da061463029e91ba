"""`python`: a model made by your own code, `package.module:factory`.

The factory is a class or a callable that returns a model (or a model object itself). One that takes a
required positional argument is given the ModelSpec (name, version, path, config.options), so one
factory can serve several configured models; one that takes none is called with none.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..progress import Progress
from .base import Model, Runtime
from .errors import ModelConfigError, NotAModel
from .tensors import TensorSpec, tensor_metadata

if TYPE_CHECKING:
    from .spec import ModelSpec


def build(spec: ModelSpec) -> Model:
    if spec.factory is None:
        raise ModelConfigError(f"{spec.source}: the python runtime needs package.module:factory")
    factory = _import(spec.factory, spec.source)
    if isinstance(factory, Model) and not isinstance(factory, type):
        model: object = factory
    else:
        model = factory(spec) if _takes_an_argument(factory) else factory()
    if not isinstance(model, Model) and callable(getattr(model, "predict_stream", None)):
        model = StreamOnly(model)  # a generator model alone: it streams, or answers with all its chunks
    if not isinstance(model, Model):
        raise NotAModel(
            f"{spec.factory} did not produce a model (needs name, version, input_schema, output_schema, "
            "load and predict_batch or predict_stream)"
        )
    if (spec.name is None or spec.name == model.name) and (spec.version is None or spec.version == model.version):
        return model
    return Renamed(model, name=spec.name or model.name, version=spec.version or model.version)


RUNTIME = Runtime(name="python", build=build, files=(), extra=None)


class StreamOnly:
    """A model with predict_stream and no predict_batch: a request that does not ask to stream gets the
    list of its chunks (its Progress left out), as a finished stream's record has it. The service runs
    such a request through the stream too (`stream_only`), so it keeps the stream limits and its cancel;
    predict_batch is for callers of the model object alone."""

    stream_only = True

    def __init__(self, model: Any) -> None:
        self.model = model
        self.name: str = model.name
        self.version: str = model.version
        self.predict_stream = model.predict_stream

    @property
    def input_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = self.model.input_schema
        return schema

    @property
    def output_schema(self) -> dict[str, Any]:
        return {"type": "array", "description": "the chunks the model yields", "items": self.model.output_schema}

    def load(self) -> None:
        self.model.load()

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return [[c for c in self.model.predict_stream(x) if not isinstance(c, Progress)] for x in inputs]


class Renamed:
    """A model served under the name and version it was configured with rather than its own."""

    def __init__(self, model: Model, *, name: str, version: str) -> None:
        self.model = model
        self.name = name
        self.version = version
        stream = getattr(model, "predict_stream", None)
        if callable(stream):
            self.predict_stream = stream  # only a model that streams offers it
        self.stream_only: bool = bool(getattr(model, "stream_only", False))

    @property
    def input_schema(self) -> dict[str, Any]:
        return self.model.input_schema

    @property
    def output_schema(self) -> dict[str, Any]:
        return self.model.output_schema

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return tensor_metadata(self.model).inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return tensor_metadata(self.model).outputs

    def load(self) -> None:
        self.model.load()

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return self.model.predict_batch(inputs)


def _import(factory: str, source: str) -> Any:
    module_name, _, attr = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelConfigError(f"{source}: cannot import {module_name}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelConfigError(f"{source}: {module_name} has no {attr}") from None


def _takes_an_argument(factory: Any) -> bool:
    """Whether the factory has a required positional parameter (for the spec)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some built-ins): call it bare
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional and p.default is inspect.Parameter.empty for p in parameters)
