"""The config schemas (JSON Schema 2020-12, package data) and the generic steps from a user's JSON to a
frozen dataclass tree and back: validate with every error at once, fill defaults, resolve paths, build,
and turn a dataclass tree back into JSON.

Knows no config kind (those are :mod:`maisi.config.registry`), so each kind's module can use it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_DIALECT = jsonschema.Draft202012Validator


@cache
def load_schema(kind: str) -> dict:
    """The JSON Schema of a config kind (e.g. ``"infer"``), shipped as package data."""
    text = resources.files("maisi.config").joinpath("schemas", f"{kind}.schema.json").read_text()
    schema = json.loads(text)
    SCHEMA_DIALECT.check_schema(schema)
    return schema


def json_path(parts: typing.Iterable[Any]) -> str:
    """``["sampling", "steps"]`` -> ``$.sampling.steps``; list indices as ``[i]``."""
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _describe_error(err: jsonschema.ValidationError) -> str:
    """One line per error: where, what was received, what was expected."""
    where = json_path(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        msgs = []
        for key in extra:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            msgs.append(
                f"{json_path([*err.absolute_path, key])}: unknown key '{key}'{suggestion} "
                f"(allowed: {', '.join(allowed)})"
            )
        return "\n".join(msgs)
    if err.validator == "enum":
        choices = [v for v in err.validator_value if isinstance(v, str)]
        hint = difflib.get_close_matches(err.instance, choices, n=1) if isinstance(err.instance, str) else []
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        expected = json.dumps(err.validator_value)
        return f"{where}: got {json.dumps(err.instance)}, expected one of {expected}{suggestion}"
    if err.validator == "type":
        return f"{where}: got {json.dumps(err.instance)}, expected type {err.validator_value}"
    if err.validator == "required":
        return f"{where}: {err.message}"
    return f"{where}: got {json.dumps(err.instance)}: {err.message}"


def schema_errors(data: Any, schema: dict) -> list[str]:
    """All schema violations of ``data``, sorted by JSON path."""
    validator = SCHEMA_DIALECT(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    lines: list[str] = []
    for err in errors:
        lines.extend(_describe_error(err).splitlines())
    return lines


def _subschema_for_object(schema: dict) -> dict | None:
    """The object-typed schema of a property (``type`` may be a list including ``null``)."""
    t = schema.get("type")
    if t == "object" or (isinstance(t, list) and "object" in t):
        return schema
    return None


def fill_defaults(data: Any, schema: dict) -> Any:
    """Return a copy of ``data`` with every absent property set to its schema ``default``, recursively."""
    obj_schema = _subschema_for_object(schema)
    if obj_schema is None or not isinstance(data, dict):
        return data
    out = dict(data)
    for key, sub in obj_schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = fill_defaults(out[key], sub)
    return out


def resolve_paths(data: Any, schema: dict, base: Path) -> Any:
    """Make every property (or list item) marked ``"format": "path"`` absolute, relative to ``base``."""
    if schema.get("format") == "path" and isinstance(data, str):
        p = Path(data).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())
    if isinstance(data, list) and isinstance(schema.get("items"), dict):
        return [resolve_paths(item, schema["items"], base) for item in data]
    obj_schema = _subschema_for_object(schema)
    if obj_schema is None or not isinstance(data, dict):
        return data
    props = obj_schema.get("properties", {})
    return {k: resolve_paths(v, props[k], base) if k in props else v for k, v in data.items()}


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build_dataclass(cls: type, data: dict) -> Any:
    """Instantiate a (frozen) dataclass tree from validated, default-filled JSON; lists become tuples."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = data[f.name]
        tp = _strip_optional(hints[f.name])
        if value is not None and dataclasses.is_dataclass(tp):
            value = build_dataclass(tp, value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)


def to_jsonable(obj: Any) -> Any:
    """Dataclass tree -> plain JSON data (tuples as lists), e.g. to write the resolved config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj
