"""Label dictionaries (name -> MAISI id) and the checks a mask must pass against one.

Issue-3 work (adding classes, remapping vocabularies, the body envelope) builds on this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maisi.errors import InputError
from maisi.resources import load_json

BODY_LABEL = 200
MAX_LABEL = 255  # the ControlNet sees 8 bit-planes


class _DuplicateNames(dict):
    """A JSON object that remembers names given more than once (json keeps only the last)."""

    duplicates: list[str]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, object]]) -> _DuplicateNames:
        out = cls()
        out.duplicates = []
        for key, value in pairs:
            if key in out:
                out.duplicates.append(key)
            out[key] = value
        return out


def validate_label_dict(label_dict: dict[str, object], source: str) -> dict[str, int]:
    """Check names and ids; return the dictionary with int ids. Lists every problem at once."""
    problems = [f"'{name}': duplicate class name (given more than once)" for name in getattr(label_dict, "duplicates", [])]
    ids: dict[int, str] = {}
    for name, value in label_dict.items():
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"'{name}': id {value!r} is not an integer")
            continue
        if not 0 < value <= MAX_LABEL:
            problems.append(f"'{name}': id {value} is outside 1..{MAX_LABEL} (0 is background)")
        if value in ids:
            problems.append(f"'{name}': id {value} is already used by '{ids[value]}'")
        ids.setdefault(value, name)
    if "body" in label_dict and label_dict["body"] != BODY_LABEL:
        problems.append(f"'body': id {label_dict['body']!r} must be {BODY_LABEL} (what the MAISI ControlNet expects)")
    if problems:
        raise InputError(f"invalid label dictionary {source}:\n  " + "\n  ".join(problems))
    return {k: int(v) for k, v in label_dict.items()}  # type: ignore[arg-type]


def load_label_dict(path: str | Path | None = None) -> dict[str, int]:
    """Load and validate a label dictionary; ``None`` gives MAISI's, shipped with the package."""
    if path is None:
        return validate_label_dict(load_json("maisi_label_dict.json"), "maisi_label_dict.json (packaged)")
    path = Path(path)
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_DuplicateNames.from_pairs)
    except FileNotFoundError:
        raise InputError(f"label dictionary not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a label dictionary is a JSON object of name -> id")
    return validate_label_dict(data, str(path))


def labels_not_in_dict(mask: np.ndarray, label_dict: dict[str, int]) -> list[int]:
    """Labels present in ``mask`` that are neither background (0) nor an id of ``label_dict``."""
    known = set(label_dict.values()) | {0}
    return sorted(int(v) for v in np.unique(mask) if int(v) not in known)
