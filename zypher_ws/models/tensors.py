"""Tensor metadata of a model, in the Open Inference Protocol's terms, and JSON Schemas for tensors.

A `TensorSpec` describes one prediction's tensor: its shape has no batch axis (`-1` marks a dimension
of any size). A protocol that sends a batch as one tensor puts a `-1` batch axis in front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# The Open Inference Protocol's tensor datatypes.
DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
)  # fmt: skip

# The range of each integer datatype, for the JSON Schema of its values.
_INTEGER_RANGES = {
    "UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1), "UINT32": (0, 2**32 - 1), "UINT64": (0, 2**64 - 1),
    "INT8": (-(2**7), 2**7 - 1), "INT16": (-(2**15), 2**15 - 1), "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    """One of DATATYPES."""
    shape: tuple[int, ...]
    """One prediction's shape, without the batch axis; -1 for a dimension of any size."""
    json: bool = field(default=False, compare=False)
    """A BYTES tensor holding the JSON text of a value no tensor describes (a schema of any JSON)."""

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor {self.name}: datatype {self.datatype!r} is not one of {', '.join(DATATYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class TensorMetadata:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@runtime_checkable
class DescribesTensors(Protocol):
    """What a model may add to the contract: its tensors. The runtimes' models have it; others need not."""

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...


def tensor_metadata(model: object) -> TensorMetadata:
    """The model's own tensors if it describes them, else tensors derived from its JSON Schemas.

    Derived: an object schema whose properties are all tensors gives one tensor per property; a
    number, integer, boolean or string (or nested arrays of one) gives one tensor named `input`
    (`output`); anything else is one BYTES tensor of that name, holding JSON.
    """
    if isinstance(model, DescribesTensors):
        return TensorMetadata(tuple(model.inputs), tuple(model.outputs))
    return TensorMetadata(
        derive_tensors(getattr(model, "input_schema", {}), "input"),
        derive_tensors(getattr(model, "output_schema", {}), "output"),
    )


def derive_tensors(schema: dict[str, Any], name: str) -> tuple[TensorSpec, ...]:
    properties = schema.get("properties") if schema.get("type") == "object" else None
    if isinstance(properties, dict) and properties:
        parts = {key: _tensor_of(sub) for key, sub in properties.items()}
        if all(part is not None for part in parts.values()):
            return tuple(TensorSpec(key, *part) for key, part in parts.items() if part is not None)
    whole = _tensor_of(schema)
    return (TensorSpec(name, *whole),) if whole is not None else (TensorSpec(name, "BYTES", (), json=True),)


_SCALARS = {"number": "FP64", "integer": "INT64", "boolean": "BOOL", "string": "BYTES"}


def _tensor_of(schema: Any) -> tuple[str, tuple[int, ...]] | None:
    if not isinstance(schema, dict):
        return None
    for alternatives in ("oneOf", "anyOf"):
        if isinstance(schema.get(alternatives), list):
            return next((t for t in map(_tensor_of, schema[alternatives]) if t is not None), None)
    kind = schema.get("type")
    if isinstance(kind, str) and kind in _SCALARS:
        return _SCALARS[kind], ()
    if kind == "array":
        inner = _tensor_of(schema.get("items"))
        if inner is None:
            return None
        size = schema.get("maxItems")
        fixed = size if isinstance(size, int) and schema.get("minItems") == size else -1
        return inner[0], (fixed, *inner[1])
    return None


def tensor_schema(datatype: str, shape: Sequence[int], description: str | None = None) -> dict[str, Any]:
    """The JSON Schema of one tensor of this datatype and shape (-1: any size), as nested arrays."""
    schema = _value_schema(datatype)
    for size in reversed(shape):
        schema = {"type": "array", "items": schema}
        if size >= 0:
            schema["minItems"] = schema["maxItems"] = size
    if description:
        schema = {**schema, "description": description}
    return schema


def _value_schema(datatype: str) -> dict[str, Any]:
    if datatype == "BOOL":
        return {"type": "boolean"}
    if datatype == "BYTES":
        return {"type": "string"}
    if datatype in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[datatype]
        return {"type": "integer", "minimum": low, "maximum": high}
    return {"type": "number"}
