"""Load a JSON config: validate against its schema, fill defaults, resolve paths, freeze.

Every problem is collected before anything is raised, so a user fixes a config in one round:
schema errors (each with its JSON path), then the semantic checks of the config kind.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import errno
import itertools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from maisi.errors import ConfigError
from maisi.files import SYMLINK_LOOP

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


class _NonFinite(str):
    """Placeholder for a NaN/Infinity literal (or an overflowing number such as 1e999) while parsing."""


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _non_finite_paths(data: Any, parts: tuple[Any, ...] = ()) -> list[str]:
    """``$.path: ...`` for every placeholder left by the parser, in document order."""
    if isinstance(data, _NonFinite):
        return [f"{json_path(parts)}: got {data}, expected a finite number (JSON has no NaN or Infinity)"]
    if isinstance(data, dict):
        return [line for k, v in data.items() for line in _non_finite_paths(v, (*parts, k))]
    if isinstance(data, list):
        return [line for i, v in enumerate(data) for line in _non_finite_paths(v, (*parts, i))]
    return []


MAX_DEPTH = 100  # arrays/objects inside each other: no config, datalist or database of ours comes close


def _depth_beyond(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays/objects more than ``limit`` deep, found without recursion (so
    nothing recursive ever sees such a document): strings removed, the running count of the brackets left."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(1 if c in "[{" else -1 for c in brackets), default=0) > limit


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def read_json(
    path: str | Path, *, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None
) -> Any:
    """Parse a user's JSON file (config, datalist, mapping, label dictionary ...): the one shared reader.

    Refuses, as a ConfigError naming the file: a missing or unreadable file, text that is not UTF-8 (a BOM is
    allowed), invalid JSON (with line and column), and the non-standard literals ``NaN``, ``Infinity`` and
    ``-Infinity`` or numbers too large for a float, which Python's ``json`` would accept (each with its JSON
    path, all at once), and arrays/objects nested more than :data:`MAX_DEPTH` deep (which would otherwise end
    in a RecursionError, in the parser or in any check that walks the document).

    Args:
        path: the file.
        object_pairs_hook: passed to :func:`json.loads` (e.g. to refuse duplicate keys); it should return a
            dict for the non-finite check to see inside the objects.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except IsADirectoryError:
        raise ConfigError(str(path), ["is a directory, expected a JSON file"]) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(str(path), [SYMLINK_LOOP]) from None
        raise ConfigError(str(path), [f"cannot read file: {e.strerror}"]) from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM (Windows editors) is harmless
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8"
        raise ConfigError(str(path), [problem]) from None
    if _depth_beyond(text, MAX_DEPTH):
        raise ConfigError(
            str(path), [f"arrays/objects nested more than {MAX_DEPTH} levels deep; not a config"]
        )
    try:
        data = json.loads(
            text, parse_constant=_NonFinite, parse_float=_parse_float, object_pairs_hook=object_pairs_hook
        )
    except json.JSONDecodeError as e:
        raise ConfigError(
            str(path), [f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"]
        ) from None
    non_finite = _non_finite_paths(data)
    if non_finite:
        raise ConfigError(str(path), non_finite)
    return data


def load_config(path: str | Path, kind: str, checks: Iterable[Callable[[Any], list[str]]] = ()) -> Any:
    """Load, validate and freeze a config.

    Args:
        path: the JSON file.
        kind: config kind, e.g. ``"infer"``; selects the schema, the dataclass and the cross-key checks.
        checks: further checks of the frozen config (e.g. against the preset it names,
            :mod:`maisi.preset_checks`); their problems are reported with the cross-key ones.

    Returns:
        The frozen dataclass of this kind, with defaults filled and paths absolute.

    Raises:
        ConfigError: listing every problem, each as ``$.json.path: message``.
    """
    from maisi.config.registry import KINDS  # the kinds import their dataclasses, which need nothing of this

    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; known: {sorted(KINDS)}")
    spec = KINDS[kind]
    path = Path(path)
    data = read_json(path)
    schema = load_schema(spec.schema)
    errors = schema_errors(data, schema)
    if errors:
        raise ConfigError(str(path), errors)
    filled = resolve_paths(fill_defaults(data, schema), schema, path.parent.resolve())
    config = build_dataclass(spec.dataclass, filled)
    problems = list(spec.check(config))
    for check in checks:
        problems.extend(check(config))
    if problems:
        raise ConfigError(str(path), problems)
    return config
