"""The service's JSON codec parses exactly like the standard library (fast path or not) and always
writes valid JSON."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zypher_ws.json_codec import MAX_DEPTH, dumps, dumps_fields_str, dumps_str, loads
from zypher_ws.records import Prediction, Status, Webhook

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)  # past 64 bits too: they must stay exact
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_loads_agrees_with_the_standard_library(value: Any) -> None:
    text = json.dumps(value)
    expected = json.loads(text)
    assert loads(text) == expected
    assert loads(text.encode()) == expected
    assert json.loads(dumps(value)) == expected  # and what it writes reads back the same


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"[123456789012345678901234567890]", [123456789012345678901234567890]),  # exact, not a float
        (b"[18446744073709551615, -9223372036854775808]", [2**64 - 1, -(2**63)]),
        (b'"\\ud800"', "\ud800"),  # a lone surrogate escape: orjson refuses it, JSON allows it
        (' {"a": 1, "a": 2} ', {"a": 2}),
    ],
)
def test_loads_edge_cases(raw: str | bytes, expected: Any) -> None:
    assert loads(raw) == expected


@pytest.mark.parametrize("raw", [b"NaN", b"[Infinity]", b"[-Infinity]", b"{", b"", b"\xff", b"[" * 5000])
def test_loads_rejects_with_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        loads(raw)


def test_dumps_writes_only_valid_json() -> None:
    out = dumps({"nan": float("nan"), "inf": [float("inf")], 3: "three", "big": 2**70})
    assert json.loads(out, parse_constant=pytest.fail) == {"nan": None, "inf": [None], "3": "three", "big": 2**70}


keyed_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=4) | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.booleans() | st.none(),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(keyed_values)
def test_dumps_writes_what_orjson_writes_with_non_string_keys(value: Any) -> None:
    # Values whose keys are all strings take orjson's faster path: the bytes must be those of the path
    # that takes any key, which the rest still take.
    assert dumps(value) == orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_loads_takes_nesting_up_to_max_depth() -> None:
    value: Any = []
    for _ in range(MAX_DEPTH - 2):
        value = [value]
    assert loads(_nested(MAX_DEPTH - 1)) == value
    assert loads(json.dumps({"k": value})) == {"k": value}  # the object is the 128th level


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 500, 1023, 1024, 100_000])
def test_loads_refuses_nesting_deeper_than_max_depth(depth: int) -> None:
    for raw in (_nested(depth), '{"a":' * depth + "1" + "}" * depth):
        with pytest.raises(ValueError, match="nested deeper than 128 levels"):
            loads(raw)
        with pytest.raises(ValueError, match="nested deeper than 128 levels"):
            loads(raw.encode())


# Strings full of brackets, quotes and backslashes: only the brackets outside strings nest.
tricky = st.text(alphabet='[]{}"\\a\u00e9', max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    levels=st.lists(st.tuples(st.booleans(), tricky, tricky), min_size=MAX_DEPTH - 2, max_size=MAX_DEPTH + 2),
    leaf=tricky,
    ascii_only=st.booleans(),
)
def test_depth_counts_only_brackets_outside_strings(
    levels: list[tuple[bool, str, str]], leaf: str, ascii_only: bool
) -> None:
    value: Any = leaf
    for is_list, a, b in levels:
        value = [a, value, b] if is_list else {a: value, a + "!": b}
    text = json.dumps(value, ensure_ascii=ascii_only)
    if len(levels) <= MAX_DEPTH:
        assert loads(text) == value
    else:
        with pytest.raises(ValueError, match="nested deeper"):
            loads(text)


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_a_record_is_written_as_its_row_would_be(input: Any, result: Any) -> None:
    # The durable stores write a record from its dataclass; it must be the document to_row() gives,
    # byte for byte (older rows and from_row expect that layout), fallback included (integers past
    # 64 bits, which orjson refuses).
    hook = Webhook("https://example.com/hook", ("start", "completed"))
    for webhook in (None, hook):
        queued = Prediction.new(input, model_name="m", model_version="1", webhook=webhook, priority=2)
        done = queued.started(batch_size=4).finished(Status.SUCCEEDED, ttl=60.0, result=result)
        for p in (queued, done):
            written = dumps_fields_str(p, p.to_row)
            assert written == dumps_str(p.to_row())
            assert Prediction.from_row(json.loads(written)) == p


def test_a_record_orjson_refuses_is_written_through_the_fallback() -> None:
    p = Prediction.new({"n": [2**70, float("nan")]}, model_name="m", model_version="1")
    written = dumps_fields_str(p, p.to_row)
    assert json.loads(written)["input"] == {"n": [2**70, None]}  # exact, and NaN as null
