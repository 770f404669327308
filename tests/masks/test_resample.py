"""Masks onto an output grid as MAISI's inference does (MONAI Spacing + ResizeWithPadOrCrop), padding, and the
``maisi.labels resample`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ResizeWithPadOrCrop, Spacing

from maisi.data.io import Volume, read_mask, write_volume
from maisi.labels.__main__ import main as labels_main
from maisi.labels.crop import crop
from maisi.masks.resample import pad_to_size, resample_mask

DATA = Path(__file__).resolve().parents[1] / "data"


def world(volume: Volume, index) -> np.ndarray:
    return (volume.affine @ np.append(np.asarray(index, dtype=np.float64), 1.0))[:3]


@pytest.fixture(scope="module")
def ts_mask() -> Volume:
    """TotalSegmentator's example segmentation (122 x 101 x 30 voxels of 3 mm), TotalSegmentator ids."""
    return read_mask(DATA / "totalseg_example_seg.nii.gz")


def test_resampling_is_monai_spacing_then_centred_pad_or_crop_as_in_maisi(ts_mask):
    spacing, size = (3.5, 3.5, 5.0), (96, 96, 32)
    out, record = resample_mask(ts_mask, spacing, size)
    meta = MetaTensor(
        torch.from_numpy(ts_mask.array.astype(np.float32))[None], affine=torch.from_numpy(ts_mask.affine)
    )
    expected = ResizeWithPadOrCrop(size)(Spacing(pixdim=spacing, mode="nearest")(meta))
    assert np.array_equal(out.array, expected.numpy()[0].astype(np.uint8))
    assert np.allclose(out.affine, expected.affine.numpy())
    assert out.array.dtype == ts_mask.array.dtype and out.shape == size
    assert np.allclose(out.spacing, spacing)
    assert record["from"] == {"shape": [122, 101, 30], "spacing_mm": [3.0, 3.0, 3.0]}
    assert record["to"] == {"shape": [96, 96, 32], "spacing_mm": [3.5, 3.5, 5.0]}


def test_world_positions_are_kept_and_only_existing_labels_appear(ts_mask):
    out, _ = resample_mask(ts_mask, (6.0, 6.0, 6.0), None)
    assert set(np.unique(out.array)) <= set(np.unique(ts_mask.array))
    # nearest at twice the spacing: output voxel i is input voxel 2i, at the same world position
    for index in [(0, 0, 0), (10, 20, 7), (60, 50, 14)]:
        source = tuple(2 * i for i in index)
        assert out.array[index] == ts_mask.array[source]
        assert np.allclose(world(out, index), world(ts_mask, source))


def test_a_mask_already_on_the_grid_is_returned_unchanged(ts_mask):
    out, record = resample_mask(ts_mask, ts_mask.spacing, ts_mask.shape)
    assert out is ts_mask and record["from"] == record["to"]


def test_padding_keeps_world_positions_and_cropping_restores_the_mask(ts_mask):
    padded, box = pad_to_size(ts_mask, (128, 112, 32))
    assert padded.shape == (128, 112, 32) and padded.array.dtype == ts_mask.array.dtype
    corner = tuple(s.start for s in box)
    assert np.allclose(world(padded, corner), world(ts_mask, (0, 0, 0)))
    assert padded.array.sum() == ts_mask.array.sum()  # the border is background
    back = crop(padded, box)
    assert np.array_equal(back.array, ts_mask.array) and np.allclose(back.affine, ts_mask.affine)


@pytest.mark.parametrize(
    "spacing, size, fragment",
    [
        (None, None, "give a spacing, a size or both"),
        ((0.0, 1.0, 1.0), None, "expected 3 values in (0, 100]"),
        (None, (10, 10, 0), "expected 3 whole numbers"),
        ((0.01, 0.01, 0.01), None, "choose a coarser spacing"),
    ],
)
def test_bad_targets_are_refused(ts_mask, spacing, size, fragment):
    from maisi.errors import InputError

    with pytest.raises(InputError, match=None) as caught:
        resample_mask(ts_mask, spacing, size)
    assert fragment in str(caught.value)


def test_labels_resample_command_writes_the_resampled_mask(tmp_path, capsys, ts_mask):
    out = tmp_path / "out" / "resampled.nii.gz"
    code = labels_main(
        [
            "resample",
            "--mask",
            str(DATA / "totalseg_example_seg.nii.gz"),
            "--output",
            str(out),
            "--spacing",
            "3.5",
            "3.5",
            "5",
            "--size",
            "96",
            "96",
            "32",
        ]
    )
    assert code == 0
    written = read_mask(out)
    expected, _ = resample_mask(ts_mask, (3.5, 3.5, 5.0), (96, 96, 32))
    assert np.array_equal(written.array, expected.array) and np.allclose(
        written.affine, expected.affine, atol=1e-4
    )
    assert (
        "[122, 101, 30] at [3.0, 3.0, 3.0] mm -> [96, 96, 32] at [3.5, 3.5, 5.0] mm"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ([], "give --spacing, --size or both"),
        (["--spacing", "0", "1", "1"], "--spacing 0: must be a number"),
        (["--size", "0", "4", "4"], "--size 0: must be a whole number"),
        (["--output-is-input"], "would overwrite --mask"),
    ],
)
def test_labels_resample_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, fragment):
    mask = write_volume(tmp_path / "mask.nii.gz", Volume(np.ones((8, 8, 8), np.uint8), np.eye(4)))
    before = mask.read_bytes()
    output = tmp_path / "new" / "out.nii.gz"
    if extra == ["--output-is-input"]:
        output, extra = mask, ["--size", "4", "4", "4"]
    assert labels_main(["resample", "--mask", str(mask), "--output", str(output), *extra]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "new").exists() and mask.read_bytes() == before


@pytest.mark.parametrize("spacing", [(3.5, 3.5, 5.0), (1.7, 2.9, 1.1), (0.7, 6.1, 2.3)])
@pytest.mark.parametrize("name", ["totalseg_example_seg.nii.gz", "slicerio_Segmentation.seg.nrrd"])
def test_the_fast_path_gives_maisis_voxels_on_real_masks(name, spacing):
    """MAISI calls Spacing with its float64 default; rounding ties at half voxels must come out the same."""
    mask = read_mask(DATA / name)
    meta = MetaTensor(torch.from_numpy(mask.array)[None], affine=torch.from_numpy(mask.affine))
    expected = Spacing(pixdim=spacing, mode="nearest")(meta)
    out, _ = resample_mask(mask, spacing)
    assert out.shape == tuple(expected.shape[1:])
    assert np.array_equal(out.array, expected.numpy()[0].astype(out.array.dtype))
    assert np.allclose(out.affine, expected.affine.numpy())


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "MONAI on the whole volume"])
def test_a_rotated_grid_gives_maisis_voxels_on_both_paths(fast, monkeypatch):
    from maisi.masks import resample

    if not fast:
        monkeypatch.setattr(resample, "_spacing_separable", lambda mask, spacing: None)
    angle = np.deg2rad(20)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    affine[:3, :3] *= 2.0
    array = np.zeros((12, 10, 6), np.uint8)
    array[3:9, 2:7, 1:5] = 7
    array[5, 4, 2] = 9
    out, _ = resample_mask(Volume(array, affine), (3.0, 3.0, 3.0))
    meta = MetaTensor(torch.from_numpy(array)[None], affine=torch.from_numpy(affine))
    expected = Spacing(pixdim=(3.0, 3.0, 3.0), mode="nearest")(meta)
    assert np.array_equal(out.array, expected.numpy()[0].astype(np.uint8))
    assert np.allclose(out.affine, expected.affine.numpy())
