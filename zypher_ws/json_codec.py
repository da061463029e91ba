"""JSON in and out of the service, in one place.

Out: orjson (several times faster than the standard library on the records every response and push
carries); what orjson refuses, integers past 64 bits, goes through the standard library instead.
NaN and infinities become null, so every answer is valid JSON.
In: orjson too, except where it would differ from the standard library: a run of 19 or more digits
(orjson would turn integers past 64 bits into floats; the standard library keeps them exact) or anything
orjson rejects (the standard library then accepts it or words the error). NaN/Infinity and nesting
too deep for the parser are malformed JSON like any other.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return json.dumps(_finite(value), separators=(",", ":"), allow_nan=False).encode()


def dumps_str(value: Any) -> str:
    return dumps(value).decode()


def loads(data: str | bytes) -> Any:
    """Parse one JSON document. Raises ValueError (UnicodeDecodeError included) for anything malformed."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    if _LONG_RUN not in raw.translate(_DIGITS_ONLY):
        try:
            return orjson.loads(raw)  # many times faster on the long arrays of numbers models take
        except orjson.JSONDecodeError:
            pass  # the standard library has the last word: it accepts a lone surrogate, and words errors
    try:
        return _DECODER.decode(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # json.loads would build one per call
# A run of 19 digits, found by mapping digits to "0" and the rest to " " (a regex is ten times slower).
# Up to 18 digits every integer fits in 64 bits, so orjson keeps it exact.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19


def _finite(value: Any) -> Any:
    """NaN and infinities as null, the way orjson writes them, for the standard-library path."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
