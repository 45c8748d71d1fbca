"""Validation rules shared by the converter (protocol/converter.py) and the OpenAPI generator.

Rules (each one exists because a lenient default would silently change a request's meaning):

- No coercion. JSON `"1"` is not an integer, `true` is not an integer, `1.5` is not an integer,
  a string is not a list. cattrs' defaults (`int("1")`, `tuple("abc")`) are replaced in
  converter.py.
- Unknown keys are errors: a misspelt `temprature` must not quietly sample at temperature 1.
- Numbers must be finite.
- Range and size limits live in attrs field metadata as JSON Schema keywords (see `constraints`),
  so the validator and the generated OpenAPI document (protocol/openapi.py) cannot disagree.
- Every failure is a `FieldError` carrying the path from the body's root to the bad value; the
  public `parse_*` functions turn it into `InvalidRequestError(param="messages.0.content")`.
- A class may define `_check(self) -> None` for rules across fields; it raises FieldError with a
  path relative to that object and runs right after the object is built.

Supported type shapes: str, int, float, bool, None, object (any JSON), Literal[...], unions
(resolved by the JSON kind of the value, or by a shared Literal tag field for unions of attrs
classes), `tuple[X, ...]` (from a JSON array), `Mapping[str, X]` and `Mapping[int, X]` (from a
JSON object whose keys are decimal token ids), and attrs classes (from a JSON object).
"""

from __future__ import annotations

import enum
import operator
import re
from collections.abc import Callable, Mapping
from typing import Final

#: Field-metadata key holding JSON Schema keywords that both validate and document the field.
SCHEMA_KEY: Final = "json_schema"
#: Field-metadata key: omit the key from the JSON output when the value equals the default.
OMIT_KEY: Final = "omit_if_default"


class Omitted(enum.Enum):
    """Marks a response field whose key is left out of the JSON (OpenAI omits it there).

    Needed where OpenAI distinguishes an absent key from `null`: a stream chunk carries
    `"usage": null` only when the client asked for `stream_options.include_usage`.
    """

    OMITTED = "omitted"


OMITTED: Final = Omitted.OMITTED


class FieldError(Exception):
    """A request value that fails validation, at `path` (keys and list indexes from the root)."""

    def __init__(
        self, message: str, path: tuple[str | int, ...] = (), *, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.code = code

    def under(self, *prefix: str | int) -> FieldError:
        """The same error seen from a containing object."""
        return FieldError(self.message, (*prefix, *self.path), code=self.code)

    @property
    def param(self) -> str | None:
        """The dotted path OpenAI-style clients see as the error's `param`."""
        return ".".join(str(p) for p in self.path) or None


def constraints(**keywords: object) -> dict[str, object]:
    """Field metadata with JSON Schema keywords, e.g. `constraints(minimum=0, maximum=2)`.

    Keywords checked here: minimum, maximum, exclusiveMinimum, exclusiveMaximum, minLength,
    maxLength, pattern, minItems, maxItems, items, additionalProperties, not (with const).
    As in JSON Schema, a keyword applies only to values of its kind, so `minLength` and
    `maxItems` can share a str|list field.
    """
    return {SCHEMA_KEY: keywords}


def json_kind(value: object) -> str:
    """The JSON type name of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_NUMBER_BOUNDS: Final[tuple[tuple[str, Callable[[float, float], bool], str], ...]] = (
    ("minimum", operator.lt, ">="),
    ("maximum", operator.gt, "<="),
    ("exclusiveMinimum", operator.le, ">"),
    ("exclusiveMaximum", operator.ge, "<"),
)


def _check_number(value: float, schema: Mapping[str, object]) -> None:
    for key, fails, words in _NUMBER_BOUNDS:
        bound = schema.get(key)
        if isinstance(bound, int | float) and fails(value, bound):
            raise FieldError(f"{value!r} is out of range: must be {words} {bound!r}")


def check_constraints(value: object, schema: Mapping[str, object]) -> None:
    """Raise FieldError if `value` breaks one of the JSON Schema keywords in `schema`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(value, schema)
    if isinstance(value, str):
        min_length = schema.get("minLength")
        if isinstance(min_length, int) and len(value) < min_length:
            raise FieldError(f"string is too short: must have at least {min_length} characters")
        max_length = schema.get("maxLength")
        if isinstance(max_length, int) and len(value) > max_length:
            raise FieldError(f"string is too long: must have at most {max_length} characters")
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and re.search(pattern, value) is None:
            raise FieldError(f"{value!r} does not match the pattern {pattern!r}")
    if isinstance(value, tuple):
        min_items = schema.get("minItems")
        if isinstance(min_items, int) and len(value) < min_items:
            raise FieldError(f"array is too short: must have at least {min_items} items")
        max_items = schema.get("maxItems")
        if isinstance(max_items, int) and len(value) > max_items:
            raise FieldError(f"array is too long: must have at most {max_items} items")
        items = schema.get("items")
        if isinstance(items, Mapping):
            for index, item in enumerate(value):
                try:
                    check_constraints(item, items)
                except FieldError as e:
                    raise e.under(index) from None
    additional = schema.get("additionalProperties")
    if isinstance(value, Mapping) and isinstance(additional, Mapping):
        for key, item in value.items():
            try:
                check_constraints(item, additional)
            except FieldError as e:
                raise e.under(str(key)) from None
    negated = schema.get("not")
    if isinstance(negated, Mapping) and "const" in negated and value == negated["const"]:
        if type(value) is type(negated["const"]):
            raise FieldError(f"{value!r} is not allowed here")
