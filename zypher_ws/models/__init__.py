"""Model lookup: a built-in name or `package.module:factory`."""

from __future__ import annotations

import importlib

from ..settings import Settings
from .base import Model
from .digits import DigitsModel
from .mock import MockModel

__all__ = ["DigitsModel", "MockModel", "Model", "build_model"]


def build_model(settings: Settings) -> Model:
    """Instantiate (not load) the model that the settings name."""
    spec = settings.model
    if spec == "digits":
        return DigitsModel()
    if spec == "mock":
        return MockModel(latency_ms=settings.mock_latency_ms)
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: use digits, mock, or package.module:factory")
    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    model = factory() if isinstance(factory, type) or not isinstance(factory, Model) else factory
    if not isinstance(model, Model):
        raise TypeError(f"{spec} did not produce a model (needs name, version, schemas, load, predict_batch)")
    return model
