"""The input validator: messages that name the field without repeating the input, and bounded work."""

from __future__ import annotations

import time
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zypher_ws.errors import InputTooLarge, InvalidInput
from zypher_ws.models import DigitsModel, MockModel
from zypher_ws.records import Prediction
from zypher_ws.validation import JSONSCHEMA_VALUES, InputValidator, is_prediction_id, max_values

DIGITS = DigitsModel.input_schema
NEWEST = "https://json-schema.org/draft/2020-12/schema"
NUMBERS = {"type": "array", "items": {"type": "number", "maximum": 16}}  # no bound on the length
OBJECT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}}},
    "required": ["x"],
    "additionalProperties": False,
}


def message(schema: dict[str, Any], value: Any) -> str:
    with pytest.raises(InvalidInput) as raised:
        InputValidator(schema)(value)
    return raised.value.message


def count(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(count(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(count(v) for v in value.values())
    return 1


@pytest.mark.parametrize(
    ("schema", "value", "expected"),
    [
        (DIGITS, [0] * 63 + [17], "input[63]: 17 is greater than the maximum of 16"),
        (DIGITS, [[0] * 8] * 7 + [[0] * 7 + [-1]], "input[7][7]: -1 is less than the minimum of 0"),
        (DIGITS, [0] * 63 + ["a"], "input[63]: expected number, got string"),
        (DIGITS, [0] * 3 + [[0] * 8] + [0] * 60, "input[3]: expected number, got array"),
        (DIGITS, [0] * 63, "input: has 63 items, fewer than the minimum of 64"),
        (DIGITS, [16] * 65, "input: has 65 items, more than the maximum of 64"),
        (DIGITS, {"a": 1}, "input: expected array, got object"),
        (OBJECT, {"tags": []}, 'input: missing the required property "x"'),
        (OBJECT, {"x": 1, "extra": 2}, 'input: has the property "extra", which the schema does not allow'),
        (OBJECT, {"x": 1, "tags": [1]}, "input.tags[0]: expected string, got integer"),
        (OBJECT, {"x": 1, "tags": ["a", "b", "c"]}, "input.tags: has 3 items, more than the maximum of 2"),
        (DIGITS, [[16] * 8] * 9, "input: has 9 items, more than the maximum of 8"),
        ({"type": "number"}, [[1]] * 20, "input: expected number, got array"),
        (
            {"type": "number", "multipleOf": 3},
            10**400,
            "input: 1" + "0" * 38 + "… is not a multiple of 3",
        ),
        (NUMBERS, [1] * 998 + ["a"], "input[998]: expected number, got string"),
        (OBJECT, {"x": True}, "input.x: expected integer, got boolean"),
        ({"enum": [1, 2, 3]}, 4, "input: is not one of [1, 2, 3]"),
        ({"type": "string", "maxLength": 3}, "abcd", "input: has 4 characters, more than the maximum of 3"),
        ({"type": "string", "pattern": "^a+$"}, "b", 'input: does not match the pattern "^a+$"'),
        ({"not": {"type": "string"}}, "s", "input: matches the schema under `not`"),
    ],
)
def test_messages_name_the_field_and_the_rule(schema: dict[str, Any], value: Any, expected: str) -> None:
    assert message(schema, value) == expected


@pytest.mark.parametrize(
    ("schema", "value", "start"),
    [
        (DIGITS, [16] * 150_000, "input: too large: it has 150000 items, and no input the model's schema accepts"),
        (DIGITS, [0, 0, 0, [17] * 150_000] + [0] * 60, "input[3]: too large: it has 150000 items, and no input"),
        (DIGITS, [[16] * 8] * 19, "input: too large: no input the model's schema accepts holds more than 73 values"),
        (DIGITS, "x" * 600_000, "input: expected array, got string"),
        (NUMBERS, [0] * 3 + [17] + [0] * 150_000, "input[3]: 17 is greater than the maximum of 16"),
        ({"type": "string", "maxLength": 3}, "x" * 600_000, "input: has 600000 characters"),
        ({"additionalProperties": {"type": "number"}}, {"k" * 10_000: "v" * 100_000}, 'input["kkkkk'),
        ({"type": "array", "items": {"enum": [1]}}, [10**4000], "input[0]: is not one of [1]"),
    ],
)
def test_messages_never_repeat_a_large_input(schema: dict[str, Any], value: Any, start: str) -> None:
    text = message(schema, value)
    assert text.startswith(start), text
    assert len(text) < 300, text


def test_a_large_input_against_a_oneof_without_bounds_gets_the_fast_validators_word() -> None:
    either = {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "array", "items": {"type": "string"}}]}
    assert message(either, [1, "a"]) == "input[1]: expected number, got string"  # jsonschema: the closest branch
    big = [1] * JSONSCHEMA_VALUES + ["a"]
    assert message(either, big) == "input: does not match exactly one of the `oneOf` alternatives"


def test_without_a_fast_path_inputs_past_the_jsonschema_bound_are_refused_as_too_large() -> None:
    validate = InputValidator({"$schema": NEWEST, "type": "array", "items": {"type": "number"}})
    validate([1.5] * (JSONSCHEMA_VALUES - 1))
    with pytest.raises(InputTooLarge) as raised:
        validate([1.5] * JSONSCHEMA_VALUES)
    assert raised.value.status == 413 and raised.value.code == "input_too_large"
    assert raised.value.message == (
        "input: too large: it has 1000 items, and inputs to this model are checked up to 1000 values"
    )
    assert message({"$schema": NEWEST, "prefixItems": [{"type": "number"}]}, ["a"]) == (
        "input[0]: expected number, got string"
    )


def test_a_large_invalid_input_costs_next_to_nothing() -> None:
    validate = InputValidator(DIGITS)
    for value in ([17] * 150_000, [16] * 150_000, [[17] * 8] * 150_000, [0, 0, 0, [17] * 150_000] + [0] * 60):
        started = time.perf_counter()
        with pytest.raises(InvalidInput):
            validate(value)
        assert time.perf_counter() - started < 0.05  # 4 to 9 s before it was bounded


# -- the bound a schema sets on the size of an input ---------------------------------------------------

PIXEL = {"type": "number", "minimum": 0, "maximum": 16}
BOUNDED: list[tuple[dict[str, Any], int, Any]] = [  # schema, its bound, an input that reaches it
    (DIGITS, 73, [[16] * 8] * 8),
    ({"type": "array", "maxItems": 3, "items": {"type": "array", "maxItems": 2, "items": PIXEL}}, 10, [[1, 2]] * 3),
    ({"type": "array", "maxItems": 4.0, "items": {"type": ["number", "null"]}}, 5, [1, None, 2, None]),
    (
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "array",
            "items": [PIXEL, {"type": "array", "maxItems": 2, "items": PIXEL}],
            "additionalItems": False,
        },
        5,
        [1, [2, 3]],
    ),
    ({"$schema": NEWEST, "type": "array", "prefixItems": [PIXEL, {"type": "string"}], "items": False}, 3, [1, "a"]),
    (
        {"$schema": "http://json-schema.org/draft-07/schema#", "items": [PIXEL, PIXEL], "maxItems": 2, "type": "array"},
        3,
        [1, 2],
    ),
    (OBJECT, 5, {"x": 1, "tags": ["a", "b"]}),
    ({"type": "object", "maxProperties": 2, "additionalProperties": {"type": "string"}}, 3, {"a": "1", "b": "2"}),
    ({"enum": [1, [1, 2, 3]]}, 4, [1, 2, 3]),
    ({"const": {"a": [1, 2]}}, 4, {"a": [1, 2]}),
    ({"definitions": {"px": PIXEL}, "type": "array", "maxItems": 4, "items": {"$ref": "#/definitions/px"}}, 5, [1] * 4),
    # Up to draft 7 the siblings of $ref are ignored, so maxItems 1 here binds nothing.
    (
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "definitions": {"row": {"type": "array", "maxItems": 5, "items": PIXEL}},
            "$ref": "#/definitions/row",
            "maxItems": 1,
        },
        6,
        [1] * 5,
    ),
    (
        {"allOf": [{"type": "array", "maxItems": 9, "items": PIXEL}, {"type": "array", "maxItems": 2, "items": PIXEL}]},
        3,
        [1, 2],
    ),
    ({"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 2, "items": PIXEL}]}, 3, [1, 2]),
]
UNBOUNDED: list[dict[str, Any]] = [
    MockModel.input_schema,
    NUMBERS,
    {"type": "object"},
    {"type": "array", "maxItems": 3},  # items of any size
    {
        "definitions": {"tree": {"type": "array", "maxItems": 2, "items": {"$ref": "#/definitions/tree"}}},
        "$ref": "#/definitions/tree",
    },
    {"$ref": "https://example.com/elsewhere.json"},
    {"type": "array", "maxItems": 2, "items": {"$id": "https://example.com/x", "$ref": "#/definitions/px"}},
]


@pytest.mark.parametrize(("schema", "bound", "largest"), BOUNDED)
def test_max_values_is_reached_by_a_valid_input(schema: dict[str, Any], bound: int, largest: Any) -> None:
    assert max_values(schema) == bound
    jsonschema.validators.validator_for(schema)(schema).validate(largest)
    assert count(largest) == bound
    InputValidator(schema)(largest)


@pytest.mark.parametrize("schema", UNBOUNDED)
def test_max_values_is_none_where_the_schema_sets_no_bound(schema: dict[str, Any]) -> None:
    assert max_values(schema) is None


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 20) | st.sampled_from(["a", "1", "x"]),
    lambda children: st.lists(children, max_size=10) | st.dictionaries(st.sampled_from(["x", "tags", "a"]), children),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_no_valid_input_is_over_the_bound(value: Any) -> None:
    for schema, bound, _ in BOUNDED:
        if jsonschema.validators.validator_for(schema)(schema).is_valid(value):
            assert count(value) <= bound
            InputValidator(schema)(value)


def test_every_id_a_prediction_gets_is_a_prediction_id() -> None:
    ids = {Prediction.new(None, model_name="m", model_version="1").prediction_id for _ in range(100)}
    assert len(ids) == 100 and all(is_prediction_id(pid) for pid in ids)
    assert not any(is_prediction_id(pid) for pid in ("F" * 32, "f" * 31, "f" * 33, "\ud800" * 32, "f" * 31 + "\n"))
