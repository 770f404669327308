"""The config dataclasses against their schemas, the one source of truth of every key: each choice a schema
offers (``enum``) is the ``Literal`` type of the field it fills, and back; each schema key is a field and each
field a schema key, at every level (dataclasses inside lists included); a field is optional (``| None``)
exactly when its key takes null, and its Python type is the key's JSON type; defaults live in the schema
only."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from maisi.config.registry import KINDS
from maisi.config.schema import load_schema


def _unwrap(tp):
    """Strip ``X | None`` and ``tuple[X, ...]`` down to X."""
    while True:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        elif origin is tuple:
            args = typing.get_args(tp)
            tp = args[0]
        else:
            return tp


def _nested(cls, schema, path="$"):
    """(json path, dataclass, its schema node) for every dataclass of a tree, lists of them included."""
    yield path, cls, schema
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        node = schema.get("properties", {}).get(field.name)
        tp = _unwrap(hints[field.name])
        if node is not None and dataclasses.is_dataclass(tp):
            inner = node["items"] if _is_list(hints[field.name]) else node
            yield from _nested(tp, inner, f"{path}.{field.name}" + ("[]" if inner is not node else ""))


def _is_list(tp) -> bool:
    return any(typing.get_origin(t) is tuple for t in _members(tp))


def _members(tp) -> list:
    """The types of a union (``X | None`` -> [X, NoneType]), or [tp]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return [tp]


def _pairs(cls, schema, path="$"):
    """(json path, schema node, field type) for every field of a dataclass tree."""
    for here, dc, node in _nested(cls, schema, path):
        hints = typing.get_type_hints(dc)
        props = node.get("properties", {})
        for field in dataclasses.fields(dc):
            child = props.get(field.name)
            tp = _unwrap(hints[field.name])
            if child is None or dataclasses.is_dataclass(tp):
                continue
            yield f"{here}.{field.name}", child.get("items", child) if "enum" not in child else child, tp


def _fields(cls, schema):
    """(json path, schema node or None, field or None, field type) for every key and field of a tree."""
    for here, dc, node in _nested(cls, schema):
        hints = typing.get_type_hints(dc)
        fields = {f.name: f for f in dataclasses.fields(dc)}
        props = node.get("properties", {})
        for name in [*props, *(n for n in fields if n not in props)]:
            field = fields.get(name)
            yield f"{here}.{name}", props.get(name), field, hints[name] if field else None


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_enums_are_the_literal_types(kind):
    spec = KINDS[kind]
    mismatches = []
    for path, node, tp in _pairs(spec.dataclass, load_schema(spec.schema)):
        enum = node.get("enum")
        literal = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
        if enum is None and literal is None:
            continue
        if enum is None or literal is None:
            mismatches.append(f"{path}: schema enum {enum} vs field type {tp}")
        elif set(enum) - {None} != set(literal):
            mismatches.append(f"{path}: schema {sorted(set(enum) - {None})} vs Literal {sorted(literal)}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_schema_key_is_a_field_and_back(kind):
    spec = KINDS[kind]
    unmatched = [
        f"{path}: {'schema key without a dataclass field' if field is None else 'field without a schema key'}"
        for path, node, field, _ in _fields(spec.dataclass, load_schema(spec.schema))
        if node is None or field is None
    ]
    assert not unmatched, "\n".join(unmatched)


def _schema_types(node) -> set[str]:
    """The JSON types a schema node accepts (an enum's or a const's from its values)."""
    if "enum" in node or "const" in node:
        names = {bool: "boolean", str: "string", int: "integer", float: "number", type(None): "null"}
        return {names[type(v)] for v in node.get("enum", [node.get("const")])}
    if "anyOf" in node:
        return set().union(*(_schema_types(n) for n in node["anyOf"]))
    kinds = node.get("type", [])
    return set(kinds if isinstance(kinds, list) else [kinds])


def _python_types(tp) -> set[str]:
    """The JSON types a field's type holds: tuple -> array, Literal -> its values' types."""
    out = set()
    for member in _members(tp):
        if member is type(None):
            out.add("null")
        elif typing.get_origin(member) is typing.Literal:
            out |= _schema_types({"enum": list(typing.get_args(member))})
        elif typing.get_origin(member) is tuple:
            out.add("array")
        elif dataclasses.is_dataclass(member):
            out.add("object")
        else:
            out.add({bool: "boolean", str: "string", int: "integer", float: "number"}[member])
    return out


# Keys whose value the loader normalises into the field's type: (schema types, field types).
NORMALISED = {"$.anatomy.lesions[].host": ({"string", "array"}, {"array"})}  # one name -> a tuple of one


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_field_type_is_its_keys_json_type(kind):
    """``X | None`` exactly where the key takes null; int for integer, float for number, tuple for array."""
    spec = KINDS[kind]
    mismatches = []
    for path, node, field, tp in _fields(spec.dataclass, load_schema(spec.schema)):
        if node is None or field is None:
            continue  # test_every_schema_key_is_a_field_and_back
        expected, got = _schema_types(node), _python_types(tp)
        if (expected, got) != NORMALISED.get(path, (got, got)):
            mismatches.append(
                f"{path}: schema accepts {sorted(expected)}, the field holds {sorted(got)} ({tp})"
            )
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_defaults_live_in_the_schema_only(kind):
    """The loader fills every default from the schema: a dataclass default would be a second source."""
    spec = KINDS[kind]
    own = [
        f"{path}: dataclass default {field.default!r} (the schema's: {node.get('default', 'none')!r})"
        for path, node, field, _ in _fields(spec.dataclass, load_schema(spec.schema))
        if field is not None
        and field.init
        and (field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING)
    ]
    assert not own, "\n".join(own)
