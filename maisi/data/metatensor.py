"""The bridge between our :class:`~maisi.data.io.Volume` and MONAI's ``MetaTensor``, for MONAI's transforms.

A volume's voxels become one channel, ``(1, X, Y, Z)``, and its affine MONAI's (both RAS, voxel -> mm); the
way back takes channel 0 and the affine the transform left. Kept apart from :mod:`maisi.data.io`, which
imports neither torch nor MONAI.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from monai.data import MetaTensor

from maisi.data.io import Volume


def to_metatensor(volume: Volume, dtype: npt.DTypeLike | None = None) -> MetaTensor:
    """``(1, X, Y, Z)`` MetaTensor of the volume's voxels (converted to ``dtype`` when given) and affine."""
    array = volume.array if dtype is None else volume.array.astype(dtype)
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.as_tensor(volume.affine)
    )


def to_volume(tensor: MetaTensor, dtype: npt.DTypeLike | None = None, rint: bool = False) -> Volume:
    """The Volume of channel 0 of a ``(C, X, Y, Z)`` MetaTensor, on its affine (float64).

    Args:
        tensor: a MetaTensor, e.g. the output of a MONAI spatial transform.
        dtype: the voxels' type (default: the tensor's); a float converted to an integer type is truncated
            unless ``rint``.
        rint: round to the nearest integer first (labels resampled as floats, HU).
    """
    array = tensor.as_tensor()[0].detach().cpu().numpy()
    if rint:
        array = np.rint(array)
    if dtype is not None:
        array = array.astype(dtype)
    return Volume(np.ascontiguousarray(array), np.asarray(tensor.affine, dtype=np.float64))
