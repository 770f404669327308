"""The size vector of MAISI's mask generation: the size table, the snap to it, and a measurable size scale.

**Slots.** 10 fixed slots, MAISI's order: gallbladder, liver, stomach, pancreas, colon, lung tumor,
pancreatic tumor, hepatic tumor, colon cancer primaries, bone lesion (:data:`SIZE_SLOTS`, MAISI ids
:data:`SLOT_IDS`). The mask diffusion UNet reads the vector through cross-attention (``cross_attention_dim``
10).

**The size scale (our definition).** MAISI's code, docs and skills do not say how the sizes of its training
masks were computed (searched: NV-Generate-CTMR scripts, docs, skills; MONAI tutorials ``generation/maisi``),
so we define it, and store what it needs with the weights:

- the value of a slot is the **percentile rank** (0..1) of the organ's volume in mL among the volumes of
  that organ in the training masks (the *reference*, a JSON ``{"size_reference": {slot: [sorted mL]}}``);
- rank of a volume equal to the k-th smallest reference volume (0-based) is ``(k + 0.5) / n`` (mid-rank;
  tied volumes share the mean of their ranks); between two reference volumes it is linearly interpolated,
  so the scale is continuous and invertible (:func:`volume_for_size`); volumes below the smallest or above
  the largest get the end ranks (``0.5 / n`` and ``1 - 0.5 / n`` for distinct volumes);
- **-1** when the organ is absent (0 voxels).

A value asked of the generator therefore reads "a liver at the 80th percentile of the training livers", and
the achieved size of a generated mask is measured the same way (:func:`size_vector`).

**-1 in a request means absent, not "don't care".** MAISI's ``prepare_anatomy_size_condition``
(NV-Generate-CTMR ``scripts/sample.py``) skips only the slots the user did not name when it measures the L1
distance to the table's rows; a named -1 counts like any other value (``|-1 - row value|``), so it pulls the
snap towards rows where that slot is -1 (absent), and the -1 is then written into the conditioning vector.
Its post-processing treats every tumour slot that is not -1 as the target tumour and turns the other tumours
into their host organ, i.e. a -1 tumour is removed. (Its skill file calls -1 "no preference"; the code does
not treat it so.) Slots the user does not name take the snapped row's values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maisi.config.loader import read_json
from maisi.config.size_request import (
    ABSENT,
    SIZE_SLOTS,
    SLOT_IDS,
    TUMOUR_SLOTS,
    size_request_problems,
    slot_index,
)
from maisi.errors import InputError

__all__ = [
    "ABSENT",
    "SIZE_SLOTS",
    "SLOT_IDS",
    "TUMOUR_SLOTS",
    "SizeSnap",
    "build_size_reference",
    "check_reference_covers",
    "load_size_reference",
    "load_size_table",
    "organ_volumes_ml",
    "reference_json",
    "size_of_volume",
    "size_request_problems",
    "size_vector",
    "snap_to_table",
    "target_tumour_id",
    "volume_for_size",
]

SizeReference = dict[str, np.ndarray]  # slot name -> sorted reference volumes, mL


# ------------------------------------------------------------------------------------------- size table


def load_size_table(path: str | Path, width: int = len(SIZE_SLOTS)) -> np.ndarray:
    """Read MAISI's ``all_anatomy_size_conditions.json``: a list of ``{"organ_size": [10 floats]}``.

    Args:
        path: the table.
        width: the row width expected: the ``cross_attention_dim`` of the mask diffusion checkpoint (10 for
            MAISI's); a table of another width "does not match the checkpoint".

    Returns:
        The rows, shape (N, width), float64.

    Raises:
        InputError: unreadable or not JSON, not a non-empty list of such objects, a row of another width, or
            a non-finite value; the message names the file and the row.
    """
    data = read_json(path)  # refuses NaN / Infinity literals, naming their JSON path
    if not isinstance(data, list) or not data:
        raise InputError(f'{path}: a size table is a non-empty list of {{"organ_size": [...]}} objects')
    rows = []
    for i, item in enumerate(data):
        here = f"{path}: row {i} ($[{i}].organ_size)"
        values = item.get("organ_size") if isinstance(item, dict) else None
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise InputError(f"{here}: expected a list of numbers, got {json_preview(item)}")
        if len(values) != width:
            whose = "the size slots" if width == len(SIZE_SLOTS) else "the checkpoint's cross_attention_dim"
            raise InputError(
                f"{here}: {len(values)} values, expected {width} ({whose}); the table does not match "
                "the mask diffusion checkpoint"
            )
        row = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(row)):
            raise InputError(f"{here}: non-finite value {values}")
        rows.append(row)
    return np.stack(rows)


def json_preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class SizeSnap:
    """The conditioning vector of a size request.

    Attributes:
        row: index of the nearest table row.
        distance: its L1 distance to the request over the named slots.
        snapped: that row as it is in the table (10 floats).
        final: the row with the named slots overwritten by the request: what the generator is given.
    """

    row: int
    distance: float
    snapped: tuple[float, ...]
    final: tuple[float, ...]


def snap_to_table(request: Sequence[tuple[str, float]], table: np.ndarray) -> SizeSnap:
    """MAISI's snap: the table row nearest to the request (L1 over the named slots), then the named values.

    A named -1 is a value like any other (see the module docstring); ties go to the first row (MAISI sorts
    stably). The request must be valid (:func:`size_request_problems`).

    Args:
        request: ``(name, size)`` pairs.
        table: shape (N, 10), from :func:`load_size_table`.
    """
    problems = size_request_problems(request)
    if problems:
        raise InputError(problems[0])
    index = [slot_index(name) for name, _ in request]
    wanted = np.asarray([float(size) for _, size in request], dtype=np.float64)
    distances = np.abs(table[:, index] - wanted).sum(axis=1) if index else np.zeros(len(table))
    row = int(np.argmin(distances))  # first of equal minima
    final = table[row].copy()
    final[index] = wanted
    return SizeSnap(row, float(distances[row]), tuple(map(float, table[row])), tuple(map(float, final)))


def target_tumour_id(vector: Sequence[float]) -> int | None:
    """MAISI id of the tumour the generated mask keeps: the tumour slot whose size is not -1 (MAISI takes the
    last such slot); ``None`` when every tumour slot is -1."""
    target = None
    for name in TUMOUR_SLOTS:
        if float(vector[slot_index(name)]) != ABSENT:
            target = SLOT_IDS[slot_index(name)]
    return target


# --------------------------------------------------------------------------------------------- size scale


def organ_volumes_ml(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Volume of each size slot's organ in a mask in MAISI ids.

    Args:
        mask: integer labels, shape (X, Y, Z).
        spacing: voxel size in mm, 3 values.

    Returns:
        Shape (10,), mL, in slot order; 0 for an absent organ.
    """
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    counts = np.asarray([np.count_nonzero(mask == label) for label in SLOT_IDS], dtype=np.float64)
    return counts * voxel_ml


def _knots(volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct reference volumes and their mid-ranks (ties share the mean rank)."""
    unique, counts = np.unique(volumes, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return unique, (below + counts / 2.0) / len(volumes)


def _reference_for(reference: Mapping[str, np.ndarray], slot: str) -> np.ndarray:
    volumes = np.asarray(reference.get(slot, ()), dtype=np.float64)
    if volumes.size == 0:
        raise InputError(
            f"the size reference has no volumes of '{slot}': a size cannot be given to a {slot} "
            "(build the reference from masks that hold one)"
        )
    return volumes


def size_of_volume(slot: str, volume_ml: float, reference: Mapping[str, np.ndarray]) -> float:
    """The size (0..1) of one organ volume on the scale of ``reference``; -1 for 0 mL (absent)."""
    if volume_ml <= 0:
        return ABSENT
    knots, ranks = _knots(_reference_for(reference, slot))
    return float(np.interp(volume_ml, knots, ranks))


def size_vector(
    mask: np.ndarray, spacing: Sequence[float], reference: Mapping[str, np.ndarray]
) -> list[float]:
    """The 10 sizes of a mask: each present organ's percentile rank among the reference volumes, -1 if absent.

    Args:
        mask: integer labels in MAISI ids, shape (X, Y, Z).
        spacing: voxel size in mm.
        reference: slot name -> reference volumes in mL (:func:`load_size_reference`).

    Raises:
        InputError: an organ is present whose slot has no reference volume.
    """
    volumes = organ_volumes_ml(mask, spacing)
    return [size_of_volume(slot, float(v), reference) for slot, v in zip(SIZE_SLOTS, volumes)]


def volume_for_size(slot: str, value: float, reference: Mapping[str, np.ndarray]) -> float:
    """The inverse of :func:`size_of_volume`: the volume in mL that a size stands for (0 for -1, absent).

    Sizes below (above) the smallest (largest) reference rank give the smallest (largest) reference volume.
    """
    if slot not in SIZE_SLOTS:
        raise InputError(f"unknown size slot {slot!r} (the size slots: {', '.join(SIZE_SLOTS)})")
    if value == ABSENT:
        return 0.0
    if not 0.0 <= value <= 1.0:
        raise InputError(f"size {value} of {slot!r} is outside [0, 1] and not -1 (absent)")
    knots, ranks = _knots(_reference_for(reference, slot))
    return float(np.interp(value, ranks, knots))


# ------------------------------------------------------------------------------------ the reference file


def check_reference_covers(
    reference: Mapping[str, np.ndarray], request: Sequence[tuple[str, float]], path: str | Path
) -> None:
    """Refuse a reference that has no volume of an organ the request gives a size (not -1).

    Such a reference cannot be the scale the request is on (it was built from masks without that organ),
    and the achieved size of the organ could not be measured on it.

    Raises:
        InputError: naming the config key, the file, the slot and the request entry.
    """
    for i, (name, size) in enumerate(request):
        if size != ABSENT and len(reference.get(name, ())) == 0:
            raise InputError(
                f"$.anatomy.mask_generator.size_reference: {path} has no volume of {name!r} "
                f"($.size_reference.{name} is empty), but $.anatomy.controllable_anatomy_size[{i}] gives it "
                f"the size {size:g}: the reference is not the scale of this request (build it from masks "
                f"that hold a {name}: python -m maisi.masks sizes --build-reference)"
            )


def build_size_reference(volumes: np.ndarray) -> SizeReference:
    """The reference of a set of masks: per slot, the sorted volumes (mL) of the masks that hold the organ.

    Args:
        volumes: shape (N, 10), from :func:`organ_volumes_ml` of each mask.
    """
    volumes = np.asarray(volumes, dtype=np.float64).reshape(-1, len(SIZE_SLOTS))
    return {slot: np.sort(volumes[:, i][volumes[:, i] > 0]) for i, slot in enumerate(SIZE_SLOTS)}


def reference_json(reference: Mapping[str, np.ndarray], description: str) -> dict[str, Any]:
    """The JSON stored with the weights: ``{"description", "size_reference": {slot: [sorted mL]}}``, full
    precision (ranks from the file equal ranks from memory)."""
    return {
        "description": description,
        "size_reference": {s: [float(v) for v in np.sort(reference[s])] for s in SIZE_SLOTS},
    }


def load_size_reference(path: str | Path) -> SizeReference:
    """Read a size reference written by :func:`reference_json` (``python -m maisi.masks sizes``).

    Raises:
        InputError: naming the file and the key: not such an object, a slot missing or unknown, a volume
            that is not a positive finite number.
    """
    data = read_json(path)
    table = data.get("size_reference") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise InputError(f"{path}: expected an object with a 'size_reference' object (slot -> [mL, ...])")
    unknown = sorted(set(table) - set(SIZE_SLOTS))
    missing = [s for s in SIZE_SLOTS if s not in table]
    if unknown or missing:
        raise InputError(
            f"{path}: $.size_reference must name each of the 10 size slots once (unknown: {unknown}, "
            f"missing: {missing}; the slots: {', '.join(SIZE_SLOTS)})"
        )
    reference: SizeReference = {}
    for slot in SIZE_SLOTS:
        values = table[slot]
        ok = isinstance(values, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values
        )
        if not ok:
            raise InputError(f"{path}: $.size_reference.{slot}: expected a list of volumes in mL (> 0)")
        reference[slot] = np.sort(np.asarray(values, dtype=np.float64))
    return reference
