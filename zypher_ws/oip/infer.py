"""Inference requests and responses of the Open Inference Protocol, mapped onto a model's rows.

An OIP request carries a batch: every input tensor has the shape [N, ...row shape]. It becomes one
prediction whose input holds the request's N rows, each in the model's own input form (the tensor
without its batch axis, or `{name: tensor}` for a model of several inputs), and whose result is the
OIP response, all N rows in one tensor per output. The worker hands the rows of every prediction in a
batch to the model together (runner.py), so concurrent requests share model calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInferenceRequest
from ..json_codec import dumps_str, loads
from ..models.tensors import TensorMetadata, TensorSpec
from .tensors import (
    DTYPES,
    FLOATS,
    INTEGERS,
    check_datatype,
    check_shape,
    from_bytes,
    from_json,
    to_bytes,
    to_json_data,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
"""The HTTP header giving the JSON header's length in bytes, when binary tensor data follows it."""
PROTOCOL = "oip"
"""The `protocol` of a prediction made from an OIP request (records.Prediction.protocol)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None
    """Its `parameters.binary_data`; None: as the request's `binary_data_output` says."""


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] | None
    """None: every output of the model."""
    binary_output: bool
    """`parameters.binary_data_output`: outputs as binary unless one says otherwise."""

    def binary_outputs(self, names: Sequence[str]) -> set[str]:
        """Which of the response's outputs go as binary data."""
        asked = {o.name: o.binary for o in self.outputs or ()}
        chosen = set()
        for name in names:
            binary = asked.get(name)
            if binary is True or (binary is None and self.binary_output):
                chosen.add(name)
        return chosen


# -- the request ----------------------------------------------------------------------------------


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Read an infer request: all JSON, or a JSON header of `header_length` bytes then binary tensors."""
    view = memoryview(body)
    if header_length is None:
        header_bytes, binary = view, view[len(view) :]
    else:
        length = header_length.strip()
        if not (length.isascii() and length.isdigit()) or int(length) > len(view):  # "²" is a digit too
            raise InvalidInferenceRequest(
                f"{HEADER_LENGTH} must be a number of bytes within the body's {len(view)}, not {header_length[:40]!r}"
            )
        header_bytes, binary = view[: int(length)], view[int(length) :]
    try:
        header = loads(bytes(header_bytes))
    except ValueError as exc:
        raise InvalidInferenceRequest(f"the request's JSON is not valid: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInferenceRequest("the request must be a JSON object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInferenceRequest("id must be a string")
    parameters = _parameters(header.get("parameters"), "parameters")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInferenceRequest("inputs must be a non-empty list of tensors")
    inputs, offset = [], 0
    for i, raw in enumerate(raw_inputs):
        tensor, used = _input(raw, i, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise InvalidInferenceRequest(
            f"{len(binary) - offset} bytes after the binary data the inputs' binary_data_size account for"
        )
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise InvalidInferenceRequest("an input is named twice")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInferenceRequest("parameters.binary_data_output must be true or false")
    if "classification" in parameters:
        raise InvalidInferenceRequest("the classification extension is not supported")
    return InferRequest(request_id, parameters, tuple(inputs), _outputs(header.get("outputs")), binary_output)


def _input(raw: Any, index: int, binary: memoryview) -> tuple[Tensor, int]:
    """One input tensor, and how many bytes of the binary data it took."""
    if not isinstance(raw, dict):
        raise InvalidInferenceRequest(f"inputs[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInferenceRequest(f"inputs[{index}] needs a name")
    what = f"input {_quoted(name)}"
    datatype = check_datatype(raw.get("datatype"), what)
    shape = check_shape(raw.get("shape"), what)
    parameters = _parameters(raw.get("parameters"), f"{what}: parameters")
    for unsupported in ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"):
        if unsupported in parameters:
            raise InvalidInferenceRequest(f"{what}: shared memory is not supported")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise InvalidInferenceRequest(f"{what}: needs data, or parameters.binary_data_size")
        return Tensor(name, datatype, from_json(datatype, shape, raw["data"], what)), 0
    if "data" in raw:
        raise InvalidInferenceRequest(f"{what}: has both data and binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInferenceRequest(f"{what}: binary_data_size must be a whole number of bytes")
    if size > len(binary):
        raise InvalidInferenceRequest(
            f"{what}: binary_data_size is {size} bytes, and only {len(binary)} bytes of binary data are left"
        )
    return Tensor(name, datatype, from_bytes(datatype, shape, binary[:size], what)), size


def _outputs(raw: Any) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInferenceRequest("outputs must be a list")
    found = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInferenceRequest(f"outputs[{i}] must be an object with a name")
        parameters = _parameters(item.get("parameters"), f"outputs[{i}].parameters")
        if "classification" in parameters:
            raise InvalidInferenceRequest("the classification extension is not supported")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInferenceRequest(f"outputs[{i}].parameters.binary_data must be true or false")
        found.append(RequestedOutput(item["name"], binary))
    return tuple(found)


def _parameters(raw: Any, what: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInferenceRequest(f"{what} must be an object")
    return raw


# -- onto the model's rows ------------------------------------------------------------------------


def to_input(
    request: InferRequest, tensors: TensorMetadata, input_schema: dict[str, Any], *, max_rows: int
) -> dict[str, Any]:
    """The prediction input of a request: its rows in the model's input form, and what the response
    needs (the request's id and the outputs it asks for). Raises InvalidInferenceRequest."""
    given = {t.name: t for t in request.inputs}
    expected = {spec.name: spec for spec in tensors.inputs}
    unknown = [name for name in given if name not in expected]
    if unknown:
        raise InvalidInferenceRequest(
            f"unknown input {_quoted(unknown[0])} (the model's inputs: {', '.join(expected)})"
        )
    missing = [name for name in expected if name not in given]
    if missing:
        raise InvalidInferenceRequest(f"missing input {_quoted(missing[0])}")
    columns: dict[str, list[Any]] = {}
    rows_count: int | None = None
    for spec in tensors.inputs:
        tensor = given[spec.name]
        count = _rows_of(tensor, spec)
        if rows_count is not None and count != rows_count:
            raise InvalidInferenceRequest(
                f"input {_quoted(spec.name)}: batch of {count}, while the other inputs have {rows_count}"
            )
        rows_count = count
        columns[spec.name] = _column(tensor, spec)
    assert rows_count is not None
    if rows_count == 0:
        raise InvalidInferenceRequest("the batch is empty (the first dimension is 0)")
    if rows_count > max_rows:
        raise InvalidInferenceRequest(f"a batch of {rows_count}, and this model takes at most {max_rows} at once")
    if keyed(tensors, input_schema):
        rows = [{name: column[i] for name, column in columns.items()} for i in range(rows_count)]
    else:
        (column,) = columns.values()
        rows = column
    outputs = _chosen_outputs(request, tensors)
    return {"rows": rows, "id": request.id, "outputs": outputs}


def keyed(tensors: TensorMetadata, input_schema: dict[str, Any]) -> bool:
    """Whether one row is `{name: tensor}` (several inputs, or an object of one) rather than the tensor."""
    if len(tensors.inputs) != 1:
        return True
    properties = input_schema.get("properties") if input_schema.get("type") == "object" else None
    return isinstance(properties, dict) and tensors.inputs[0].name in properties


def rows_of(value: Any) -> list[Any]:
    """The rows of a prediction input made by `to_input`."""
    rows: list[Any] = value["rows"]
    return rows


def _rows_of(tensor: Tensor, spec: TensorSpec) -> int:
    what = f"input {_quoted(spec.name)}"
    shape = tensor.array.shape
    expected = [-1, *spec.shape]
    fits = len(shape) == len(expected) and all(n in (-1, got) for n, got in zip(expected, shape, strict=True))
    if not fits:
        raise InvalidInferenceRequest(f"{what}: shape {list(shape)}, and the model takes {expected}")
    if not _accepts(spec.datatype, tensor.datatype):
        raise InvalidInferenceRequest(f"{what}: datatype {tensor.datatype}, and the model takes {spec.datatype}")
    if tensor.datatype in FLOATS and tensor.array.size and not np.isfinite(tensor.array).all():
        raise InvalidInferenceRequest(f"{what}: holds NaN or infinity, which JSON cannot carry")
    if spec.datatype in INTEGERS and tensor.datatype != spec.datatype and tensor.array.size:
        info = np.iinfo(DTYPES[spec.datatype])
        if tensor.array.min() < info.min or tensor.array.max() > info.max:
            raise InvalidInferenceRequest(f"{what}: a value is outside the range of {spec.datatype}")
    return int(shape[0])


def _accepts(model: str, given: str) -> bool:
    """Same datatype; any integer for an integer input; any number for a float input."""
    if model == given:
        return True
    if model in FLOATS:
        return given in FLOATS or given in INTEGERS
    return model in INTEGERS and given in INTEGERS


def _column(tensor: Tensor, spec: TensorSpec) -> list[Any]:
    """One value per row, as JSON."""
    values: list[Any] = tensor.array.tolist()
    if spec.json:
        what = f"input {_quoted(spec.name)}"
        return [_json_value(v, what) for v in values]
    return values


def _json_value(text: Any, what: str) -> Any:
    if not isinstance(text, str):
        raise InvalidInferenceRequest(f"{what}: each element is one JSON text")
    try:
        return loads(text)
    except ValueError as exc:
        raise InvalidInferenceRequest(f"{what}: an element is not JSON ({exc})") from None


def _chosen_outputs(request: InferRequest, tensors: TensorMetadata) -> list[str] | None:
    if request.outputs is None:
        return None
    names = {spec.name for spec in tensors.outputs}
    for output in request.outputs:
        if output.name not in names:
            known = ", ".join(s.name for s in tensors.outputs)
            raise InvalidInferenceRequest(f"unknown output {_quoted(output.name)} (the model's outputs: {known})")
    return list(dict.fromkeys(o.name for o in request.outputs))


# -- the response ---------------------------------------------------------------------------------


def response(value: Any, outputs: list[Any], tensors: TensorMetadata, *, model: str, version: str) -> dict[str, Any]:
    """The OIP response of a prediction: the model's output for each of its rows, one tensor per output
    (all rows stacked), data as JSON. Raises ValueError if the outputs do not form those tensors."""
    wanted = value.get("outputs")
    specs = [s for s in tensors.outputs if wanted is None or s.name in wanted]
    if wanted is not None:
        specs.sort(key=lambda s: wanted.index(s.name))
    whole = len(tensors.outputs) == 1
    tensors_out = []
    for spec in specs:
        column = [_output_value(row, spec, whole) for row in outputs]
        array = _stack(column, spec)
        tensors_out.append(
            {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape), "data": to_json_data(array)}
        )
    answer: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors_out}
    if value.get("id") is not None:
        answer["id"] = value["id"]
    return answer


def _output_value(row: Any, spec: TensorSpec, whole: bool) -> Any:
    if isinstance(row, dict) and spec.name in row:
        value = row[spec.name]
    elif whole and (spec.json or not isinstance(row, dict)):  # a model's one output is the value itself
        value = row
    else:
        raise ValueError(f"the model's output has no {spec.name!r}")
    if spec.json:
        return dumps_str(value)
    if isinstance(value, dict):  # a classifier's {class: probability}: the probabilities, in its order
        return list(value.values())
    return value


def _stack(column: list[Any], spec: TensorSpec) -> np.ndarray:
    dtype = DTYPES[spec.datatype]
    try:
        if spec.datatype == "BYTES":
            array = np.array(column, dtype=object)
            if array.dtype != object or any(isinstance(v, list) for v in array.reshape(-1)):
                raise ValueError("ragged")
            return np.vectorize(_as_text, otypes=[object])(array) if array.size else array
        return np.array(column, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        # numpy's own message repeats the shapes it found at length: ours says what is wrong.
        raise ValueError(f"output {spec.name!r} is not one {spec.datatype} tensor over the rows") from None


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else dumps_str(value)


def encode(answer: dict[str, Any], binary: set[str]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    if not binary:
        return dumps_str(answer).encode(), None
    header_outputs = []
    chunks = []
    for output in answer["outputs"]:
        if output["name"] not in binary:
            header_outputs.append(output)
            continue
        array = np.array(output["data"], dtype=DTYPES[output["datatype"]])
        raw = to_bytes(array, output["datatype"])
        chunks.append(raw)
        described = {k: v for k, v in output.items() if k != "data"}
        described["parameters"] = {**output.get("parameters", {}), "binary_data_size": len(raw)}
        header_outputs.append(described)
    header = dumps_str({**answer, "outputs": header_outputs}).encode()
    return header + b"".join(chunks), len(header)


def _quoted(name: str) -> str:
    return repr(name[:64])
