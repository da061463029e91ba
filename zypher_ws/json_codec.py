"""JSON in and out of the service, in one place.

Out: orjson (several times faster than the standard library on the records every response and push
carries); what orjson refuses, integers past 64 bits, goes through the standard library instead.
NaN and infinities become null, so every answer is valid JSON.
In: orjson too, except where it would differ from the standard library: a run of 19 or more digits
(orjson would turn integers past 64 bits into floats; the standard library keeps them exact) or anything
orjson rejects (the standard library then accepts it or words the error). NaN/Infinity and nesting
deeper than MAX_DEPTH are malformed JSON like any other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np  # at import: only the server imports this module, and its models load numpy anyway
import orjson

MAX_DEPTH = 128
"""Deepest nesting of arrays and objects a document may have. The parsers would take 1,023 levels, but
what handles the value next recurses (schema validators, the encoders, a model) and would run out of
stack; RFC 8259 lets a parser set this limit."""

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    try:
        # Keys that are all strings (nearly every value) first: OPT_NON_STR_KEYS writes the same bytes
        # for them, on a path that costs 70% more for a record's dict.
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return json.dumps(_finite(value), separators=(",", ":"), allow_nan=False).encode()


def dumps_str(value: Any) -> str:
    return dumps(value).decode()


def dumps_fields_str(value: Any, as_dict: Callable[[], Any]) -> str:
    """A dataclass as `dumps_str(as_dict())` writes it, without building the dict: orjson writes a
    dataclass's fields itself, in order (a durable store writes every record on every state change).
    `as_dict` is the fallback for what orjson refuses, which goes through the standard library."""
    try:
        return orjson.dumps(value).decode()  # string keys first, as dumps does
    except orjson.JSONEncodeError:
        pass
    try:
        return orjson.dumps(value, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return dumps_str(as_dict())


def loads(data: str | bytes) -> Any:
    """Parse one JSON document. Raises ValueError (UnicodeDecodeError included) for anything malformed,
    and for nesting deeper than MAX_DEPTH."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    value = _parse(data, raw)
    if _deeper_than(raw, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return value


def _parse(data: str | bytes, raw: bytes) -> Any:
    if _LONG_RUN not in raw.translate(_DIGITS_ONLY):
        try:
            return orjson.loads(raw)  # many times faster on the long arrays of numbers models take
        except orjson.JSONDecodeError:
            pass  # the standard library has the last word: it accepts a lone surrogate, and words errors
    try:
        return _DECODER.decode(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None


def _deeper_than(raw: bytes, limit: int) -> bool:
    """Whether the valid JSON document `raw` nests arrays and objects deeper than `limit`.

    A few passes over the bytes in C and numpy, ~10 ms per MiB at worst: less than parsing the same
    brackets, and several times less than walking the parsed value.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the common case: brackets in strings included, there are too few to be that deep
    # In valid JSON every backslash begins an escape, so once each `\\` and then each `\"` is gone,
    # every quote left opens or closes a string, and a bracket after an odd number of quotes is in one.
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = np.frombuffer(unescaped.translate(None, _NOT_MARKS), dtype=np.uint8)  # brackets and quotes
    in_string = np.cumsum(marks == ord('"'), dtype=np.int32) & 1
    depth = np.cumsum(np.where(in_string, 0, _STEPS[marks]), dtype=np.int32)
    return bool(depth.size) and int(depth.max()) > limit


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # json.loads would build one per call
# A run of 19 digits, found by mapping digits to "0" and the rest to " " (a regex is ten times slower).
# Up to 18 digits every integer fits in 64 bits, so orjson keeps it exact.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19
_NOT_MARKS = bytes(range(256)).translate(None, b'[]{}"')
_STEPS = np.zeros(256, dtype=np.int8)  # by byte: one level in, one level out
_STEPS[list(b"[{")], _STEPS[list(b"]}")] = 1, -1


def _finite(value: Any) -> Any:
    """NaN and infinities as null, the way orjson writes them, for the standard-library path."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
