"""Tensors of the Open Inference Protocol: datatypes, shapes, and their data as JSON or as bytes.

JSON data is flat or nested, row-major. Binary data (Triton's binary tensor data extension) is the
tensor's elements little-endian, back to back; a BYTES element is a 4-byte little-endian length and
then that many bytes. Every size is checked against the shape before anything is read, so a wrong
size or a truncated body is a 400 and nothing is read past the bytes given.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInferenceRequest
from ..models.tensors import DATATYPES

# numpy's dtype of each datatype, little-endian as the binary extension sends it (BYTES: Python str).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
INTEGERS = frozenset(("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"))
FLOATS = frozenset(("FP16", "FP32", "FP64"))
MAX_DIMS = 32
_LENGTH = struct.Struct("<I")


def check_datatype(datatype: Any, what: str) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        if datatype == "BF16":
            raise InvalidInferenceRequest(f"{what}: datatype BF16 is not supported here")
        raise InvalidInferenceRequest(f"{what}: datatype must be one of {', '.join(DATATYPES)}, not {_brief(datatype)}")
    return datatype


def check_shape(shape: Any, what: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise InvalidInferenceRequest(f"{what}: shape must be a list of at most {MAX_DIMS} sizes")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise InvalidInferenceRequest(f"{what}: shape must hold whole numbers of at least 0, not {_brief(shape)}")
    return tuple(shape)


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


# -- decoding -----------------------------------------------------------------------------------------


def from_json(datatype: str, shape: tuple[int, ...], data: Any, what: str) -> np.ndarray:
    """The tensor whose `data` is a JSON array (flat or nested); each value must be of the datatype."""
    count = element_count(shape)
    values = _flatten(data, count, what)
    if len(values) != count:
        raise InvalidInferenceRequest(
            f"{what}: shape {list(shape)} needs {count} values, data has {_at_least(values, count)}"
        )
    _check_values(values, datatype, what)
    try:
        array = np.array(values, dtype=DTYPES[datatype])
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidInferenceRequest(f"{what}: values are not {datatype} ({exc})") from None
    return array.reshape(shape)


def from_bytes(datatype: str, shape: tuple[int, ...], raw: memoryview, what: str) -> np.ndarray:
    """The tensor whose elements are `raw`, exactly: a size that does not fit the shape is refused."""
    count = element_count(shape)
    if datatype == "BYTES":
        return _bytes_elements(raw, count, what).reshape(shape)
    dtype = DTYPES[datatype]
    needed = count * dtype.itemsize
    if len(raw) != needed:
        raise InvalidInferenceRequest(
            f"{what}: binary_data_size is {len(raw)} bytes, but shape {list(shape)} of {datatype} takes {needed}"
        )
    if datatype == "BOOL":
        flags: np.ndarray = np.frombuffer(raw, dtype=np.uint8) != 0
        return flags.reshape(shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _bytes_elements(raw: memoryview, count: int, what: str) -> np.ndarray:
    elements = np.empty(count, dtype=object)
    offset, end = 0, len(raw)
    for i in range(count):
        if end - offset < _LENGTH.size:
            raise InvalidInferenceRequest(f"{what}: binary data ends before BYTES element {i} of {count}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if length > end - offset:
            raise InvalidInferenceRequest(
                f"{what}: BYTES element {i} says {length} bytes, and only {end - offset} are left"
            )
        elements[i] = _text(bytes(raw[offset : offset + length]), what)
        offset += length
    if offset != end:
        raise InvalidInferenceRequest(f"{what}: {end - offset} bytes left over after its {count} BYTES elements")
    return elements


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInferenceRequest(
            f"{what}: a BYTES element is not UTF-8 text (inputs are held as JSON, which carries text)"
        ) from None


def _flatten(data: Any, limit: int, what: str) -> list[Any]:
    """The values of a flat or nested array in row-major order; stops once past `limit` of them."""
    if not isinstance(data, list):
        raise InvalidInferenceRequest(f"{what}: data must be an array, not {_type(data)}")
    if not any(isinstance(v, list) for v in data):
        return data
    values: list[Any] = []
    stack = [iter(data)]
    while stack and len(values) <= limit:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            values.append(value)
            if len(values) > limit:
                break
        else:
            stack.pop()
    return values


def _at_least(values: list[Any], count: int) -> str:
    return f"more than {count}" if len(values) > count else str(len(values))


def _check_values(values: list[Any], datatype: str, what: str) -> None:
    if datatype == "BOOL":
        ok = all(v is True or v is False for v in values)
        kind = "true or false"
    elif datatype == "BYTES":
        ok = all(isinstance(v, str) for v in values)
        kind = "strings"
    elif datatype in INTEGERS:
        ok = all(type(v) is int for v in values)
        kind = "whole numbers"
    else:
        ok = all(type(v) is float or type(v) is int for v in values)
        kind = "numbers"
    if not ok:
        raise InvalidInferenceRequest(f"{what}: {datatype} data must be {kind}")
    if datatype in INTEGERS and values:
        info = np.iinfo(DTYPES[datatype])
        low, high = min(values), max(values)
        if low < info.min or high > info.max:
            raise InvalidInferenceRequest(f"{what}: a value is outside the range of {datatype}")


# -- encoding -----------------------------------------------------------------------------------------


def to_json_data(array: np.ndarray) -> list[Any]:
    """The tensor's values, flat and row-major, as JSON numbers, booleans or strings."""
    flat: list[Any] = array.reshape(-1).tolist()
    return flat


def to_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in array.reshape(-1):
            encoded = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(_LENGTH.pack(len(encoded)))
            parts.append(encoded)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def _type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"
