"""MAISI's clean-up of a generated mask (its ``general_mask_generation_post_process``), on numpy + scipy.

The steps, in MAISI's order (NV-Generate-CTMR ``scripts/utils.py``); every morphological operation uses the
3x3x3 cube and treats outside the volume as background, as MAISI's padded erode/dilate do:

1. **body**: erode the foreground, keep its largest component, dilate back; everything outside is background;
2. **tumours**: every tumour that is not the target becomes its host (liver, pancreas, colon, body for bone;
   a lung tumour the lobe most common around it, where MAISI always writes lobe 28); the target tumour is
   closed twice and, except for hepatic tumour and bone lesion, only its largest component kept (the rest
   becomes body);
3. **organs**: each main organ (liver, pancreas, gallbladder, stomach, spleen, lung lobes, kidneys, duodenum,
   aorta, vena cava, adrenals, and the vertebrae unless the target is a bone lesion) keeps its largest
   component, the rest becomes body;
4. **bowel**: stomach, duodenum, small bowel and colon together keep their largest component; small-bowel and
   colon voxels outside it become body;
5. **fills**: each main organ is closed (its holes filled with itself), in MAISI's order, in which the
   gallbladder comes twice: again after the adrenals, so it takes back what the organs closed after it took;
6. **per target**: lung tumour 23 (the lobe around it fills the ring the clean-up opened; removed voxels next
   to the tumour return to it; the lobes are closed), hepatic tumour 26 (liver and spleen refill removed
   voxels next to them, the tumour refills removed voxels next to it, the liver complex keeps its largest
   component, the liver is closed), colon tumour 27 (the tumour refills removed voxels next to it), kidney
   tumour 129 (the kidneys are closed; MAISI's generator never targets 129, its dictionary calls it dummy6);
7. hepatic vessel 25 becomes liver, airway 132 and the target tumour are restored.

The input is a mask as the generator makes it: organs inside a body envelope (200). Step 1 keeps the largest
piece of foreground, so a mask without the envelope (only organs) loses every organ but the largest piece.

Where we differ from MAISI, on purpose: "largest component" is the largest (MAISI keeps the two largest
components when a label fills more than half of the volume, a side effect of counting the background as a
component); the liver complex of step 6 is hepatic tumour, vessel and liver together (MAISI's test
``tumour + vessel + liver > 1`` is never true for one-label voxels, so its step does nothing but empty its
record of the target tumour, and the liver fill then eats a small tumour: the restore of step 7 finds
nothing to restore); vessel and airway are restored inside the body only (MAISI restores them everywhere,
bringing back pieces step 1 removed outside the body); a non-target lung tumour becomes the lobe most
common around each of its pieces (MAISI writes lobe 28, left upper, wherever the tumour is: a piece away
from that lobe is then a stray component that step 3 turns into body, a hole in the lung); a target lung
tumour with no labelled voxel around it skips the lobe refill (MAISI's mode of nothing raises).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from maisi.masks.tumours import (
    BODY,
    COLON,
    COLON_TUMOUR,
    HEPATIC_TUMOUR,
    LIVER,
    LUNG_LOBES,
    LUNG_TUMOUR,
    RULES,
)

CUBE = np.ones((3, 3, 3), dtype=bool)  # MAISI's 3x3x3 erode / dilate kernel; also 26-connectivity
HEPATIC_VESSEL, AIRWAY, SPLEEN, STOMACH, DUODENUM, SMALL_BOWEL = 25, 132, 3, 12, 13, 19
KIDNEY_TUMOUR, KIDNEYS = 129, (5, 14)
TUMOURS = (LUNG_TUMOUR, 24, HEPATIC_TUMOUR, COLON_TUMOUR, 128)
KEEP_ALL_COMPONENTS = (HEPATIC_TUMOUR, 128)  # target tumours MAISI does not reduce to one component
# The organs whose stray components go: liver, pancreas, gallbladder, stomach, spleen, lung lobes, kidneys,
# duodenum, aorta, vena cava, adrenals; vertebrae C1-L5 and the rest of 33-59 unless the target is bone.
MAIN_ORGANS = (1, 4, 10, 12, 3, 28, 29, 30, 31, 32, 5, 14, 13, 6, 7, 8, 9)
SPINE = tuple(range(33, 60))
# MAISI's fill list names the gallbladder (10) twice, the second time after the adrenals
FILL_ORDER = (*MAIN_ORGANS, 10)
BOWEL = (STOMACH, DUODENUM, SMALL_BOWEL, COLON)
_HOSTS = {rule.tumour: rule.refill for rule in RULES}  # None: the lobe around a lung tumour


# ------------------------------------------------------------------------------------------ array helpers


def _box(binary: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The bounding box of ``binary`` grown by ``margin`` (clipped to the volume); None when it is empty."""
    axes = []
    for axis in range(binary.ndim):
        hit = np.flatnonzero(binary.any(axis=tuple(a for a in range(binary.ndim) if a != axis)))
        if hit.size == 0:
            return None
        axes.append(slice(max(hit[0] - margin, 0), min(hit[-1] + margin + 1, binary.shape[axis])))
    return tuple(axes)


def _dilated(binary: np.ndarray, times: int) -> np.ndarray:
    """``binary`` dilated ``times`` times by the cube (computed in its bounding box)."""
    out = np.zeros_like(binary, dtype=bool)
    box = _box(binary, times)
    if box is not None:
        out[box] = ndimage.binary_dilation(binary[box], CUBE, iterations=times)
    return out


def _closed(binary: np.ndarray, rounds: int = 2) -> np.ndarray:
    """MAISI's ``organ_fill_by_closing``: ``rounds`` x (dilate, erode), outside the volume is background.

    Computed in the bounding box grown by ``rounds + 1``: there the box's inner faces stay background through
    every round, so the result equals the whole-volume one (tested).
    """
    out = np.zeros_like(binary, dtype=bool)
    box = _box(binary, rounds + 1)
    if box is None:
        return out
    part = binary[box]
    for _ in range(rounds):
        part = ndimage.binary_erosion(ndimage.binary_dilation(part, CUBE), CUBE, border_value=0)
    out[box] = part
    return out


def _largest(binary: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``binary`` (the first of equal ones); empty stays empty."""
    out = np.zeros_like(binary, dtype=bool)
    box = _box(binary, 0)
    if box is None:
        return out
    labels, count = ndimage.label(binary[box], structure=CUBE)
    if count:
        sizes = np.bincount(labels.ravel())[1:]
        out[box] = labels == int(np.argmax(sizes)) + 1
    return out


def _mode(values: np.ndarray, among: tuple[int, ...]) -> int | None:
    """The most common of ``among`` in ``values`` (ties to the lower id); None when none occurs."""
    counts = [int(np.count_nonzero(values == v)) for v in among]
    return among[int(np.argmax(counts))] if max(counts, default=0) > 0 else None


def _lobe_around(data: np.ndarray, part: np.ndarray) -> int | None:
    """The lung lobe most common in the one-voxel ring around ``part``."""
    ring = _dilated(part, 1) & ~part
    return _mode(data[ring], LUNG_LOBES)


# ------------------------------------------------------------------------------------------------- steps


def _refine_body(data: np.ndarray) -> np.ndarray:
    """Step 1; returns the body mask it kept."""
    eroded = ndimage.binary_erosion(data > 0, CUBE, border_value=0)
    body = _dilated(_largest(eroded), 1)
    data[~body] = 0
    return body


def _tumours(data: np.ndarray, target: int | None) -> None:
    """Step 2: non-target tumours to their host; the target closed and (mostly) reduced to one component."""
    for tumour in TUMOURS:
        if tumour == target:
            for _ in range(2):  # MAISI fills by closing twice
                data[_closed(data == tumour)] = tumour
            continue
        host = _HOSTS.get(tumour, BODY)
        if host is not None:
            data[data == tumour] = host
            continue
        components, count = ndimage.label(data == tumour, structure=CUBE)
        for index in range(1, count + 1):
            part = components == index
            data[part] = (
                _lobe_around(data, part) or LUNG_LOBES[0]
            )  # MAISI's fixed choice when no lobe touches
    if target is not None and target not in KEEP_ALL_COMPONENTS:
        tumour = data == target
        data[tumour & ~_largest(tumour)] = BODY


def _organs(data: np.ndarray, organs: tuple[int, ...]) -> np.ndarray:
    """Step 3; returns where organ voxels were removed."""
    removed = np.zeros(data.shape, dtype=bool)
    for organ in organs:
        present = data == organ
        stray = present & ~_largest(present)
        data[stray] = BODY
        removed |= stray
    return removed


def _bowel(data: np.ndarray) -> np.ndarray:
    """Step 4; returns where small bowel and colon were removed."""
    bowel = np.isin(data, BOWEL)
    removed = np.isin(data, (SMALL_BOWEL, COLON)) & ~_largest(bowel)
    data[removed] = BODY
    return removed


def _fill_near(data: np.ndarray, label: int, region: np.ndarray) -> None:
    """MAISI's ``organ_fill_by_removed_mask``: ``label`` takes the voxels of ``region`` 3 voxels from it."""
    data[_dilated(data == label, 3) & region] = label


def _lung_tumour(data: np.ndarray, organ_removed: np.ndarray) -> None:
    tumour = data == LUNG_TUMOUR
    near = _dilated(tumour, 1)
    around = data[near & ~tumour]
    labels, counts = np.unique(around[around != 0], return_counts=True)
    # MAISI: the most common label around the tumour; only a lobe refills the ring (ties to the lower id)
    lobe = int(labels[np.argmax(counts)]) if labels.size else None
    if lobe in LUNG_LOBES:
        near = _dilated(near, 1)
        _fill_near(data, lobe, near & ~tumour)
    near = _dilated(near, 1)
    _fill_near(data, LUNG_TUMOUR, near & organ_removed)
    for lobe_id in LUNG_LOBES:
        for _ in range(3):
            data[_closed(data == lobe_id)] = lobe_id


def _hepatic_tumour(
    data: np.ndarray, organ_removed: np.ndarray, bowel_removed: np.ndarray, target_mask: np.ndarray
) -> None:
    for _ in range(2):
        _fill_near(data, LIVER, bowel_removed)
    for _ in range(2):
        _fill_near(data, SPLEEN, organ_removed)
    _fill_near(data, HEPATIC_TUMOUR, _dilated(data == HEPATIC_TUMOUR, 2) & organ_removed)
    complex_ = np.isin(data, (HEPATIC_TUMOUR, HEPATIC_VESSEL, LIVER))
    kept = _largest(complex_)
    data[complex_ & ~kept] = BODY
    target_mask &= kept
    for _ in range(3):
        data[_closed(data == LIVER)] = LIVER


def _colon_tumour(data: np.ndarray, organ_removed: np.ndarray) -> None:
    _fill_near(data, COLON_TUMOUR, _dilated(data == COLON_TUMOUR, 2) & organ_removed)


def _kidney_tumour(data: np.ndarray) -> None:
    for kidney in KIDNEYS:
        for _ in range(3):
            data[_closed(data == kidney)] = kidney


# -------------------------------------------------------------------------------------------------- entry


def postprocess_generated_mask(
    mask: np.ndarray, target_tumour: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Clean a generated mask (MAISI's post-processing; the module docstring lists the steps).

    Args:
        mask: integer labels in MAISI ids, shape (X, Y, Z); not modified.
        target_tumour: MAISI id of the requested tumour (23, 24, 26, 27, 128, or 129), None for none (see
            :func:`maisi.masks.sizes.target_tumour_id`).

    Returns:
        The cleaned mask (same shape and dtype) and a record for the sample's metadata:
        ``{"target_tumour", "changed_voxels": {step: voxels changed by it}}``.
    """
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {mask.shape}")
    if target_tumour is not None and target_tumour not in (*TUMOURS, KIDNEY_TUMOUR):
        raise ValueError(
            f"target_tumour {target_tumour}: expected one of {[*TUMOURS, KIDNEY_TUMOUR]} or None"
        )
    data = np.array(mask, copy=True)
    vessel, airway = data == HEPATIC_VESSEL, data == AIRWAY
    changed: dict[str, int] = {}

    def step(name: str, before: np.ndarray) -> None:
        changed[name] = int(np.count_nonzero(before != data))

    before = data.copy()
    body = _refine_body(data)
    step("body", before)

    before = data.copy()
    _tumours(data, target_tumour)
    step("tumours", before)
    target_mask = data == target_tumour if target_tumour is not None else np.zeros(data.shape, dtype=bool)

    before = data.copy()
    organ_removed = _organs(data, MAIN_ORGANS + (() if target_tumour == 128 else SPINE))
    step("organ_components", before)

    before = data.copy()
    bowel_removed = _bowel(data)
    step("bowel", before)

    before = data.copy()
    for organ in FILL_ORDER + (() if target_tumour == 128 else SPINE):
        data[_closed(data == organ)] = organ
    step("organ_fill", before)

    before = data.copy()
    if target_mask.any():
        if target_tumour == LUNG_TUMOUR:
            _lung_tumour(data, organ_removed)
        elif target_tumour == HEPATIC_TUMOUR:
            _hepatic_tumour(data, organ_removed, bowel_removed, target_mask)
        elif target_tumour == COLON_TUMOUR:
            _colon_tumour(data, organ_removed)
        elif target_tumour == KIDNEY_TUMOUR:
            _kidney_tumour(data)
    step("target_tumour_fill", before)

    before = data.copy()
    data[vessel & body] = LIVER  # MAISI's generator has no size control of vessels: they count as liver
    data[airway & body] = AIRWAY
    if target_tumour is not None:
        data[target_mask] = target_tumour
    step("vessel_airway_tumour_restore", before)
    return data, {"target_tumour": target_tumour, "changed_voxels": changed}
