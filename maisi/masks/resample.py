"""Bring a label mask onto an output grid, as MAISI's inference does, and pad a mask to a size a preset takes.

MAISI (``ensure_output_size_and_spacing`` in NV-Generate-CTMR's ``scripts/sample.py``) resamples a retrieved
or generated mask with MONAI's ``Spacing(pixdim=spacing, mode="nearest")`` (the first voxel's centre stays
where it is) and then ``ResizeWithPadOrCrop(spatial_size=output_size)`` (centred; padding is background 0).
:func:`resample_mask` does exactly that, with the same MONAI transforms, on our RAS :class:`Volume` and keeps
the world geometry in the affine. :func:`pad_to_size` is the other way to fit a preset: no resampling, a
centred background border, and the box of the original voxels to crop the generated CT back to.

Cost on 2 CPU cores: 512 x 512 x 160 at 0.8 x 0.8 x 2 mm -> 512 x 512 x 256 at 0.9 x 0.9 x 1.25 mm takes
about 5 s and 2 GB (MONAI resamples in float32).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from maisi.data.io import Volume
from maisi.errors import InputError

MAX_VOXELS = 2048**3  # a grid larger than the schema allows on every axis is a mistake, not a request


def grid_record(volume: Volume) -> dict[str, Any]:
    """A grid as recorded in metadata: size in voxels and spacing in mm."""
    return {"shape": list(volume.shape), "spacing_mm": [round(s, 6) for s in volume.spacing]}


def _check_target(
    spacing: Sequence[float] | None, size: Sequence[int] | None, source: Volume
) -> tuple[tuple[float, ...] | None, tuple[int, ...] | None]:
    if spacing is None and size is None:
        raise InputError("resample: give a spacing, a size or both")
    if spacing is not None and (len(spacing) != 3 or not all(np.isfinite(s) and 0 < s <= 100 for s in spacing)):
        raise InputError(f"spacing {list(spacing)}: expected 3 values in (0, 100] mm")
    if size is not None and (len(size) != 3 or not all(int(n) == n and 1 <= n <= 2048 for n in size)):
        raise InputError(f"size {list(size)}: expected 3 whole numbers in 1..2048")
    if spacing is not None:
        resampled = np.asarray(source.shape) * np.asarray(source.spacing) / np.asarray(spacing)
        if float(np.prod(np.maximum(resampled, 1.0))) > MAX_VOXELS:
            raise InputError(
                f"spacing {list(spacing)}: the mask ({list(source.shape)} at "
                f"{np.round(source.spacing, 4).tolist()} mm) would become {np.ceil(resampled).astype(int).tolist()} "
                "voxels; choose a coarser spacing"
            )
    return (
        tuple(float(s) for s in spacing) if spacing is not None else None,
        tuple(int(n) for n in size) if size is not None else None,
    )


def resample_mask(
    mask: Volume, spacing: Sequence[float] | None = None, size: Sequence[int] | None = None
) -> tuple[Volume, dict[str, Any]]:
    """Resample (nearest neighbour) to ``spacing`` and pad or crop (centred) to ``size``, as MAISI does.

    Args:
        mask: integer label mask (x, y, z), RAS affine.
        spacing: target voxel size in mm; None keeps the mask's.
        size: target size in voxels; None keeps the size the resampling gives.

    Returns:
        The mask on the new grid (same dtype, labels unchanged, world positions kept) and a record
        ``{"method", "from": {shape, spacing_mm}, "to": {shape, spacing_mm}}``.

    Raises:
        InputError: neither target given, or a target that is not a grid.
    """
    import torch  # MONAI's transforms work on tensors; imported here so that the module stays light
    from monai.data import MetaTensor
    from monai.transforms import ResizeWithPadOrCrop, Spacing

    spacing, size = _check_target(spacing, size, mask)
    record: dict[str, Any] = {"method": "nearest (MONAI Spacing, then centred ResizeWithPadOrCrop)"}
    record["from"] = grid_record(mask)
    same_spacing = spacing is None or np.allclose(mask.spacing, spacing, rtol=1e-6, atol=1e-9)
    if same_spacing and (size is None or tuple(size) == mask.shape):
        record["to"] = grid_record(mask)
        return mask, record
    # float32 holds every label id exactly (ids are < 2**24) and halves the memory of MONAI's float64 default
    data = MetaTensor(torch.from_numpy(np.ascontiguousarray(mask.array))[None], affine=torch.from_numpy(mask.affine))
    if not same_spacing:
        data = Spacing(pixdim=spacing, mode="nearest", dtype=torch.float32)(data)
    if size is not None and tuple(data.shape[1:]) != tuple(size):
        data = ResizeWithPadOrCrop(spatial_size=size)(data)
    array = np.rint(data.as_tensor()[0].numpy()).astype(mask.array.dtype)
    out = Volume(np.ascontiguousarray(array), np.asarray(data.affine, dtype=np.float64))
    record["to"] = grid_record(out)
    return out, record


def pad_to_size(mask: Volume, size: Sequence[int]) -> tuple[Volume, tuple[slice, ...]]:
    """Pad ``mask`` with background (0), centred, to ``size`` (each axis at least the mask's).

    Returns:
        The padded mask (its affine moved so that every original voxel keeps its world position) and the
        box (slices) of the original voxels inside it, to crop the generated CT back
        (:func:`maisi.labels.crop.crop`).
    """
    before = [(n - s) // 2 for n, s in zip(size, mask.shape)]
    if any(b < 0 for b in before):
        raise ValueError(f"size {list(size)} is smaller than the mask {list(mask.shape)}")
    widths = [(b, n - s - b) for b, n, s in zip(before, size, mask.shape)]
    array = np.pad(mask.array, widths, constant_values=0)
    affine = mask.affine.copy()
    affine[:3, 3] = mask.affine[:3, 3] - mask.affine[:3, :3] @ np.asarray(before, dtype=np.float64)
    box = tuple(slice(b, b + s) for b, s in zip(before, mask.shape))
    return Volume(array, affine), box
