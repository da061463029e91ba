"""Validating model inputs against the model's JSON Schema, fast when valid and precise when not.

jsonschema is the reference (every draft, and error messages that name the field) but costs about a
millisecond for a 64-number input, which the event loop pays per request. fastjsonschema compiles the
schema to Python and is ~50x faster; it only knows drafts 4, 6 and 7, so it is used as a fast path
only for schemas that need nothing newer, and any input it rejects goes to jsonschema for the message.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import fastjsonschema
import jsonschema

from .errors import InvalidInput

# Keywords of drafts 2019-09 and 2020-12 that fastjsonschema would silently ignore.
NEWER_KEYWORDS = {
    "prefixItems", "unevaluatedItems", "unevaluatedProperties", "dependentRequired", "dependentSchemas",
    "$defs", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "minContains",
    "maxContains", "$vocabulary",
}  # fmt: skip
OLD_DRAFTS = ("draft-04", "draft-06", "draft-07")


class InputValidator:
    def __init__(self, schema: dict[str, Any]) -> None:
        self._reference = jsonschema.validators.validator_for(schema)(schema)
        self._fast = _compile_fast(schema)

    def __call__(self, value: Any) -> None:
        """Raise InvalidInput naming the offending field."""
        if self._fast is not None:
            try:
                self._fast(value)
                return
            except fastjsonschema.JsonSchemaValueException:
                pass  # jsonschema decides, and says where
        error = _most_relevant(self._reference.iter_errors(value))
        if error is not None:
            raise InvalidInput(f"{_path(error)}: {error.message}")


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


def _path(error: jsonschema.ValidationError) -> str:
    return "input" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


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
