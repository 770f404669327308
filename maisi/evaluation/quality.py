"""Is a CT plausible, and does it follow its mask? The HU check and the mask-fidelity measures.

- HU check (as MAISI's): for each checked organ present in the mask, the median HU inside it must lie in
  [min(sigma_6_low, percentile_0_5), max(sigma_6_high, percentile_99_5)] of MAISI's reference statistics
  (``maisi/resources/maisi_image_median_statistics_ct.json``). MAISI's own organ list repeats lung lobe 31
  and drops lobe 32; here all five lobes count.
- Mask fidelity: Dice between what HU thresholds can see and the mask (lungs below -400 HU inside the
  body, bone above 250 HU, body versus air), and the median/IQR HU of every labelled structure. On real CT
  these numbers are the bar synthetic CT is measured against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from maisi.data.io import Volume, require_same_grid
from maisi.errors import InputError
from maisi.labels.envelope import body_envelope
from maisi.resources import load_json

_VERTEBRAE = tuple(range(33, 57)) + (127,)  # L5 .. C1, S1
_RIBS = tuple(range(63, 87))
_LIMBS_AND_GIRDLES = tuple(range(87, 98))  # humeri, scapulae, claviculae, femurs, hips, sacrum
BONE_LABELS = _VERTEBRAE + _RIBS + _LIMBS_AND_GIRDLES + (120, 122)  # + skull, sternum
LUNG_LABELS = (28, 29, 30, 31, 32)
ORGAN_LABELS: dict[str, tuple[int, ...]] = {
    "liver": (1,),
    "spleen": (3,),
    "pancreas": (4,),
    "kidney": (5, 14),
    "lung": LUNG_LABELS,
    "bone": BONE_LABELS,
    "brain": (22,),
}
LUNG_THRESHOLD_HU = -400.0
BONE_THRESHOLD_HU = 250.0
MIN_VOXELS = 10  # organs smaller than this are not judged (a median of a few voxels means little)


def reference_ranges() -> dict[str, tuple[float, float]]:
    """Accepted median-HU range of each checked organ, from MAISI's statistics."""
    stats = load_json("maisi_image_median_statistics_ct.json")
    return {
        organ: (min(s["sigma_6_low"], s["percentile_0_5"]), max(s["sigma_6_high"], s["percentile_99_5"]))
        for organ, s in stats.items()
    }


@dataclass(frozen=True)
class OrganCheck:
    organ: str
    voxels: int
    median_hu: float
    low: float
    high: float

    @property
    def passed(self) -> bool:
        return self.low <= self.median_hu <= self.high


@dataclass(frozen=True)
class HUCheck:
    """The HU check of one CT: every organ judged, and which failed.

    ``passed`` is None ("not checked") when no checked organ is in the mask: nothing was judged, so
    nothing passed; ``reason`` then says why.
    """

    organs: tuple[OrganCheck, ...]
    asked: tuple[str, ...] = tuple(ORGAN_LABELS)

    @property
    def passed(self) -> bool | None:
        if not self.organs:
            return None
        return all(o.passed for o in self.organs)

    @property
    def failed(self) -> list[str]:
        return [o.organ for o in self.organs if not o.passed]

    @property
    def reason(self) -> str | None:
        """Why the check judged nothing (None when it judged at least one organ)."""
        if self.organs:
            return None
        organs = ", ".join(self.asked)
        return f"no checked organ ({organs}) has {MIN_VOXELS} or more voxels in the mask"

    def to_json(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "passed": self.passed,
            "failed": self.failed,
            "organs": {o.organ: {**asdict(o), "passed": o.passed} for o in self.organs},
        }
        if self.reason is not None:
            report["reason"] = self.reason
        return report


def hu_check(ct: Volume, mask: Volume, organs: list[str] | None = None) -> HUCheck:
    """Median HU of each checked organ present in ``mask`` against MAISI's reference ranges.

    Args:
        ct: CT in HU.
        mask: MAISI-id label mask on the CT's grid.
        organs: organs to check (default: all of ``ORGAN_LABELS``).

    Raises:
        InputError: different grids, or an unknown organ name.
    """
    require_same_grid(ct, mask)
    names = organs if organs is not None else list(ORGAN_LABELS)
    unknown = [o for o in names if o not in ORGAN_LABELS]
    if unknown:
        raise InputError(f"unknown organ(s) {unknown}; the HU check knows {list(ORGAN_LABELS)}")
    ranges = reference_ranges()
    results = []
    for organ in names:
        inside = np.isin(mask.array, ORGAN_LABELS[organ])
        count = int(inside.sum())
        if count >= MIN_VOXELS:
            low, high = ranges[organ]
            results.append(OrganCheck(organ, count, float(np.median(ct.array[inside])), low, high))
    return HUCheck(tuple(results), tuple(names))


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean arrays; None when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


def mask_fidelity(ct: Volume, mask: Volume) -> dict[str, float | None]:
    """Dice between HU-threshold segmentations and the mask, for what thresholds can see.

    - ``body``: the CT's body envelope (tissue above -800 HU, largest component, holes such as the lungs
      filled; see :func:`maisi.labels.envelope.body_envelope`) versus every labelled voxel;
    - ``lung``: CT below -400 HU inside the labelled body, in the axial slices that hold lung labels (bowel
      gas further down would otherwise count), versus the lung lobes;
    - ``bone``: CT above 250 HU versus the bone labels (marrow below 250 HU keeps this one moderate).
    A measure is None when the mask has no such structure (nothing to judge).
    """
    require_same_grid(ct, mask)
    hu, labels = ct.array, mask.array
    body = labels > 0
    lungs = np.isin(labels, LUNG_LABELS)
    lung_slices = np.zeros_like(body)
    lung_slices[:, :, np.flatnonzero(lungs.any(axis=(0, 1)))] = True
    bones = np.isin(labels, BONE_LABELS)
    return {
        "body": dice(body_envelope(ct), body) if body.any() else None,
        "lung": dice((hu < LUNG_THRESHOLD_HU) & body & lung_slices, lungs) if lungs.any() else None,
        "bone": dice(hu > BONE_THRESHOLD_HU, bones) if bones.any() else None,
    }


def label_hu_table(ct: Volume, mask: Volume, label_dict: dict[str, int]) -> dict[str, dict[str, float]]:
    """Median and interquartile range of HU for every label present (named through ``label_dict``)."""
    require_same_grid(ct, mask)
    names = {i: n for n, i in label_dict.items()}
    table = {}
    for label in np.unique(mask.array):
        if label == 0:
            continue
        values = ct.array[mask.array == label]
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        table[names.get(int(label), f"label {int(label)}")] = {
            "id": int(label),
            "voxels": int(values.size),
            "median_hu": float(median),
            "iqr_hu": float(q3 - q1),
        }
    return table
