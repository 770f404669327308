"""Preview PNGs: three mid-slices side by side, square pixels, radiological orientation; CT windows in HU,
MR in a window of its own percentiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from maisi.data.io import Volume, read_volume
from maisi.preview import (
    GAP,
    MIN_ROW_HEIGHT,
    MR_PREVIEW_PERCENTILES,
    PREVIEW_WINDOWS,
    display_windows,
    montage,
    preview_picture,
    three_planes,
    window,
    write_preview,
)

DATA = Path(__file__).parent / "data"
CHEST_NRRD = DATA / "slicerio_CTChest4.nrrd"  # 128x128x34 at 3.047x3.047x10 mm


def _read_png(path: Path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    assert image.GetDimension() == 2 and image.GetNumberOfComponentsPerPixel() == 1  # greyscale
    return sitk.GetArrayFromImage(image)  # (rows, cols), row 0 at the top


def test_window_maps_the_display_range_to_grey_levels():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    grey = window(hu, level=40, width=400)
    assert grey.dtype == np.uint8
    assert grey.tolist() == [0, 0, 128, 255, 255]


def test_chest_preview_png_layout(tmp_path):
    ct = read_volume(CHEST_NRRD)
    panels = three_planes(ct)
    axial, coronal, sagittal = (p.shape for p in panels)
    # square pixels at the finer (3.047 mm) spacing: 34 slices of 10 mm become round(340 / 3.047) rows
    assert coronal == (round(34 * 10 / ct.spacing[0]), 128) == (112, 128)
    assert axial == (128, 128)
    assert sagittal == (112, 128)

    out = write_preview(tmp_path / "chest.png", ct)
    assert out == tmp_path / "chest.png"
    picture = _read_png(out)
    assert picture.dtype == np.uint8
    # two rows (soft tissue, lung), each enlarged 2x to reach 256 rows, GAP pixels apart
    row_height, row_width = 2 * 128, 2 * (128 * 3 + 2 * GAP)
    assert picture.shape == (2 * row_height + GAP, row_width) == (516, 784)
    for row, (_, level, width) in enumerate(PREVIEW_WINDOWS):
        expected = montage([window(p.astype(np.float32), level, width) for p in panels])
        top = row * (row_height + GAP)
        np.testing.assert_array_equal(picture[top : top + row_height : 2, ::2], expected)
        np.testing.assert_array_equal(
            picture[top + 1 : top + row_height : 2, 1::2], expected
        )  # crisp 2x2 blocks
    assert picture[row_height : row_height + GAP].max() == 0  # the gap between the rows
    assert [p.name for p in tmp_path.iterdir()] == ["chest.png"]  # written atomically, nothing left over


def test_lung_row_shows_what_the_soft_tissue_row_hides(tmp_path):
    ct = read_volume(CHEST_NRRD)
    picture = _read_png(write_preview(tmp_path / "p.png", ct))
    soft, lung = picture[:256], picture[256 + GAP :]
    lungs = three_planes(ct)[0] < -700  # axial parenchyma, enlarged like the picture
    lungs = np.repeat(np.repeat(lungs, 2, axis=0), 2, axis=1)
    assert lungs.sum() > 1000
    assert soft[:, :256][lungs].max() == 0  # one black area in the soft-tissue window
    assert lung[:, :256][lungs].std() > 5  # texture in the lung window


def test_preview_windows_are_configurable(tmp_path):
    ct = read_volume(CHEST_NRRD)
    one = _read_png(write_preview(tmp_path / "one.png", ct, windows=(("bone", 400.0, 1800.0),)))
    assert one.shape == (256, 784)


def test_small_volumes_are_enlarged_to_a_readable_size():
    volume = Volume(np.zeros((40, 30, 20), np.float32), np.diag([3.5, 3.5, 5.0, 1.0]))
    picture = preview_picture(volume)
    assert picture.shape[0] >= 2 * MIN_ROW_HEIGHT


# Synthetic RAS volume: x runs toward patient Right, y toward Anterior, z toward Superior (Volume convention).
# Anisotropic on purpose, so a transposed panel or wrong spacing changes the expected boxes.
SHAPE = (20, 24, 16)
SPACING = (1.0, 1.5, 2.0)
LOW_X = slice(0, 5)  # patient LEFT side (x grows toward the right)
HIGH_Y = slice(18, 24)  # anterior
HIGH_Z = slice(12, 16)  # superior
ALL = slice(None)


def _block_volume(block: tuple[slice, slice, slice]) -> Volume:
    array = np.full(SHAPE, -1000.0, dtype=np.float32)
    array[block] = 1000.0
    return Volume(array, np.diag([*SPACING, 1.0]))


def _bright_box(panel: np.ndarray) -> tuple[int, int, int, int]:
    """First and last bright row, first and last bright column."""
    rows, cols = np.nonzero(panel > 0)
    assert rows.size, "block not visible in this panel"
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def test_axial_panel_shows_anterior_up_and_patient_left_on_the_right():
    # a column of bright voxels at the patient's left-anterior, through every axial slice
    axial, coronal, sagittal = three_planes(_block_volume((LOW_X, HIGH_Y, ALL)))
    assert axial.shape == (36, 20)  # rows: y, 24 voxels of 1.5 mm at 1 mm; cols: x, 20 voxels of 1 mm
    top, bottom, left, right = _bright_box(axial)
    assert (top, bottom) == (0, 8)  # anterior 6 voxels * 1.5 mm = top 9 rows
    assert (left, right) == (15, 19)  # patient left = image right (radiological convention)
    assert coronal.max() < 0 and sagittal.max() < 0  # not cut by the other mid-planes


def test_coronal_panel_shows_superior_up_and_patient_left_on_the_right():
    # a bright slab at the patient's left-superior, through every coronal slice
    axial, coronal, sagittal = three_planes(_block_volume((LOW_X, ALL, HIGH_Z)))
    assert coronal.shape == (32, 20)  # rows: z, 16 voxels of 2 mm at 1 mm
    top, bottom, left, right = _bright_box(coronal)
    assert (top, bottom) == (0, 7)  # superior 4 voxels * 2 mm = top 8 rows
    assert (left, right) == (15, 19)
    assert axial.max() < 0 and sagittal.max() < 0


def test_sagittal_panel_shows_superior_up_and_anterior_on_the_left():
    axial, coronal, sagittal = three_planes(_block_volume((ALL, HIGH_Y, HIGH_Z)))
    # square pixels at this panel's finer spacing (1.5 mm): rows z, 16 * 2 / 1.5 = 21.3 -> 21; cols y, 24
    assert sagittal.shape == (21, 24)
    top, bottom, left, right = _bright_box(sagittal)
    assert (top, bottom) == (
        0,
        5,
    )  # superior 4 voxels * 2 mm = 8 mm = top 6 rows of 1.5 mm (nearest neighbour)
    assert (left, right) == (0, 5)  # anterior 6 voxels on the left (anterior faces left)
    assert axial.max() < 0 and coronal.max() < 0


@pytest.mark.parametrize(
    "block, panel",
    [((LOW_X, HIGH_Y, ALL), 0), ((LOW_X, ALL, HIGH_Z), 1), ((ALL, HIGH_Y, HIGH_Z), 2)],
    ids=["axial", "coronal", "sagittal"],
)
def test_png_keeps_the_panel_orientation(tmp_path, block, panel):
    """Through the PNG file: the block lands where the panel put it (no flip or transpose when writing)."""
    volume = _block_volume(block)
    panels = three_planes(volume)
    scale = -(-MIN_ROW_HEIGHT // max(p.shape[0] for p in panels))
    picture = _read_png(write_preview(tmp_path / "p.png", volume, windows=(("wide", 0.0, 2000.0),)))
    offset = sum(p.shape[1] + GAP for p in panels[:panel])
    top, bottom, left, right = _bright_box(picture[::scale, ::scale])
    expected = _bright_box(panels[panel])
    assert (top, bottom, left - offset, right - offset) == expected
    assert top == 0  # anterior / superior at the top of the picture


def test_preview_with_mask_draws_label_outlines_in_colour(tmp_path):
    from maisi.preview import label_colour, outline

    ct = read_volume(CHEST_NRRD)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[30:90, 30:90, :] = 28
    out = write_preview(tmp_path / "overlay.png", ct, ct.with_array(labels))
    image = sitk.ReadImage(str(out))
    assert image.GetNumberOfComponentsPerPixel() == 3
    rgb = sitk.GetArrayFromImage(image)[::2, ::2]  # (rows, cols, 3), back to one pixel per panel pixel
    grey = montage([window(p.astype(np.float32), 40, 400) for p in three_planes(ct)])
    assert rgb.shape[1:] == grey.shape[1:] + (3,)
    coloured = np.any(rgb[:128] != grey[..., None], axis=-1)
    axial_edges = outline(three_planes(ct.with_array(labels))[0])
    assert coloured[:, :128].sum() == axial_edges.sum() > 0  # exactly the outline changed, nothing inside
    assert np.all(rgb[:128, :128][axial_edges] == label_colour(28))
    assert not np.array_equal(label_colour(28), label_colour(29))


# MR: arbitrary units (MAISI's [0, 1000] output scale), a dark background and a long bright tail.
MR_SHAPE = (48, 48, 32)


def _mr_volume() -> Volume:
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in MR_SHAPE), indexing="ij")
    body = x**2 + y**2 + z**2 < 0.8
    array = np.zeros(MR_SHAPE, np.int16)
    array[body] = np.clip(rng.gamma(4.0, 120.0, body.sum()) + 50.0, 0, 3000).astype(np.int16)
    array[24, 24, 10:14] = 30000  # a few very bright voxels (a vessel, an artefact)
    return Volume(array, np.diag([1.0, 1.0, 1.5, 1.0]))


def test_mr_preview_spans_the_grey_range_where_a_ct_window_saturates():
    volume = _mr_volume()
    ((name, level, width),) = display_windows(volume, "mri_t1")
    low, high = np.percentile(volume.array, MR_PREVIEW_PERCENTILES)
    assert (level - width / 2, level + width / 2) == pytest.approx((low, high)) and name.startswith("MR")
    planes = [p.astype(np.float32) for p in three_planes(volume)]
    scale = -(-MIN_ROW_HEIGHT // max(p.shape[0] for p in planes))
    picture = preview_picture(volume, modality="mri_t1")
    expected = montage([window(p, level, width) for p in planes])  # one row: MR has no lung window
    assert picture.shape == (expected.shape[0] * scale, expected.shape[1] * scale)
    np.testing.assert_array_equal(picture[::scale, ::scale], expected)
    body = montage([(p > 0).astype(np.uint8) for p in planes]).astype(bool)
    grey = expected[body]
    assert (grey == 255).mean() < 0.02  # only the top 0.5 % is white
    assert np.percentile(grey, 5) < 64 and np.percentile(grey, 95) > 191  # the histogram spans the range
    assert len(np.unique(grey)) > 150
    # the same volume in the CT soft-tissue window: nearly all of the body is white
    ct_row = preview_picture(volume)[: expected.shape[0] * scale : scale, ::scale]
    assert (ct_row[body] == 255).mean() > 0.9


def test_ct_previews_are_unchanged_by_the_modality_option():
    ct = read_volume(CHEST_NRRD)
    as_before = preview_picture(ct, windows=PREVIEW_WINDOWS)
    for modality in ("ct", "ct_contrast", "unknown"):
        np.testing.assert_array_equal(preview_picture(ct, modality=modality), as_before)
    assert display_windows(ct, "ct") == PREVIEW_WINDOWS
    assert preview_picture(ct, modality="mri").shape[0] == as_before.shape[0] // 2 - GAP // 2  # one row


def test_constant_mr_volume_gets_a_window_of_width_one():
    flat = Volume(np.full((8, 8, 8), 300, np.int16), np.eye(4))
    ((_, level, width),) = display_windows(flat, "mri")
    assert width == 1.0 and level - width / 2 == 300
    assert preview_picture(flat, modality="mri").max() == 0
