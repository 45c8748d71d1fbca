"""The cattrs converter: strict structure hooks for requests, unstructure hooks for responses.

Structuring follows the rules in protocol/validate.py. Hooks are registered once, in
`make_converter`; the converter is never changed after that.
"""

from __future__ import annotations

import enum
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from mlctrio.protocol.validate import (
    OMIT_KEY,
    SCHEMA_KEY,
    FieldError,
    Omitted,
    check_constraints,
    json_kind,
)

_TOKEN_ID_KEY = re.compile(r"(0|[1-9][0-9]{0,9})")


# --- structure hooks ------------------------------------------------------------------------


def _structure_str(value: object, _: object) -> str:
    if not isinstance(value, str):
        raise FieldError(f"expected a string, got {json_kind(value)}")
    return value


def _structure_int(value: object, _: object) -> int:
    if type(value) is not int:  # bool is an int subclass: exclude it on purpose
        raise FieldError(f"expected an integer, got {json_kind(value)}")
    return value


def _structure_float(value: object, _: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(f"expected a number, got {json_kind(value)}")
    try:
        result = float(value)
    except OverflowError:
        raise FieldError("number is out of range") from None
    if not math.isfinite(result):
        raise FieldError("number must be finite")
    return result


def _structure_bool(value: object, _: object) -> bool:
    if not isinstance(value, bool):
        raise FieldError(f"expected a boolean, got {json_kind(value)}")
    return value


def _structure_none(value: object, _: object) -> None:
    if value is not None:
        raise FieldError(f"expected null, got {json_kind(value)}")


def _structure_any(value: object, _: object) -> object:
    return value


def _is_union(tp: object) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _is_literal(tp: object) -> bool:
    return typing.get_origin(tp) is Literal


def _is_tuple_seq(tp: object) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _is_mapping(tp: object) -> bool:
    return typing.get_origin(tp) in (Mapping, dict)


def _literal_hook(tp: Any) -> Callable[[object, object], object]:
    allowed = typing.get_args(tp)

    def structure(value: object, _: object) -> object:
        for option in allowed:
            # `type(...) is` so that True does not match 1 and 1 does not match 1.0
            if type(value) is type(option) and value == option:
                return option
        choices = ", ".join(repr(a.value if isinstance(a, enum.Enum) else a) for a in allowed)
        raise FieldError(f"unsupported value {value!r}: expected one of {choices}")

    return structure


def _kinds_of(tp: Any) -> frozenset[str]:
    """The JSON kinds a type accepts (used to pick a union member without trial and error)."""
    if tp is type(None) or tp is None:
        return frozenset({"null"})
    if tp is str:
        return frozenset({"string"})
    if tp is bool:
        return frozenset({"boolean"})
    if tp is int:
        return frozenset({"integer"})
    if tp is float:
        return frozenset({"integer", "number"})
    if tp is object or tp is Any:
        return frozenset({"null", "boolean", "integer", "number", "string", "array", "object"})
    if _is_literal(tp):
        return frozenset(json_kind(a) for a in typing.get_args(tp) if not isinstance(a, enum.Enum))
    if _is_union(tp):
        return frozenset().union(*(_kinds_of(a) for a in typing.get_args(tp)))
    if _is_tuple_seq(tp):
        return frozenset({"array"})
    if _is_mapping(tp) or attrs.has(tp):
        return frozenset({"object"})
    raise TypeError(f"no JSON kind known for {tp!r}")


_NOUNS: Final = {str: "string", int: "integer", float: "number", bool: "boolean"}


def describe_type(tp: Any, *, plural: bool = False) -> str:
    """A short English description of what a type accepts, for error messages."""
    if tp is type(None) or tp is None:
        return "nulls" if plural else "null"
    if tp in _NOUNS:
        noun = _NOUNS[tp]
        return noun + "s" if plural else ("an " if noun[0] in "aeiou" else "a ") + noun
    if _is_literal(tp):
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        options = [describe_type(a, plural=plural) for a in typing.get_args(tp)]
        return ", ".join(options[:-1]) + ", or " + options[-1]
    if _is_tuple_seq(tp):
        items = describe_type(typing.get_args(tp)[0], plural=True)
        return f"arrays of {items}" if plural else f"an array of {items}"
    return "objects" if plural else "an object"


def _tag_field(members: tuple[Any, ...]) -> str | None:
    """A field every member declares as a Literal with distinct values: the union's tag."""
    if not all(attrs.has(m) for m in members):
        return None
    hints = [typing.get_type_hints(m) for m in members]
    for name in hints[0]:
        if all(_is_literal(h.get(name)) for h in hints):
            values = [v for h in hints for v in typing.get_args(h[name])]
            if len(values) == len(set(values)):
                return name
    return None


def _union_hook(tp: Any, conv: cattrs.Converter) -> Callable[[object, object], object]:
    members = typing.get_args(tp)
    by_kind: dict[str, list[Any]] = {}
    for member in members:
        for kind in _kinds_of(member):
            by_kind.setdefault(kind, []).append(member)
    expected = " or ".join(sorted(_kinds_of(tp)))
    objects = tuple(m for m in members if attrs.has(m))
    tag = _tag_field(objects) if len(objects) > 1 else None
    by_tag: dict[object, Any] = {}
    if tag is not None:
        for member in objects:
            for value in typing.get_args(typing.get_type_hints(member)[tag]):
                by_tag[value] = member
    tag_choices = ", ".join(repr(v) for v in by_tag)

    def structure(value: object, _: object) -> object:
        kind = json_kind(value)
        candidates = by_kind.get(kind)
        if not candidates:
            raise FieldError(f"expected {expected}, got {kind}")
        if kind == "object" and tag is not None:
            assert isinstance(value, dict)
            if tag not in value:
                raise FieldError(f"missing required field {tag!r}", (tag,))
            key = value[tag]
            member = by_tag.get(key) if isinstance(key, str | int) else None
            if member is None:
                raise FieldError(
                    f"unsupported value {key!r}: expected one of {tag_choices}", (tag,)
                )
            return conv.structure(value, member)
        first_error: FieldError | None = None
        for member in candidates:  # in declaration order: the first that fits wins
            try:
                return conv.structure(value, member)
            except FieldError as e:
                first_error = first_error or e
        assert first_error is not None
        if len(candidates) == 1:
            raise first_error
        raise FieldError(f"expected {describe_type(tp)}")

    return structure


def _tuple_hook(tp: Any, conv: cattrs.Converter) -> Callable[[object, object], tuple[Any, ...]]:
    item_type = typing.get_args(tp)[0]

    def structure(value: object, _: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise FieldError(f"expected an array, got {json_kind(value)}")
        items = []
        for index, item in enumerate(value):
            try:
                items.append(conv.structure(item, item_type))
            except FieldError as e:
                raise e.under(index) from None
        return tuple(items)

    return structure


def _mapping_hook(tp: Any, conv: cattrs.Converter) -> Callable[[object, object], dict[Any, Any]]:
    key_type, value_type = typing.get_args(tp)
    if key_type not in (str, int):
        raise TypeError(f"unsupported mapping key type {key_type!r}")

    def structure(value: object, _: object) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise FieldError(f"expected an object, got {json_kind(value)}")
        result: dict[Any, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise FieldError(f"object keys must be strings, got {json_kind(key)}")
            if key_type is int:
                if _TOKEN_ID_KEY.fullmatch(key) is None:
                    raise FieldError(f"key {key!r} is not a token id (a decimal integer)", (key,))
                out_key: object = int(key)
            else:
                out_key = key
            try:
                result[out_key] = conv.structure(item, value_type)
            except FieldError as e:
                raise e.under(key) from None
        return result

    return structure


def _attrs_hook(cls: Any, conv: cattrs.Converter) -> Callable[[object, object], object]:
    hints = typing.get_type_hints(cls)
    plan = [
        (
            f.alias or f.name,
            f.name,
            hints[f.name],
            f.default is attrs.NOTHING,
            f.metadata.get(SCHEMA_KEY),
        )
        for f in attrs.fields(cls)
    ]
    known = frozenset(key for key, *_ in plan)
    check = getattr(cls, "_check", None)

    def structure(value: object, _: object) -> object:
        if not isinstance(value, dict):
            raise FieldError(f"expected an object, got {json_kind(value)}")
        kwargs = {}
        for key, name, field_type, required, schema in plan:
            if key not in value:
                if required:
                    raise FieldError(
                        f"missing required field {key!r}", (key,), code="missing_required_parameter"
                    )
                continue
            try:
                item = conv.structure(value[key], field_type)
                if schema is not None and item is not None:
                    check_constraints(item, schema)
            except FieldError as e:
                raise e.under(key) from None
            kwargs[name] = item
        # after the known fields, so that a bad tag ("type": "image_url") is what gets reported
        for key in value:
            if key not in known:
                raise FieldError(f"unknown field {key!r}", (key,), code="unknown_parameter")
        result = cls(**kwargs)
        if check is not None:
            check(result)
        return result

    return structure


# --- unstructure hooks ----------------------------------------------------------------------


def _attrs_unstructure_hook(cls: Any, conv: cattrs.Converter) -> Callable[[Any], Any]:
    overrides: dict[str, Any] = {
        f.name: override(omit_if_default=True)
        for f in attrs.fields(cls)
        if f.metadata.get(OMIT_KEY)
    }
    return make_dict_unstructure_fn(cls, conv, **overrides)


def _tuple_unstructure_hook(tp: Any, conv: cattrs.Converter) -> Callable[[Any], Any]:
    item_type = typing.get_args(tp)[0]
    if item_type in (str, int, float, bool):
        return list  # JSON arrays are lists; tuples would fail strict JSON Schema "array"
    unstructure = conv.unstructure
    return lambda value: [unstructure(item) for item in value]


def _is_token_id_mapping(tp: object) -> bool:
    return _is_mapping(tp) and typing.get_args(tp)[:1] == (int,)


def _token_id_mapping_unstructure_hook(tp: Any, conv: cattrs.Converter) -> Callable[[Any], Any]:
    unstructure = conv.unstructure
    return lambda value: {str(key): unstructure(item) for key, item in value.items()}


def make_converter() -> cattrs.Converter:
    """Build the converter; call once at import and never mutate it afterwards."""
    conv = cattrs.Converter(detailed_validation=False)
    for tp, hook in (
        (str, _structure_str),
        (int, _structure_int),
        (float, _structure_float),
        (bool, _structure_bool),
        (type(None), _structure_none),
    ):
        conv.register_structure_hook(tp, hook)
    # a predicate, not a class hook: singledispatch on `object` would match every class
    conv.register_structure_hook_func(lambda tp: tp is object or tp is Any, _structure_any)
    conv.register_structure_hook_factory(_is_literal, _literal_hook)
    conv.register_structure_hook_factory(_is_union, _union_hook)
    conv.register_structure_hook_factory(_is_tuple_seq, _tuple_hook)
    conv.register_structure_hook_factory(_is_mapping, _mapping_hook)
    conv.register_structure_hook_factory(attrs.has, _attrs_hook)
    conv.register_unstructure_hook_factory(attrs.has, _attrs_unstructure_hook)
    conv.register_unstructure_hook_factory(_is_tuple_seq, _tuple_unstructure_hook)
    conv.register_unstructure_hook_factory(_is_token_id_mapping, _token_id_mapping_unstructure_hook)
    conv.register_unstructure_hook(Omitted, lambda _: None)  # never reached: always omitted
    return conv
