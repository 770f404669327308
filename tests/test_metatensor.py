"""``maisi.data.metatensor``: Volume <-> MONAI MetaTensor, geometry kept both ways."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Spacing

from maisi.data.io import Volume
from maisi.data.metatensor import to_metatensor, to_volume


def _volume() -> Volume:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-30.0, 12.5, 100.0]
    return Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), affine)


def test_a_round_trip_keeps_voxels_dtype_and_affine():
    volume = _volume()
    tensor = to_metatensor(volume)
    assert tuple(tensor.shape) == (1, 4, 5, 6) and tensor.dtype == torch.int16
    assert np.array_equal(tensor.affine.numpy(), volume.affine)
    back = to_volume(tensor)
    assert back.array.dtype == np.int16 and np.array_equal(back.array, volume.array)
    assert back.affine.dtype == np.float64 and np.array_equal(back.affine, volume.affine)


def test_dtype_and_rounding_on_the_way_back():
    volume = _volume()
    tensor = to_metatensor(volume, np.float32) + 0.6
    assert tensor.dtype == torch.float32
    assert np.array_equal(to_volume(tensor, np.int16).array, volume.array)  # truncated
    assert np.array_equal(to_volume(tensor, np.int16, rint=True).array, volume.array + 1)


def test_a_monai_resampling_through_the_bridge_keeps_world_positions():
    volume = _volume()
    out = to_volume(Spacing(pixdim=(4.0, 4.0, 3.0), mode="nearest")(to_metatensor(volume, np.float64)))
    assert out.spacing == (4.0, 4.0, 3.0)
    assert np.allclose(out.affine[:3, 3], volume.affine[:3, 3])  # voxel 0 stays where it was
    assert np.array_equal(out.array, volume.array[::2, ::2, :])
