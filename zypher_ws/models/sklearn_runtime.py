"""`sklearn`: a scikit-learn estimator or pipeline saved with joblib (`pip install "zypher-ws[sklearn]"`).

One input is a row of `n_features_in_` numbers; an estimator fitted on a data frame (it has
`feature_names_in_`) also takes an object keyed by feature name. The output is `{"label": ...}`, plus
`"probabilities": {class: p}` when the estimator has `predict_proba`; `labels` in config.json renames
the classes.

Loading a pickle runs code: only the file the configuration names (`--model NAME=sklearn:PATH`, or a
repository's `model.joblib` / `model.pkl`) is loaded, never one outside it, and it must be trusted.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Runtime
from .errors import ModelConfigError, ModelLoadError, check_installed, import_extra
from .tensors import TensorSpec

if TYPE_CHECKING:
    from .spec import ModelSpec

EXTRA = "sklearn"
# sklearn warns when an estimator fitted with feature names is given a bare array; without pandas the
# runtime orders the features itself and passes an array, so that warning is expected and muted.
_NO_NAMES_WARNING = "X does not have valid feature names"
_warnings_lock = threading.Lock()  # warnings.catch_warnings swaps process-wide state


def build(spec: ModelSpec) -> SklearnModel:
    check_installed("sklearn", EXTRA, "joblib", "sklearn")
    if spec.options:
        raise ModelConfigError(f"{spec.source}: the sklearn runtime takes no options ({', '.join(spec.options)})")
    return SklearnModel(spec)


RUNTIME = Runtime(name="sklearn", build=build, files=("model.joblib", "model.pkl"), extra=EXTRA)


class SklearnModel:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.name = spec.name or "sklearn"
        self.version = spec.version or "1"
        self._lock = threading.Lock()
        self._estimator: Any = None
        self._features: int | None = None
        self._names: list[str] | None = None
        self._classes: list[Any] | None = None
        self._proba = False
        self._pandas: Any = None

    # -- the contract --------------------------------------------------------------------------------

    def load(self) -> None:
        """Unpickle the estimator (once): the schemas need it too, so reading them first loads it."""
        with self._lock:
            if self._estimator is None:
                self._open()

    @property
    def input_schema(self) -> dict[str, Any]:
        self._loaded()
        row: dict[str, Any] = {"type": "array", "items": {"type": "number"}}
        if self._features is not None:
            row["minItems"] = row["maxItems"] = self._features
            row["description"] = f"{self._features} feature values"
        if self._names is None:
            return row
        # Each branch also says "not the other type", redundantly: the validator reports the branch with
        # the fewest errors, so an object is told which feature it lacks rather than "not an array".
        row["not"] = {"type": "object"}
        named = {
            "type": "object",
            "properties": {name: {"type": "number"} for name in self._names},
            "required": list(self._names),
            "additionalProperties": False,
            "not": {"type": "array"},
            "description": "feature values by name",
        }
        return {"oneOf": [row, named]}

    @property
    def output_schema(self) -> dict[str, Any]:
        self._loaded()
        label = self._label_schema()
        properties: dict[str, Any] = {"label": label}
        if self._proba and self._classes is not None:
            keys = [str(self.spec.config.label(c)) for c in self._classes]
            properties["probabilities"] = {
                "type": "object",
                "properties": {key: {"type": "number"} for key in keys},
                "required": keys,
                "description": "probability of each class",
            }
        return {"type": "object", "required": list(properties), "properties": properties}

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        self._loaded()
        return [TensorSpec("input", "FP64", (self._features if self._features is not None else -1,))]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        self._loaded()
        found = [TensorSpec("label", self._label_datatype(), ())]
        if self._proba and self._classes is not None:
            found.append(TensorSpec("probabilities", "FP64", (len(self._classes),)))
        return found

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        self._loaded()
        matrix = self._matrix(inputs)
        labels = self._call("predict", matrix)
        probabilities = self._call("predict_proba", matrix) if self._proba else None
        config = self.spec.config
        outputs: list[Any] = []
        for i, label in enumerate(labels):
            out: dict[str, Any] = {"label": config.label(_plain(label))}
            if probabilities is not None and self._classes is not None:
                out["probabilities"] = {
                    str(config.label(c)): float(p) for c, p in zip(self._classes, probabilities[i], strict=True)
                }
            outputs.append(out)
        return outputs

    # -- loading -------------------------------------------------------------------------------------

    def _loaded(self) -> None:
        if self._estimator is None:
            self.load()

    def _open(self) -> None:
        joblib = import_extra("sklearn", EXTRA, "joblib")
        import_extra("sklearn", EXTRA, "sklearn")
        path = self.spec.model_file()
        try:
            estimator = joblib.load(path)
        except Exception as exc:  # a pickle can fail in any way: truncated, not joblib, a missing class
            raise ModelLoadError(f"{path}: joblib cannot load it: {type(exc).__name__}: {exc}") from exc
        if not callable(getattr(estimator, "predict", None)):
            raise ModelLoadError(f"{path}: holds a {type(estimator).__name__}, which has no predict()")
        features = getattr(estimator, "n_features_in_", None)
        self._features = int(features) if features is not None else None
        names = getattr(estimator, "feature_names_in_", None)
        self._names = [str(n) for n in names] if names is not None else None
        classes = getattr(estimator, "classes_", None)
        self._classes = [_plain(c) for c in classes] if classes is not None else None
        self._proba = self._classes is not None and hasattr(estimator, "predict_proba")
        if self._names is not None:
            try:
                import pandas
            except ImportError:
                pandas = None
            self._pandas = pandas
        self._estimator = estimator

    # -- running -------------------------------------------------------------------------------------

    def _matrix(self, inputs: list[Any]) -> np.ndarray:
        rows = []
        for value in inputs:
            if isinstance(value, dict):
                if self._names is None:
                    raise ValueError("this estimator has no feature names: give its features as a list")
                missing = [name for name in self._names if name not in value]
                if missing:
                    raise ValueError(f"input lacks feature {missing[0]!r}")
                value = [value[name] for name in self._names]
            rows.append(value)
        try:
            matrix = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"input is not rows of numbers ({exc})") from None
        if matrix.ndim != 2 or (self._features is not None and matrix.shape[1] != self._features):
            raise ValueError(f"each input must be {self._features} numbers")
        return matrix

    def _call(self, method: str, matrix: np.ndarray) -> Any:
        fn = getattr(self._estimator, method)
        if self._names is None:
            return fn(matrix)
        if self._pandas is not None:
            return fn(self._pandas.DataFrame(matrix, columns=self._names))
        with _warnings_lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_NAMES_WARNING, category=UserWarning)
            return fn(matrix)

    def _label_datatype(self) -> str:
        if self.spec.config.labels is not None:
            return "BYTES"  # classes renamed by config.json's labels
        if self._classes is None:
            return "FP64"
        if all(isinstance(c, bool) for c in self._classes):
            return "BOOL"
        if all(isinstance(c, int) for c in self._classes):
            return "INT64"
        if all(isinstance(c, (int, float)) for c in self._classes):
            return "FP64"
        return "BYTES"

    def _label_schema(self) -> dict[str, Any]:
        if self._classes is None:
            return {"type": "number", "description": "the estimator's prediction"}
        names = [self.spec.config.label(c) for c in self._classes]
        return {"enum": names, "description": "the predicted class"}


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value
