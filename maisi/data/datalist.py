"""KiTS-style JSON datalists: build them from a folder, validate them, split them by fold.

A datalist is ``{"training": [{"image", "label", "dim", "spacing", "top_region_index",
"bottom_region_index", "modality", "fold"}, ...]}`` with paths relative to a data root (by default the
datalist's own folder). Fold semantics: items whose ``fold`` equals the configured fold are the
VALIDATION set; all others train.
"""

from __future__ import annotations

import fnmatch
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from maisi.atomic import write_json
from maisi.config.loader import read_json
from maisi.config.schema import load_schema, schema_errors
from maisi.data.io import read_geometry, read_mask
from maisi.data.latents import encoded_relpaths
from maisi.errors import ConfigError, InputError
from maisi.labels import labels_not_in_dict
from maisi.options import BODY_REGIONS

SPACING_RTOL = 1e-3


def data_root(datalist: str | Path, configured: str | Path | None) -> Path:
    """Where a datalist's relative paths start: the configured data root, else the datalist's own folder."""
    return Path(configured) if configured else Path(datalist).parent


def read_datalist(path: str | Path) -> dict[str, Any]:
    """Parse and schema-check a datalist; every schema error is reported with its JSON path."""
    data = read_json(Path(path))
    errors = schema_errors(data, load_schema("datalist"))
    if errors:
        raise ConfigError(str(path), errors)
    return data


def case_modality(entry: dict[str, Any], default: str) -> str:
    """A case's modality name: its datalist entry's ``modality``, else ``default`` (the config's)."""
    value = entry.get("modality")
    return value if isinstance(value, str) and value else default


def _glob_regex(pattern: str) -> re.Pattern:
    """Regex for a glob whose ``*`` parts are captured: they form the case key that pairs images with
    labels."""
    parts = re.split(r"(\*\*/|\*)", pattern)
    regex = ""
    for part in parts:
        if part == "**/":
            regex += "((?:.*/)?)"
        elif part == "*":
            regex += "([^/]*)"
        else:
            regex += fnmatch.translate(part).removeprefix("(?s:").removesuffix(")\\Z")
    return re.compile(regex + r"\Z")


def find_cases(
    root: Path, image_glob: str, label_glob: str | None
) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """Pair images with labels by the text their globs' ``*`` match, e.g. ``*/imaging.nii.gz`` with
    ``*/segmentation.nii.gz``, or ``imagesTr/*_0000.nii.gz`` with ``labelsTr/*.nii.gz``.

    Returns:
        (image, label) pairs sorted by image path, and problems (images without label, labels without image).
    """

    def keyed(pattern: str) -> dict[tuple[str, ...], Path]:
        regex = _glob_regex(pattern)
        out = {}
        for path in sorted(root.glob(pattern)):
            match = regex.match(path.relative_to(root).as_posix())
            if match:
                out[match.groups()] = path
        return out

    images = keyed(image_glob)
    if not images:
        raise InputError(f"no image matches '{image_glob}' under {root}")
    if label_glob is None:
        return [(p, None) for p in images.values()], []
    labels = keyed(label_glob)
    problems = [f"{p}: no label matches '{label_glob}' for it" for k, p in images.items() if k not in labels]
    problems += [
        f"{p}: label without an image matching '{image_glob}'" for k, p in labels.items() if k not in images
    ]
    return [(p, labels[k]) for k, p in images.items() if k in labels], problems


def split_folds(count: int, num_folds: int, seed: int) -> list[int]:
    """Fold of each of ``count`` cases: a seeded shuffle dealt round-robin, so fold sizes differ by <= 1."""
    if num_folds < 1:
        raise InputError(f"number of folds must be >= 1, got {num_folds}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    folds = [0] * count
    for rank, index in enumerate(order):
        folds[index] = rank % num_folds
    return folds


def one_hot(region: str) -> list[int]:
    return [int(r == region) for r in BODY_REGIONS]


def describe_case(
    image: Path, label: Path | None, label_dict: dict[str, int]
) -> tuple[dict[str, Any], list[str]]:
    """Header facts of one case (dim, spacing, body regions from the label) and its problems."""
    shape, affine = read_geometry(image)
    spacing = [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)]
    entry: dict[str, Any] = {"dim": list(shape), "spacing": spacing}
    problems: list[str] = []
    if label is not None:
        mask = read_mask(label)
        if mask.shape != shape or not np.allclose(mask.affine, affine, atol=1e-3):
            problems.append(
                f"{label}: grid {list(mask.shape)} at {np.round(mask.spacing, 4).tolist()} mm differs "
                f"from its image {image} ({list(shape)} at {spacing} mm) or is placed elsewhere"
            )
        unknown = labels_not_in_dict(mask.array, label_dict)
        if unknown:
            problems.append(
                f"{label}: labels not in the label dictionary: {unknown[:20]} (remap it to MAISI ids)"
            )
        from maisi.conditioning import body_region_from_mask  # imports torch: only when masks are read

        regions = body_region_from_mask(mask.array)
        if regions is not None:
            entry["top_region_index"], entry["bottom_region_index"] = one_hot(regions[0]), one_hot(regions[1])
    return entry, problems


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def build_datalist(
    root: str | Path,
    image_glob: str,
    label_glob: str | None,
    output: str | Path,
    label_dict: dict[str, int],
    num_folds: int = 5,
    seed: int = 0,
    modality: str = "ct",
) -> dict[str, Any]:
    """Walk ``root``, describe every case, assign folds; paths are written relative to ``output``'s folder.

    Raises:
        InputError: listing every problem found (nothing is written by this function).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data root {root} is not a folder")
    pairs, problems = find_cases(root, image_glob, label_glob)
    base = Path(output).parent
    entries = []
    for (image, label), fold in zip(pairs, split_folds(len(pairs), num_folds, seed)):
        try:
            facts, case_problems = describe_case(image, label, label_dict)
        except InputError as e:
            problems.append(str(e))
            continue
        problems += case_problems
        entry = {"image": _relative(image, base), "label": _relative(label, base) if label else None}
        entries.append({**entry, **facts, "modality": modality, "fold": fold})
    if problems:
        raise InputError(
            f"cannot build a datalist from {root} ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    return {"description": f"built from {root} ({image_glob}, {label_glob})", "training": entries}


def _fold_problems(entries: list[dict[str, Any]], num_folds: int | None) -> list[str]:
    folds = [e.get("fold") for e in entries]
    if all(f is None for f in folds):
        return []
    missing = [i for i, f in enumerate(folds) if f is None]
    if missing:
        return [f"$.training[{missing[0]}].fold: missing while other cases have one ({len(missing)} without)"]
    present = sorted(set(folds))
    expected = list(range(num_folds if num_folds is not None else max(present) + 1))
    problems = [
        f"$.training[*].fold: fold {f} is outside 0..{len(expected) - 1}"
        for f in present
        if f not in expected
    ]
    problems += [
        f"$.training[*].fold: fold {f} has no case (its validation set would be empty)"
        for f in expected
        if f not in present
    ]
    if len(present) == 1 and len(entries) > 1:
        problems.append(
            f"$.training[*].fold: every case is in fold {present[0]}: with that fold nothing trains"
        )
    return problems


def _duplicates_and_collisions(entries: list[dict[str, Any]], root: Path) -> list[str]:
    """Images listed twice (compared as resolved paths: ``./a`` is ``a``), and different images that
    ``maisi.encode`` would encode to one latent (``c3/ct.nii.gz`` and ``c3/ct.nrrd``)."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    latents: dict[Path, int] = {}
    for i, entry in enumerate(entries):
        image = str((root / entry["image"]).resolve())
        if image in seen:
            problems.append(f"$.training[{i}].image: '{entry['image']}' is also case {seen[image]}")
            continue
        seen[image] = i
        latent = encoded_relpaths(entry["image"])[0]
        if latent in latents:
            j = latents[latent]
            first = entries[j]["image"]
            problems.append(
                f"$.training[{i}].image: '{entry['image']}' and case {j} ('{first}') would both "
                f"be encoded to <output_dir>/{latent.as_posix()} (rename one)"
            )
        latents.setdefault(latent, i)
    return problems


def validate_datalist(
    data: dict[str, Any], root: str | Path, label_dict: dict[str, int], num_folds: int | None = None
) -> list[str]:
    """Every problem of a (schema-valid) datalist: duplicates, encode collisions, files, grids, labels, header
    facts, folds."""
    root = Path(root)
    problems = _duplicates_and_collisions(data["training"], root)
    for i, entry in enumerate(data["training"]):
        where = f"$.training[{i}]"
        image = root / entry["image"]
        label = root / entry["label"] if entry.get("label") else None
        missing = [p for p in (image, label) if p is not None and not p.exists()]
        if missing:
            problems += [f"{where}: file not found: {p}" for p in missing]
            continue
        try:
            facts, case_problems = describe_case(image, label, label_dict)
        except InputError as e:
            problems.append(f"{where}: {e}")
            continue
        problems += [f"{where}: {p}" for p in case_problems]
        if "dim" in entry and list(entry["dim"]) != facts["dim"]:
            problems.append(f"{where}.dim: {entry['dim']} but the header says {facts['dim']}")
        if "spacing" in entry and not np.allclose(entry["spacing"], facts["spacing"], rtol=SPACING_RTOL):
            problems.append(f"{where}.spacing: {entry['spacing']} but the header says {facts['spacing']}")
        for key in ("top_region_index", "bottom_region_index"):
            if key in entry and key in facts and list(entry[key]) != facts[key]:
                problems.append(f"{where}.{key}: {entry[key]} but the label implies {facts[key]}")
    return problems + _fold_problems(data["training"], num_folds)


def split_by_fold(
    data: dict[str, Any], fold: int | None
) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """(training, validation) as (index in the datalist, entry) pairs: cases whose ``fold`` equals ``fold``
    validate, the others train; ``fold`` None trains on every case.

    Raises:
        InputError: when either side would be empty (naming ``$.fold``).
    """
    entries = list(enumerate(data["training"]))
    if fold is None:
        return entries, []
    train = [(i, e) for i, e in entries if e.get("fold") != fold]
    val = [(i, e) for i, e in entries if e.get("fold") == fold]
    if not val:
        raise InputError(f"$.fold: no case has fold {fold}: the validation set would be empty")
    if not train:
        raise InputError(f"$.fold: every case has fold {fold}: the training set would be empty")
    return train, val


def write_datalist(path: str | Path, data: dict[str, Any]) -> Path:
    """Schema-check and write a datalist atomically."""
    errors = schema_errors(data, load_schema("datalist"))
    if errors:
        raise ValueError(f"refusing to write an invalid datalist: {errors[:3]}")
    return write_json(path, data)
