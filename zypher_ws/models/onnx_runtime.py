"""`onnx`: an ONNX graph run by onnxruntime (`pip install "zypher-ws[onnx]"`).

The JSON Schemas come from the graph. A first dimension that is symbolic or missing is the batch axis;
a first dimension of 1 is a fixed batch of one; any other first dimension means the input has no batch
axis. One prediction's input is one row: the tensor without its batch axis. A graph with one input
takes that tensor itself, one with several takes `{input_name: tensor}`. When every input has a dynamic
batch axis, a batch of predictions is one session run over the rows stacked; otherwise each runs alone.

Outputs come back as `{output_name: value}`. A scikit-learn classifier exported by skl2onnx (a label and
a sequence of probability maps, the "zipmap") comes back as `{"label": ..., "probabilities": {...}}`.

Options: `providers` (onnxruntime's execution providers, in order of preference; default
["CPUExecutionProvider"]), `intra_op_threads` and `inter_op_threads` (0: onnxruntime decides).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Runtime
from .errors import ModelConfigError, ModelLoadError, check_installed, import_extra
from .tensors import TensorSpec, tensor_schema

if TYPE_CHECKING:
    from .spec import ModelSpec

EXTRA = "onnx"
OPTIONS = ("providers", "intra_op_threads", "inter_op_threads")
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

# onnxruntime's element types: the Open Inference Protocol's datatype and numpy's dtype of each.
ELEMENT_TYPES: dict[str, tuple[str, Any]] = {
    "tensor(bool)": ("BOOL", np.bool_),
    "tensor(uint8)": ("UINT8", np.uint8),
    "tensor(uint16)": ("UINT16", np.uint16),
    "tensor(uint32)": ("UINT32", np.uint32),
    "tensor(uint64)": ("UINT64", np.uint64),
    "tensor(int8)": ("INT8", np.int8),
    "tensor(int16)": ("INT16", np.int16),
    "tensor(int32)": ("INT32", np.int32),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(float16)": ("FP16", np.float16),
    "tensor(float)": ("FP32", np.float32),
    "tensor(double)": ("FP64", np.float64),
    "tensor(string)": ("BYTES", np.object_),
}
PROBABILITY_MAP = "seq(map("  # skl2onnx's zipmap: one {class: probability} per row


def build(spec: ModelSpec) -> OnnxModel:
    check_installed("onnx", EXTRA, "onnxruntime")
    _check_options(spec)
    return OnnxModel(spec)


RUNTIME = Runtime(name="onnx", build=build, files=("model.onnx",), extra=EXTRA)


@dataclass(frozen=True)
class _Port:
    """One input or output of the graph."""

    name: str
    kind: str
    """onnxruntime's type: tensor(float), seq(map(int64,tensor(float))), ..."""
    datatype: str
    dtype: Any
    shape: tuple[int, ...]
    """One row's shape (without the batch axis), -1 for a dimension of any size."""
    batch: str
    """dynamic (symbolic or missing first dimension), fixed (a first dimension of 1) or none."""

    @property
    def is_map(self) -> bool:
        return self.kind.startswith(PROBABILITY_MAP)


@dataclass(frozen=True)
class _Graph:
    inputs: tuple[_Port, ...]
    outputs: tuple[_Port, ...]
    rows: bool
    """Every input has a batch axis (dynamic or a fixed 1), so outputs are split into rows."""
    batches: bool
    """Every input's batch axis is dynamic: a batch is one run over the stacked rows."""
    classifier: tuple[str, str] | None
    """(label output, probability-map output) of a skl2onnx classifier, else None."""


class OnnxModel:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.name = spec.name or "onnx"
        self.version = spec.version or "1"
        self._lock = threading.Lock()
        self._session: Any = None
        self._graph: _Graph | None = None

    # -- the contract --------------------------------------------------------------------------------

    def load(self) -> None:
        """Open the session (once): the schemas need it too, so reading them first loads the model."""
        with self._lock:
            if self._session is None:
                self._session, self._graph = self._open()

    @property
    def input_schema(self) -> dict[str, Any]:
        graph = self._described()
        schemas = {p.name: tensor_schema(p.datatype, p.shape, f"tensor {p.name} ({p.datatype})") for p in graph.inputs}
        if len(graph.inputs) == 1:
            return schemas[graph.inputs[0].name]
        names = list(schemas)
        return {"type": "object", "properties": schemas, "required": names, "additionalProperties": False}

    @property
    def output_schema(self) -> dict[str, Any]:
        graph = self._described()
        properties: dict[str, Any] = {}
        for port in graph.outputs:
            name = self._output_name(port.name)
            if port.is_map:
                properties[name] = {
                    "type": "object",
                    "additionalProperties": {"type": "number"},
                    "description": "probability of each class",
                }
            else:
                properties[name] = tensor_schema(port.datatype, port.shape)
                if self._labels_apply(port):
                    properties[name] = {"anyOf": [properties[name], {"type": "string"}]}
        return {"type": "object", "required": list(properties), "properties": properties}

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [TensorSpec(p.name, p.datatype, p.shape) for p in self._described().inputs]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        found = []
        for port in self._described().outputs:
            # A probability map is a tensor of one probability per class, in the map's order.
            shape = (-1,) if port.is_map else port.shape
            datatype = "BYTES" if self._labels_apply(port) else port.datatype  # classes renamed by labels
            found.append(TensorSpec(self._output_name(port.name), datatype, shape))
        return found

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        graph = self._described()
        rows = [self._row(x, graph) for x in inputs]
        if graph.batches and len(rows) > 1:
            stacked = _stack(rows, graph)
            if stacked is not None:
                results = self._session.run(None, stacked)
                if all(_count(value) == len(rows) for value in results):
                    return [self._output(results, i, graph) for i in range(len(rows))]
        return [self._run_one(row, graph) for row in rows]

    # -- the graph -----------------------------------------------------------------------------------

    def _described(self) -> _Graph:
        if self._graph is None:
            self.load()
        assert self._graph is not None
        return self._graph

    def _open(self) -> tuple[Any, _Graph]:
        ort = import_extra("onnx", EXTRA, "onnxruntime")
        path = self.spec.model_file()
        options = self.spec.options
        providers = list(options.get("providers", DEFAULT_PROVIDERS))
        available = ort.get_available_providers()
        absent = [p for p in providers if p not in available]
        if absent:
            raise ModelLoadError(
                f"{path}: execution provider {absent[0]} is not available in this onnxruntime "
                f"(available: {', '.join(available)})"
            )
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.get("intra_op_threads", 0)
        session_options.inter_op_num_threads = options.get("inter_op_threads", 0)
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
        except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            raise ModelLoadError(f"{path}: onnxruntime cannot load it: {exc}") from exc
        return session, _read_graph(session, path)

    def _output_name(self, name: str) -> str:
        classifier = self._described().classifier
        if classifier is not None:
            return {classifier[0]: "label", classifier[1]: "probabilities"}.get(name, name)
        return name

    def _labels_apply(self, port: _Port) -> bool:
        classifier = self._described().classifier
        return self.spec.config.labels is not None and classifier is not None and port.name == classifier[0]

    # -- running -------------------------------------------------------------------------------------

    def _row(self, value: Any, graph: _Graph) -> dict[str, np.ndarray]:
        if len(graph.inputs) == 1:
            values = {graph.inputs[0].name: value}
        elif isinstance(value, dict):
            missing = [p.name for p in graph.inputs if p.name not in value]
            if missing:
                raise ValueError(f"input lacks tensor {missing[0]!r}")
            values = value
        else:
            raise ValueError(f"input must be an object of tensors: {', '.join(p.name for p in graph.inputs)}")
        row = {}
        for port in graph.inputs:
            try:
                array = np.asarray(values[port.name], dtype=port.dtype)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"tensor {port.name}: not {port.datatype} values ({exc})") from None
            fits = array.ndim == len(port.shape) and all(
                n in (-1, got) for n, got in zip(port.shape, array.shape, strict=True)
            )
            if not fits:
                raise ValueError(f"tensor {port.name}: shape {list(array.shape)}, expected {list(port.shape)}")
            row[port.name] = array
        return row

    def _run_one(self, row: dict[str, np.ndarray], graph: _Graph) -> Any:
        feeds = {name: array[np.newaxis] if graph.rows else array for name, array in row.items()}
        return self._output(self._session.run(None, feeds), 0, graph)

    def _output(self, results: list[Any], i: int, graph: _Graph) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for port, value in zip(graph.outputs, results, strict=True):
            one = value[i] if graph.rows and _count(value) > 0 else value  # a scalar output has no rows
            name = self._output_name(port.name)
            if port.is_map:
                out[name] = {str(self.spec.config.label(k)): float(p) for k, p in one.items()}
            else:
                out[name] = _plain(one)
                if self._labels_apply(port):
                    out[name] = self.spec.config.label(out[name])
        return out


def _read_graph(session: Any, path: object) -> _Graph:
    inputs = tuple(_port(arg, path, "input") for arg in session.get_inputs())
    rows = all(p.batch != "none" for p in inputs)
    outputs = tuple(_port(arg, path, "output", rows=rows) for arg in session.get_outputs())
    batches = rows and all(p.batch == "dynamic" for p in inputs)
    maps = [p for p in outputs if p.is_map]
    classifier = None
    if len(outputs) == 2 and len(maps) == 1:
        label = next(p for p in outputs if not p.is_map)
        if label.shape == ():
            classifier = (label.name, maps[0].name)
    return _Graph(inputs=inputs, outputs=outputs, rows=rows, batches=batches, classifier=classifier)


def _port(arg: Any, path: object, role: str, *, rows: bool = True) -> _Port:
    kind = str(arg.type)
    if kind.startswith(PROBABILITY_MAP) and role == "output":
        return _Port(arg.name, kind, "FP32", np.float32, (), "dynamic")
    if kind not in ELEMENT_TYPES:
        raise ModelLoadError(f"{path}: {role} {arg.name} is of type {kind}, which this runtime does not serve")
    datatype, dtype = ELEMENT_TYPES[kind]
    dims = list(arg.shape) if arg.shape is not None else []
    sizes = [d if isinstance(d, int) and d >= 0 else -1 for d in dims]
    if role == "output":
        return _Port(arg.name, kind, datatype, dtype, tuple(sizes[1:] if rows else sizes), "none")
    if not sizes:
        return _Port(arg.name, kind, datatype, dtype, (), "none")
    batch = "dynamic" if sizes[0] == -1 else "fixed" if sizes[0] == 1 else "none"
    return _Port(arg.name, kind, datatype, dtype, tuple(sizes[1:] if batch != "none" else sizes), batch)


def _stack(rows: list[dict[str, np.ndarray]], graph: _Graph) -> dict[str, np.ndarray] | None:
    """The rows as one batch, or None when a variable dimension differs between them."""
    stacked = {}
    for port in graph.inputs:
        arrays = [row[port.name] for row in rows]
        if any(a.shape != arrays[0].shape for a in arrays):
            return None
        stacked[port.name] = np.stack(arrays)
    return stacked


def _count(value: Any) -> int:
    return len(value) if isinstance(value, (list, np.ndarray)) and np.ndim(value) > 0 else -1


def _plain(value: Any) -> Any:
    """numpy to JSON-serialisable Python: arrays to lists, scalars to numbers, strings as they are."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def _check_options(spec: ModelSpec) -> None:
    options = spec.options
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ModelConfigError(f"{spec.source}: unknown onnx option {unknown[0]!r} (options: {', '.join(OPTIONS)})")
    providers = options.get("providers", DEFAULT_PROVIDERS)
    if not isinstance(providers, (list, tuple)) or not providers or not all(isinstance(p, str) for p in providers):
        raise ModelConfigError(f"{spec.source}: providers must be a list of execution provider names")
    for key in ("intra_op_threads", "inter_op_threads"):
        value = options.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ModelConfigError(f"{spec.source}: {key} must be a whole number of at least 0, not {value!r}")
