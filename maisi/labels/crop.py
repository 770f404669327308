"""Crop a CT and its mask to a box centred on some labels (e.g. a lesion), on the native grid.

A finetune on a small lesion spends most of its compute on latent voxels far from it; a box around the lesion
keeps the anatomy that surrounds it and lets the case be encoded at a finer spacing, where the lesion spans
several latent voxels, for the same cost.
"""

from __future__ import annotations

import numpy as np

from maisi.data.io import Volume, require_same_grid
from maisi.errors import InputError


def crop_box(mask: Volume, label_ids: list[int], size_mm: tuple[float, float, float]) -> tuple[slice, ...]:
    """Voxel slices of a ``size_mm`` box centred on the voxels of ``label_ids``, shifted to lie in the volume.

    An axis shorter than the box is kept whole.

    Raises:
        InputError: none of ``label_ids`` is in the mask, or a size is not positive.
    """
    if any(s <= 0 for s in size_mm):
        raise InputError(f"--size-mm {list(size_mm)}: every size must be positive")
    hit = np.isin(mask.array, label_ids)
    if not hit.any():
        present = sorted(int(v) for v in np.unique(mask.array) if v)
        raise InputError(f"labels {label_ids} are not in the mask (it holds {present})")
    where = np.argwhere(hit)
    centre = (where.min(0) + where.max(0)) / 2.0
    box = []
    for c, mm, spacing, n in zip(centre, size_mm, mask.spacing, mask.shape):
        size = min(n, max(1, int(round(mm / spacing))))
        start = int(np.clip(round(c - (size - 1) / 2.0), 0, n - size))
        box.append(slice(start, start + size))
    return tuple(box)


def crop(volume: Volume, box: tuple[slice, ...]) -> Volume:
    """``volume`` cut to ``box``; the affine moves voxel 0 to the box's corner, so world positions are
    kept."""
    affine = volume.affine.copy()
    corner = np.array([s.start for s in box], dtype=np.float64)
    affine[:3, 3] = affine[:3, :3] @ corner + affine[:3, 3]
    return Volume(np.ascontiguousarray(volume.array[box]), affine)


def crop_pair(
    ct: Volume, mask: Volume, label_ids: list[int], size_mm: tuple[float, float, float]
) -> tuple[Volume, Volume]:
    """The CT and the mask cut to the same box around ``label_ids``.

    Raises:
        InputError: different grids, labels absent, or a non-positive size.
    """
    require_same_grid(ct, mask)
    box = crop_box(mask, label_ids, size_mm)
    return crop(ct, box), crop(mask, box)
