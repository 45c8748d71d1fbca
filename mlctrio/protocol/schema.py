"""JSON Schema (2020-12, as OpenAPI 3.1 uses) generated from the protocol's attrs classes.

The schema is derived from the same type hints and field metadata the validator uses, so the
document cannot drift from what the server accepts and sends. One rule differs by direction:

- input (requests): a field with a default is optional;
- output (responses): a field is required unless it carries OMIT metadata, because to_json always
  sends it (possibly as null).

A class used in both directions with different `required` sets gets two components, the output
one suffixed "Output".
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from mlctrio.protocol.validate import OMIT_KEY, SCHEMA_KEY, Omitted

Direction = Literal["input", "output"]
REF_PREFIX = "#/components/schemas/"
_TOKEN_ID_PATTERN = "^(0|[1-9][0-9]{0,9})$"


def _merge(schema: dict[str, Any], extra: Mapping[str, object]) -> dict[str, Any]:
    """Add keywords to a schema; dict-valued keywords present in both are merged recursively."""
    merged = dict(schema)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _json_default(value: object) -> bool:
    return isinstance(value, str | int | float | bool) and not isinstance(value, enum.Enum)


def _is_omitted_literal(tp: Any) -> bool:
    """`Literal[Omitted.OMITTED]`: a union member that never reaches JSON (the key is left out)."""
    args = typing.get_args(tp)
    return typing.get_origin(tp) is Literal and all(isinstance(a, Omitted) for a in args)


@attrs.define
class SchemaBuilder:
    """Turns types into JSON Schemas, collecting attrs classes as named components."""

    components: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    _names: dict[tuple[type, Direction], str] = attrs.field(factory=dict)

    def ref(self, cls: type, direction: Direction) -> dict[str, Any]:
        """A `$ref` to the component for an attrs class, building it on first use."""
        key = (cls, direction)
        if key not in self._names:
            schema = self._class_schema(cls, direction)
            name = cls.__name__
            existing = self.components.get(name)
            if existing is not None and existing != schema:
                other = self._names.get((cls, "input" if direction == "output" else "output"))
                if other != name:
                    raise ValueError(f"two protocol classes are named {name}")
                name += "Output" if direction == "output" else "Input"
            self.components[name] = schema
            self._names[key] = name
        return {"$ref": REF_PREFIX + self._names[key]}

    def schema(self, tp: Any, direction: Direction) -> dict[str, Any]:
        """The JSON Schema of a type hint."""
        if tp is type(None) or tp is None:
            return {"type": "null"}
        simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
        if tp in simple:
            return {"type": simple[tp]}
        if tp is object or tp is Any:
            return {}
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is Literal:
            values = [a for a in args if not isinstance(a, Omitted)]
            if len(values) == 1:
                return {"const": values[0]}
            return {"enum": values}
        if origin in (typing.Union, types.UnionType):
            members = [self.schema(a, direction) for a in args if not _is_omitted_literal(a)]
            return members[0] if len(members) == 1 else {"anyOf": members}
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": self.schema(args[0], direction)}
        if origin in (Mapping, dict):
            key_type, value_type = args
            result: dict[str, Any] = {"type": "object"}
            if value_type is not object:
                result["additionalProperties"] = self.schema(value_type, direction)
            if key_type is int:
                result["propertyNames"] = {"pattern": _TOKEN_ID_PATTERN}
            return result
        if isinstance(tp, type) and attrs.has(tp):
            return self.ref(tp, direction)
        raise TypeError(f"no JSON Schema for {tp!r}")

    def _class_schema(self, cls: type, direction: Direction) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for field in attrs.fields(cls):
            name = field.alias or field.name
            schema = self.schema(hints[field.name], direction)
            extra = field.metadata.get(SCHEMA_KEY)
            if extra:
                schema = _merge(schema, extra)
            has_default = field.default is not attrs.NOTHING
            if has_default and _json_default(field.default):
                schema = _merge(schema, {"default": field.default})
            properties[name] = schema
            if not has_default or (direction == "output" and not field.metadata.get(OMIT_KEY)):
                required.append(name)
        result: dict[str, Any] = {
            "title": cls.__name__,
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        if required:
            result["required"] = required
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(cls.__name__ + "("):  # skip attrs' generated signature
            result["description"] = doc.split("\n\n")[0]
        return result
