"""Load a JSON config: validate against its schema, fill defaults, resolve paths, freeze.

Every problem is collected before anything is raised, so a user fixes a config in one round:
schema errors (each with its JSON path), then the semantic checks of the config kind.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from maisi.config.registry import KINDS
from maisi.config.schema import (
    build_dataclass,
    fill_defaults,
    json_path,
    load_schema,
    resolve_paths,
    schema_errors,
)
from maisi.errors import ConfigError
from maisi.files import SYMLINK_LOOP


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
            :mod:`maisi.families.checks`); their problems are reported with the cross-key ones.

    Returns:
        The frozen dataclass of this kind, with defaults filled and paths absolute.

    Raises:
        ConfigError: listing every problem, each as ``$.json.path: message``.
    """
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
