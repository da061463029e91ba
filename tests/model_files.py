"""Real model files for the runtime tests, made in a test's folder (never committed: a joblib pickle
must be read by the scikit-learn that wrote it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnx
from onnx import TensorProto, helper
from skl2onnx import to_onnx


def save_joblib(path: Path, estimator: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, path)
    return path


def save_onnx(path: Path, estimator: Any, X: np.ndarray, *, zipmap: bool = True) -> Path:
    """A fitted estimator exported by skl2onnx; a classifier's probabilities as maps unless zipmap=False."""
    options = None if zipmap else {id(estimator): {"zipmap": False}}
    model = to_onnx(estimator, X[:1].astype(np.float32), options=options)
    return _write(path, model)


def save_graph(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any]) -> Path:
    graph = helper.make_graph(nodes, "test", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what this onnxruntime reads
    onnx.checker.check_model(model)
    return _write(path, model)


def save_add(path: Path, *, batch: int | str | None = "batch", width: int = 3) -> Path:
    """C = A + B, float tensors of shape [batch, width]: a symbolic batch axis by default, or a fixed one."""
    shape = [batch, width]
    tensors = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("A", "B", "C")]
    return save_graph(path, [helper.make_node("Add", ["A", "B"], ["C"])], tensors[:2], tensors[2:])


def save_identity(path: Path, element: int, shape: list[Any]) -> Path:
    """Y = X, of one element type and shape."""
    x = helper.make_tensor_value_info("X", element, shape)
    y = helper.make_tensor_value_info("Y", element, shape)
    return save_graph(path, [helper.make_node("Identity", ["X"], ["Y"])], [x], [y])


def save_simple(path: Path) -> Path:
    """Triton's `simple` example model: OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1, INT32
    tensors of shape [batch, 16]."""
    shape: list[Any] = ["batch", 16]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32, shape) for n in ("INPUT0", "INPUT1")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.INT32, shape) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return save_graph(path, nodes, inputs, outputs)


def _write(path: Path, model: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
