"""Validating model inputs against the model's JSON Schema: fast when valid, precise when not, bounded always.

jsonschema is the reference (every draft, and errors that say where) but costs about 10 µs per value of
the input, and several times that to describe an invalid one, since it builds every error of every
`oneOf` branch. fastjsonschema compiles the schema to Python and is ~50x faster; it only knows drafts 4,
6 and 7, so it is used as a fast path only for schemas that need nothing newer.

This runs on the event loop, so every step is bounded (the parser has already bounded the nesting):
- fastjsonschema stops at the first error, having read no more than the schema allows.
- jsonschema, to say precisely what is wrong, is given an input only if it holds at most twice as many
  values as the schema can accept (`max_values`: 73 for digits), and at most JSONSCHEMA_VALUES. A
  larger one is refused as too large after counting that many; where the schema sets no bound, it is
  described from fastjsonschema's first error or, without a fast path, refused as too large to check.
- Messages name the field and the rule and never repeat the input: jsonschema's own carry its repr,
  which for a long array is longer than the request.
The other request fields that reach a store are checked here too.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import unquote

import fastjsonschema
import jsonschema

from .errors import InputTooLarge, InvalidHeader, InvalidInput

JSONSCHEMA_VALUES = 1_000
"""The largest input, in JSON values, that jsonschema examines: ~10 ms if valid, ~40 ms to describe."""

# Keywords of drafts 2019-09 and 2020-12 that fastjsonschema would silently ignore.
NEWER_KEYWORDS = {
    "prefixItems", "unevaluatedItems", "unevaluatedProperties", "dependentRequired", "dependentSchemas",
    "$defs", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "minContains",
    "maxContains", "$vocabulary",
}  # fmt: skip
OLD_DRAFTS = ("draft-04", "draft-06", "draft-07")

Path = Sequence[str | int]


class InputValidator:
    def __init__(self, schema: dict[str, Any]) -> None:
        self._reference = jsonschema.validators.validator_for(schema)(schema)
        self._fast = _compile_fast(schema)
        self.max_values = max_values(schema)
        """No input the schema accepts holds more JSON values than this (None: the schema sets no bound)."""
        # The most values jsonschema is given to describe: a little over the schema's bound (a row too
        # long) still gets a precise message; far over, the input is refused as too large.
        bound = JSONSCHEMA_VALUES if self.max_values is None else max(2 * self.max_values, 64)
        self._examined = min(bound, JSONSCHEMA_VALUES)

    def __call__(self, value: Any) -> None:
        """Raise InvalidInput naming the offending field, or InputTooLarge."""
        fast_error = None
        if self._fast is not None:
            try:
                self._fast(value)
                return
            except fastjsonschema.JsonSchemaValueException as exc:
                fast_error = exc
            except ArithmeticError:  # its multipleOf divides huge integers as floats: jsonschema decides
                pass
        overflow = _overflow(value, self._examined)
        if overflow is None:  # small enough for jsonschema to say precisely what is wrong
            error = _most_relevant(self._reference.iter_errors(value))
            if error is not None:
                what = _describe(error.validator, error.validator_value, error.instance, error.schema)
                raise InvalidInput(f"{_path(error.absolute_path)}: {what}")
            return
        if self.max_values is not None and self.max_values <= JSONSCHEMA_VALUES:
            bound = f"no input the model's schema accepts holds more than {self.max_values} values"
            raise InvalidInput(_too_large(*overflow, self._examined, bound))
        if fast_error is not None:
            raise InvalidInput(_fast_message(fast_error))
        bound = f"inputs to this model are checked up to {JSONSCHEMA_VALUES} values"
        raise InputTooLarge(_too_large(*overflow, self._examined, bound))


def _too_large(path: Path, container: list[Any] | dict[str, Any], limit: int, bound: str) -> str:
    """Blames the array or object where the count passed `limit` if it is that large alone; else the input."""
    if len(container) < limit:
        return f"input: too large: {bound}"
    size = f"{len(container)} items" if isinstance(container, list) else f"{len(container)} properties"
    return f"{_path(path)}: too large: it has {size}, and {bound}"


def _compile_fast(schema: dict[str, Any]) -> Callable[[Any], Any] | None:
    dialect = str(schema.get("$schema", ""))
    if dialect and not any(draft in dialect for draft in OLD_DRAFTS):
        return None
    if _uses(schema, NEWER_KEYWORDS):
        return None
    try:
        compiled: Callable[[Any], Any] = fastjsonschema.compile(schema)
    except Exception:  # a schema it cannot compile: the reference validator alone
        return None
    return compiled


def _uses(node: Any, keywords: set[str]) -> bool:
    if isinstance(node, dict):
        return any(key in keywords for key in node) or any(_uses(v, keywords) for v in node.values())
    if isinstance(node, list):
        return any(_uses(v, keywords) for v in node)
    return False


def _most_relevant(errors: Iterable[jsonschema.ValidationError]) -> jsonschema.ValidationError | None:
    """Within oneOf/anyOf, report the branch the input came closest to (fewest errors), not the first."""
    error = next(iter(errors), None)
    while error is not None and error.context:
        branches: dict[Any, list[jsonschema.ValidationError]] = defaultdict(list)
        for sub in error.context:
            branches[sub.relative_schema_path[0]].append(sub)
        closest = min(branches.values(), key=len)
        error = min(closest, key=lambda e: len(e.context))  # plain errors before nested alternatives
    return error


# -- size ---------------------------------------------------------------------------------------------


def _overflow(value: Any, limit: int) -> tuple[Path, list[Any] | dict[str, Any]] | None:
    """Where, in document order, an input holding more than `limit` JSON values (itself and everything
    inside it) passes that count, and the array or object there; None if it holds no more.

    It stops there, having looked at no more than `limit` values.
    """
    if not isinstance(value, list | dict):
        return None
    count = 1
    stack: list[tuple[Any, Path]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        count += len(node)
        if count > limit:
            return path, node
        items = node.items() if isinstance(node, dict) else enumerate(node)
        inner = [(v, (*path, k)) for k, v in items if isinstance(v, list | dict)]
        stack.extend(reversed(inner))
    return None


def max_values(schema: Any) -> int | None:
    """The most JSON values (itself and everything inside it) that an input valid under `schema` can
    hold, or None if the schema sets no bound.

    Keywords it does not read only ever narrow what is valid, so skipping them leaves the bound loose
    but sound: no input the schema accepts is over it. References are followed within the document.
    """
    if _nested_ids(schema):
        return None  # a nested $id moves what "#/..." refers to below it: not worth following
    return _Bounds(schema).of(schema, frozenset())


class _Bounds:
    def __init__(self, root: Any) -> None:
        self.root = root

    def of(self, schema: Any, refs: frozenset[str]) -> int | None:
        """`refs`: the references followed to get here; one met again is a recursive schema (no bound)."""
        if schema is False:
            return 0
        if not isinstance(schema, dict):
            return None  # true, or not a schema
        ref = schema.get("$ref")
        if isinstance(ref, str):
            # Siblings of $ref are ignored up to draft 7 and apply after it: the target's bound holds for both.
            target = None if ref in refs else _resolve(self.root, ref)
            return None if target is None else self.of(target, refs | {ref})
        bounds = [self._own(schema, refs)]
        all_of = schema.get("allOf")
        if isinstance(all_of, list):
            bounds += [self.of(s, refs) for s in all_of]
        for keyword in ("oneOf", "anyOf"):
            branches = schema.get(keyword)
            if isinstance(branches, list) and branches:
                bounds.append(_largest([self.of(s, refs) for s in branches]))
        known = [b for b in bounds if b is not None]
        return min(known) if known else None

    def _own(self, schema: dict[str, Any], refs: frozenset[str]) -> int | None:
        if "const" in schema:
            return _count(schema["const"])
        if isinstance(schema.get("enum"), list):
            return max((_count(v) for v in schema["enum"]), default=0)
        types = schema.get("type", ["null", "boolean", "number", "string", "array", "object"])
        bounds: list[int | None] = []
        for name in [types] if isinstance(types, str) else types if isinstance(types, list) else []:
            if name == "array":
                bounds.append(self._array(schema, refs))
            elif name == "object":
                bounds.append(self._object(schema, refs))
            else:
                bounds.append(1 if name in ("null", "boolean", "integer", "number", "string") else None)
        return _largest(bounds) if bounds else None

    def _array(self, schema: dict[str, Any], refs: frozenset[str]) -> int | None:
        items = schema.get("items")
        if isinstance(items, list):  # up to draft 2019-09: `items` for the first ones, `additionalItems` after
            rest = schema.get("additionalItems")
            first = [self.of(s, refs) for s in items]
        else:  # 2020-12's prefixItems, which its `items` then skips and older drafts ignore: either may apply
            rest = items
            prefix = schema.get("prefixItems")
            first = [_largest([self.of(s, refs), self._rest(rest, refs)]) for s in prefix or []]
        most = _limit(schema.get("maxItems"))
        if rest is False:
            most = len(first) if most is None else min(most, len(first))
        if most is None:
            return None
        bounds = first[:most]
        if most > len(first):
            each = self._rest(rest, refs)
            bounds.append(None if each is None else (most - len(first)) * each)
        total = _sum(bounds)
        return None if total is None else 1 + total

    def _rest(self, schema: Any, refs: frozenset[str]) -> int | None:
        return None if schema is None else self.of(schema, refs)

    def _object(self, schema: dict[str, Any], refs: frozenset[str]) -> int | None:
        properties = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        extra = schema.get("additionalProperties")
        if not isinstance(properties, dict) or not isinstance(patterns, dict):
            return None
        most = _limit(schema.get("maxProperties"))
        if extra is False and not patterns:  # only the listed properties, each at most once
            each = [self.of(s, refs) for s in properties.values()]
            if None in each:
                return None
            biggest = sorted((b for b in each if b is not None), reverse=True)
            return 1 + sum(biggest[:most] if most is not None else biggest)
        if most is None:
            return None
        values = [self.of(s, refs) for s in (*properties.values(), *patterns.values())]
        largest = _largest([*values, self._rest(extra, refs)])
        return None if largest is None else 1 + most * largest


def _largest(bounds: list[int | None]) -> int | None:
    known = [b for b in bounds if b is not None]
    return max(known, default=0) if len(known) == len(bounds) else None


def _sum(bounds: list[int | None]) -> int | None:
    known = [b for b in bounds if b is not None]
    return sum(known) if len(known) == len(bounds) else None


def _limit(value: Any) -> int | None:
    """maxItems or maxProperties as an int (JSON Schema lets it be 64.0), None if absent."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 and value == int(value):
        return int(value)
    return None


def _count(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(_count(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(_count(v) for v in value.values())
    return 1


def _resolve(root: Any, ref: str) -> Any:
    """The target of a "#/..." JSON Pointer reference in `root`; None for any other kind."""
    if not ref.startswith("#") or (len(ref) > 1 and not ref.startswith("#/")):
        return None
    node = root
    for token in ref[2:].split("/") if len(ref) > 1 else []:
        token = unquote(token).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def _nested_ids(schema: Any, top: bool = True) -> bool:
    if isinstance(schema, dict):
        if not top and (isinstance(schema.get("$id"), str) or isinstance(schema.get("id"), str)):
            return True
        return any(_nested_ids(v, False) for v in schema.values())
    if isinstance(schema, list):
        return any(_nested_ids(v, False) for v in schema)
    return False


# -- messages -----------------------------------------------------------------------------------------

SHORT = 40  # longest piece of the input (a number, a string, a key) that a message repeats
LONGEST_PATH = 200

_TYPES: list[tuple[type | tuple[type, ...], str]] = [
    (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"),
]  # fmt: skip
_COMPARISONS = {
    "minimum": "is less than the minimum of",
    "maximum": "is greater than the maximum of",
    "exclusiveMinimum": "is not greater than",
    "exclusiveMaximum": "is not less than",
    "multipleOf": "is not a multiple of",
}
_LENGTHS = {
    "minItems": ("items", "fewer", "minimum"),
    "maxItems": ("items", "more", "maximum"),
    "minLength": ("characters", "fewer", "minimum"),
    "maxLength": ("characters", "more", "maximum"),
    "minProperties": ("properties", "fewer", "minimum"),
    "maxProperties": ("properties", "more", "maximum"),
}
_FIXED = {
    None: "is not allowed here",  # a `false` schema
    "uniqueItems": "has repeated items",
    "contains": "has no item that matches `contains`",
    "not": "matches the schema under `not`",
    "oneOf": "does not match exactly one of the `oneOf` alternatives",
    "anyOf": "matches none of the `anyOf` alternatives",
}


def _describe(rule: str | None, expected: Any, instance: Any, schema: Any) -> str:
    """What is wrong, from the rule that failed; of the input it repeats at most a short scalar or key."""
    if rule == "type":
        names = expected if isinstance(expected, list) else [expected]
        return f"expected {' or '.join(map(str, names))}, got {_type_name(instance)}"
    if rule in _COMPARISONS and not isinstance(expected, bool):  # draft 4's exclusiveMaximum is a flag
        return f"{_brief(instance)} {_COMPARISONS[rule]} {_brief(expected)}"
    if rule in _LENGTHS and isinstance(instance, list | dict | str):
        unit, side, bound = _LENGTHS[rule]
        return f"has {len(instance)} {unit}, {side} than the {bound} of {_brief(expected)}"
    if rule == "required" and isinstance(instance, dict) and isinstance(expected, list):
        missing = [name for name in expected if name not in instance]
        if missing:
            return f"missing the required property {_brief(missing[0])}"
    if rule == "additionalProperties" and isinstance(instance, dict) and isinstance(schema, dict):
        extra = next(iter(_unexpected(instance, schema)), None)
        if extra is not None:
            return f"has the property {_brief(extra)}, which the schema does not allow"
    if rule == "enum":
        return f"is not one of {_brief(expected, SHORT * 2)}"
    if rule == "const":
        return f"is not {_brief(expected, SHORT * 2)}"
    if rule == "pattern":
        return f"does not match the pattern {_brief(expected, SHORT * 2)}"
    if rule == "format":
        return f"is not a valid {_brief(expected)}"
    if rule in _FIXED:
        return _FIXED[rule]
    return f"fails the schema's `{rule}`"


def _unexpected(instance: dict[str, Any], schema: dict[str, Any]) -> Iterable[str]:
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return (k for k in instance if k not in properties and not any(re.search(p, k) for p in patterns))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return next((name for kind, name in _TYPES if isinstance(value, kind)), type(value).__name__)


def _brief(value: Any, longest: int = SHORT) -> str:
    """A value as a message shows it: as JSON if short, cut short if not, an array or object by its type."""
    if isinstance(value, list | dict) and longest <= SHORT:
        return f"an {_type_name(value)}"
    text = json.dumps(value[: longest + 1] if isinstance(value, str) else value)
    return text if len(text) <= longest else text[: longest - 1] + "…"


def _path(parts: Iterable[Any]) -> str:
    text = "input" + "".join(
        f"[{p}]" if isinstance(p, int) else f".{p}" if len(p) <= SHORT and p.isprintable() else f"[{_brief(p)}]"
        for p in parts
    )
    return _clip_path(text)


def _clip_path(text: str) -> str:
    if len(text) <= LONGEST_PATH:
        return text
    half = LONGEST_PATH // 2
    return f"{text[:half]}…{text[-half:]}"


def _fast_message(exc: fastjsonschema.JsonSchemaValueException) -> str:
    where = "input" + (exc.name or "data")[len("data") :]  # fastjsonschema calls the input `data`
    return f"{_clip_path(where)}: {_describe(exc.rule, exc.rule_definition, exc.value, exc.definition)}"


# -- the other request fields that reach a store ------------------------------------------------------

_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_PREDICTION_ID = re.compile("[0-9a-f]{32}")  # as Prediction.new makes them


def is_prediction_id(value: str) -> bool:
    """Whether `value` could name a prediction. Any other string is unknown without asking a store, which
    might not even encode it (a lone surrogate from a WebSocket message)."""
    return _PREDICTION_ID.fullmatch(value) is not None


def idempotency_key(raw: str | None) -> str | None:
    """The `Idempotency-Key` header if it is 1 to 255 printable ASCII characters; else InvalidHeader.

    Keys are tokens such as UUIDs; bytes beyond ASCII reach us decoded with surrogateescape, as lone
    surrogates that neither SQLite nor Redis can encode.
    """
    if raw is None or _IDEMPOTENCY_KEY.fullmatch(raw):
        return raw
    raise InvalidHeader("Idempotency-Key must be 1 to 255 printable ASCII characters")
