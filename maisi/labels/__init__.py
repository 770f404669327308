"""Label dictionaries (name -> MAISI id): load, validate, check masks against them, add new classes.

Sub-modules: :mod:`maisi.labels.mapping` (remap another vocabulary to MAISI ids),
:mod:`maisi.labels.envelope` (the body label 200). CLI: ``python -m maisi.labels``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maisi.errors import InputError
from maisi.resources import load_json

BODY_LABEL = 200
MAX_LABEL = 255  # the ControlNet sees 8 bit-planes
# Dummy slots that once meant something: id 2 (dummy1) was an abdomen marker of this project's body-region
# derivation (maisi.conditioning) until issue 18; a new class gets it only when no other dummy slot is free.
SLOTS_WITH_A_ROLE = frozenset({2})
# Reserved key of a label dictionary file: class name -> the name(s) of its host class(es), the organ a
# tumour-like class lies in (what maisi.masks.tumour_free puts in its place). Not a class.
HOSTS_KEY = "_hosts"


class LabelDict(dict):
    """A validated name -> id dictionary; ``hosts`` holds the hosts its file declares (name -> names).

    It compares, iterates and serialises like the plain dictionary (the hosts are not items); write it back
    with :func:`label_dict_json`, which puts the hosts under :data:`HOSTS_KEY`.
    """

    hosts: dict[str, tuple[str, ...]]

    def __init__(self, items: dict[str, int], hosts: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__(items)
        self.hosts = dict(hosts or {})


def label_dict_json(label_dict: dict[str, int]) -> dict[str, object]:
    """What a label dictionary file holds: the classes, plus :data:`HOSTS_KEY` when any host is declared."""
    hosts = getattr(label_dict, "hosts", {})
    out: dict[str, object] = dict(label_dict)
    if hosts:
        out[HOSTS_KEY] = {name: list(names) for name, names in hosts.items()}
    return out


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


def validate_label_dict(label_dict: dict[str, object], source: str) -> LabelDict:
    """Check names, ids and declared hosts; return the dictionary with int ids. Lists all problems at once."""
    problems = [
        f"'{name}': duplicate class name (given more than once)"
        for name in getattr(label_dict, "duplicates", [])
    ]
    classes = {name: value for name, value in label_dict.items() if name != HOSTS_KEY}
    hosts = _read_hosts(label_dict.get(HOSTS_KEY, {}), classes, problems)
    ids: dict[int, str] = {}
    for name, value in classes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"'{name}': id {value!r} is not an integer")
            continue
        if not 0 < value <= MAX_LABEL:
            problems.append(f"'{name}': id {value} is outside 1..{MAX_LABEL} (0 is background)")
        if value in ids:
            problems.append(f"'{name}': id {value} is already used by '{ids[value]}'")
        ids.setdefault(value, name)
    if "body" in label_dict and label_dict["body"] != BODY_LABEL:
        problems.append(
            f"'body': id {label_dict['body']!r} must be {BODY_LABEL} (what the MAISI ControlNet expects)"
        )
    if problems:
        raise InputError(f"invalid label dictionary {source}:\n  " + "\n  ".join(problems))
    return LabelDict({k: int(v) for k, v in classes.items()}, hosts)  # type: ignore[arg-type]


def _read_hosts(raw: object, classes: dict[str, object], problems: list[str]) -> dict[str, tuple[str, ...]]:
    """The :data:`HOSTS_KEY` entry as name -> host names; what is wrong with it goes to ``problems``."""
    if not isinstance(raw, dict):
        problems.append(f"'{HOSTS_KEY}': must be an object of class name -> host class name(s)")
        return {}
    hosts: dict[str, tuple[str, ...]] = {}
    for name, value in raw.items():
        names = [value] if isinstance(value, str) else value
        where = f"'{HOSTS_KEY}' -> '{name}'"
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            problems.append(f"{where}: the host must be a class name or a non-empty list of class names")
            continue
        if name not in classes:
            problems.append(f"{where}: '{name}' is not a class of this dictionary")
        unknown = [n for n in names if n not in classes]
        if unknown:
            problems.append(
                f"{where}: host {', '.join(map(repr, unknown))} is not a class of this dictionary"
            )
        if name in names:
            problems.append(f"{where}: a class cannot be its own host")
        hosts[name] = tuple(dict.fromkeys(names))
    return hosts


def load_label_dict(path: str | Path | None = None) -> LabelDict:
    """Load and validate a label dictionary; ``None`` gives MAISI's, shipped with the package."""
    if path is None:
        return validate_label_dict(load_json("maisi_label_dict.json"), "maisi_label_dict.json (packaged)")
    path = Path(path)
    if path.is_dir():
        raise InputError(f"label dictionary {path}: is a folder; give the JSON file")
    try:
        # utf-8-sig: JSON is UTF-8, and a byte-order mark some editors write is harmless
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_DuplicateNames.from_pairs)
    except FileNotFoundError:
        raise InputError(f"label dictionary not found: {path}") from None
    except UnicodeDecodeError as e:
        where = f"byte {e.object[e.start]:#04x} at offset {e.start}"
        raise InputError(
            f"{path}: not UTF-8 text ({where}); save the label dictionary as UTF-8 JSON"
        ) from None
    except OSError as e:
        raise InputError(f"label dictionary {path}: cannot be read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a label dictionary is a JSON object of name -> id")
    return validate_label_dict(data, str(path))


def labels_not_in_dict(mask: np.ndarray, label_dict: dict[str, int]) -> list[int]:
    """Labels present in ``mask`` that are neither background (0) nor an id of ``label_dict``."""
    known = set(label_dict.values()) | {0}
    return sorted(int(v) for v in np.unique(mask) if int(v) not in known)


def not_label_values(array: np.ndarray) -> str | None:
    """Why an integer volume's values are not label ids (None when they may be): negative values or values
    above :data:`MAX_LABEL`, the mark of a CT in HU (e.g. -1024 .. 3071) given where a mask belongs."""
    if not array.size:
        return None
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high <= MAX_LABEL:
        return None
    return (
        f"values are not labels: they range over {low} .. {high}, label ids lie in 0..{MAX_LABEL} "
        "(is this a CT? give its mask)"
    )


def is_dummy(name: str) -> bool:
    """MAISI's placeholder classes (``dummy1`` .. ``dummy8``) are free slots for new classes."""
    return name.startswith("dummy") and name[5:].isdigit()


def free_ids(label_dict: dict[str, int]) -> list[int]:
    """Ids a new class may take: dummy slots first, then unused ids in 1..255 except 200.

    Dummy slots in id order, except that slots which ever had a role (:data:`SLOTS_WITH_A_ROLE`) come after
    the others: code or data made before the role was removed may still read them that way.
    """
    dummies = [i for n, i in label_dict.items() if is_dummy(n)]
    dummies.sort(key=lambda i: (i in SLOTS_WITH_A_ROLE, i))
    used = set(label_dict.values()) | {BODY_LABEL}
    return dummies + [i for i in range(1, MAX_LABEL + 1) if i not in used]


def add_class(
    label_dict: dict[str, int],
    name: str,
    label_id: int | None = None,
    host: list[str] | tuple[str, ...] | None = None,
) -> tuple[LabelDict, int]:
    """Return a new dictionary with class ``name`` added, and the id it got.

    Without ``label_id`` the class takes the first dummy slot of :func:`free_ids` (the slot's ``dummyN``
    entry is replaced), or the first unused id when no dummy is left. With ``label_id`` that id must be a
    dummy slot or unused. ``host``: the class(es) the new one lies in (a tumour's organ), kept with the
    dictionary's other declared hosts.

    Raises:
        InputError: the name exists already, the id is taken by a real class, no id is free, or a host is
            not a class of the dictionary.
    """
    name = name.strip()
    if not name:
        raise InputError("a class name must not be empty")
    if name in label_dict:
        raise InputError(f"class '{name}' is already in the dictionary with id {label_dict[name]}")
    if is_dummy(name):
        raise InputError(f"'{name}' is a reserved placeholder name; choose a descriptive class name")
    candidates = free_ids(label_dict)
    if label_id is None:
        if not candidates:
            raise InputError("no free id left in 1..255")
        label_id = candidates[0]
    elif label_id not in candidates:
        owner = next((n for n, i in label_dict.items() if i == label_id), None)
        reason = (
            f"it is taken by '{owner}'"
            if owner
            else f"ids must lie in 1..{MAX_LABEL} and not be {BODY_LABEL}"
        )
        raise InputError(f"cannot give id {label_id} to '{name}': {reason}")
    hosts = dict(getattr(label_dict, "hosts", {}))
    if host:
        unknown = [h for h in host if h not in label_dict or is_dummy(h)]
        if unknown:
            raise InputError(
                f"host {', '.join(map(repr, unknown))} of '{name}' is not a class of the dictionary"
            )
        hosts[name] = tuple(dict.fromkeys(host))
    out = {n: i for n, i in label_dict.items() if i != label_id}  # drops the dummy slot, if that is the id
    out[name] = label_id
    hosts = {n: h for n, h in hosts.items() if n in out and all(x in out for x in h)}
    return LabelDict(dict(sorted(out.items(), key=lambda item: item[1])), hosts), label_id
