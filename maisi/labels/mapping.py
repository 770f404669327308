"""Remap a mask from another label vocabulary (e.g. TotalSegmentator) to MAISI ids.

A mapping file lists every source class and the MAISI class name it becomes (or null)::

    {"description": "...", "source": "...",
     "mapping": [{"source_id": 5, "source_name": "liver", "target": "liver"},
                 {"source_id": 91, "source_name": "skull", "target": null, "note": "why"}]}

Built-in mappings ship in ``maisi/resources/mappings/`` and are named without the ``.json`` suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from maisi.config.loader import read_json
from maisi.errors import ConfigError, InputError

BUILTIN_ALIASES = {"totalsegmentator": "totalsegmentator_total_v2"}


@dataclass(frozen=True)
class LabelMapping:
    """Source id -> MAISI id (None: no MAISI class), with names and notes for the report."""

    name: str
    targets: dict[int, int | None]
    target_names: dict[int, str | None]
    source_names: dict[int, str]
    notes: dict[int, str]


@dataclass(frozen=True)
class RemapReport:
    """What a remap did: voxels per mapped class, and every source class present that had no target."""

    mapped: dict[str, int]  # "source name -> target name": voxels
    unmapped: dict[str, int]  # "source name (id N): why": voxels set to background
    unknown_ids: dict[int, int]  # id absent from the mapping: voxels set to background

    @property
    def complete(self) -> bool:
        return not self.unmapped and not self.unknown_ids

    def lines(self) -> list[str]:
        out = [f"mapped   {k}: {v} voxels" for k, v in self.mapped.items()]
        out += [f"UNMAPPED {k}: {v} voxels set to 0" for k, v in self.unmapped.items()]
        out += [
            f"UNKNOWN  id {k} (not in the mapping): {v} voxels set to 0" for k, v in self.unknown_ids.items()
        ]
        return out


def builtin_mappings() -> list[str]:
    folder = resources.files("maisi.resources").joinpath("mappings")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def _mapping_path(name_or_path: str) -> Path:
    name = BUILTIN_ALIASES.get(name_or_path, name_or_path)
    if name in builtin_mappings():
        return Path(str(resources.files("maisi.resources").joinpath("mappings", f"{name}.json")))
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join([*BUILTIN_ALIASES, *builtin_mappings()])
        raise InputError(f"mapping '{name_or_path}' is neither a built-in mapping ({known}) nor a file")
    return path


def load_mapping(name_or_path: str, label_dict: dict[str, int]) -> LabelMapping:
    """Load a mapping and resolve its target names through ``label_dict``.

    Raises:
        InputError: unreadable file, wrong structure, duplicate source ids, or target names that are not
            in the label dictionary (all listed at once).
    """
    path = _mapping_path(name_or_path)
    data = read_json(path)
    entries = data.get("mapping") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(str(path), ["$.mapping: expected a list of {source_id, source_name, target}"])
    problems: list[str] = []
    targets: dict[int, int | None] = {}
    target_names: dict[int, str | None] = {}
    names: dict[int, str] = {}
    notes: dict[int, str] = {}
    for i, entry in enumerate(entries):
        where = f"$.mapping[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("source_id"), int):
            problems.append(f"{where}: expected an object with an integer source_id")
            continue
        sid, target = entry["source_id"], entry.get("target")
        if sid in targets:
            problems.append(f"{where}: source_id {sid} appears more than once")
        if target is not None and target not in label_dict:
            problems.append(f"{where}: target '{target}' is not a class of the label dictionary")
        targets[sid] = label_dict.get(target) if target is not None else None
        target_names[sid] = target
        names[sid] = str(entry.get("source_name", sid))
        notes[sid] = str(entry.get("note", "no MAISI class"))
    if problems:
        raise ConfigError(str(path), problems)
    return LabelMapping(path.name.removesuffix(".json"), targets, target_names, names, notes)


def remap(mask: np.ndarray, mapping: LabelMapping) -> tuple[np.ndarray, RemapReport]:
    """Translate source ids to MAISI ids; classes without a target become background and are reported.

    Returns:
        The remapped mask (uint8, same shape) and the report.
    """
    ids, counts = np.unique(mask, return_counts=True)
    if ids.size and ids.min() < 0:
        raise InputError(f"mask holds negative labels ({int(ids.min())}); labels must be >= 0")
    lookup = np.zeros(int(ids.max()) + 1 if ids.size else 1, dtype=np.uint8)
    mapped: dict[str, int] = {}
    unmapped: dict[str, int] = {}
    unknown: dict[int, int] = {}
    for sid, count in zip(ids.tolist(), counts.tolist()):
        if sid == 0:
            continue
        if sid not in mapping.targets:
            unknown[sid] = count
        elif mapping.targets[sid] is None:
            unmapped[f"{mapping.source_names[sid]} (id {sid}): {mapping.notes[sid]}"] = count
        else:
            lookup[sid] = mapping.targets[sid]
            mapped[f"{mapping.source_names[sid]} -> {mapping.target_names[sid]}"] = count
    return lookup[mask], RemapReport(mapped, unmapped, unknown)
