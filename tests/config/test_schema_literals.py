"""Every choice a schema offers (``enum``) is the ``Literal`` type of the dataclass field it fills, and
back."""

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


def _pairs(cls, schema, path="$"):
    """(json path, schema node, field type) for every field of a dataclass tree."""
    hints = typing.get_type_hints(cls)
    props = schema.get("properties", {})
    for field in dataclasses.fields(cls):
        node = props.get(field.name)
        if node is None:
            continue
        tp = _unwrap(hints[field.name])
        here = f"{path}.{field.name}"
        if dataclasses.is_dataclass(tp):
            yield from _pairs(tp, node, here)
        else:
            yield here, node.get("items", node) if "enum" not in node else node, tp


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
