"""Volume I/O on real CT files: RAS in memory, world geometry kept through reads, writes and reorientation."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from maisi.data.io import OUTPUT_FORMATS, Volume, read_geometry, read_mask, read_volume, to_ras, write_volume
from maisi.errors import InputError, VolumeError

DATA = Path(__file__).parent / "data"
TOTALSEG_CT = DATA / "totalseg_example_ct_sm.nii.gz"  # RAS NIfTI, int16, 122x101x30 at 3 mm
TOTALSEG_SEG = DATA / "totalseg_example_seg.nii.gz"  # uint8 TotalSegmentator ids, same grid
CHEST_NRRD = DATA / "slicerio_CTChest4.nrrd"  # LPS NRRD, int32, 128x128x34 at 3.047x3.047x10 mm
DICOM_DIR = (
    DATA / "totalseg_dicom3"
)  # 3 slices of 512x512, 0.977x0.977 mm, 2 mm apart, identity LPS direction

RAS = ("R", "A", "S")
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _ras_of_sitk_index(image: sitk.Image, index: tuple[int, int, int]) -> np.ndarray:
    """World position (RAS mm) of a SimpleITK voxel index: SimpleITK answers in LPS."""
    return np.array(image.TransformIndexToPhysicalPoint([int(i) for i in index])) * LPS_TO_RAS


def _world(volume: Volume, index) -> np.ndarray:
    return (volume.affine @ np.append(np.asarray(index, dtype=float), 1.0))[:3]


def _index_at(volume: Volume, world_ras) -> tuple[int, int, int]:
    """Voxel of ``volume`` whose centre is nearest to a RAS world point."""
    ijk = np.linalg.inv(volume.affine) @ np.append(np.asarray(world_ras, dtype=float), 1.0)
    return tuple(int(i) for i in np.round(ijk[:3]))


def _assert_same_world_content(a: Volume, b: Volume, n: int = 50, seed: int = 0) -> None:
    """Every sampled voxel centre of ``a`` is a voxel centre of ``b`` holding the same value."""
    rng = np.random.default_rng(seed)
    shape = np.array(a.shape)
    corners = np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    points = np.concatenate([corners, rng.integers(0, shape, size=(n, 3))])
    inv_b = np.linalg.inv(b.affine)
    for ijk in points:
        world = _world(a, ijk)
        other = (inv_b @ np.append(world, 1.0))[:3]
        np.testing.assert_allclose(other, np.round(other), atol=1e-3, err_msg=f"voxel {ijk} is off b's grid")
        other_ijk = tuple(int(i) for i in np.round(other))
        assert all(0 <= i < s for i, s in zip(other_ijk, b.shape)), f"voxel {ijk} falls outside b"
        assert a.array[tuple(ijk)] == b.array[other_ijk], f"value differs at world {world}"


# ---------------------------------------------------------------------------------------------------- reading


def _reoriented_nifti(tmp_path: Path, codes: tuple[str, str, str] | None) -> Path:
    """The TotalSegmentator CT, or the same scan stored with another voxel order (same world content)."""
    if codes is None:
        return TOTALSEG_CT
    img = nib.load(TOTALSEG_CT)
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(codes)
    )
    out = tmp_path / f"ct_{''.join(codes)}.nii.gz"
    reoriented = img.as_reoriented(transform)
    assert nib.aff2axcodes(reoriented.affine) == codes
    nib.save(reoriented, out)
    return out


@pytest.mark.parametrize("codes", [None, ("L", "P", "S"), ("P", "S", "L"), ("S", "R", "P")])
def test_nifti_read_matches_nibabel_closest_canonical(tmp_path, codes):
    path = _reoriented_nifti(tmp_path, codes)
    volume = read_volume(path)
    canonical = nib.as_closest_canonical(nib.load(path))

    np.testing.assert_allclose(volume.affine, canonical.affine, atol=1e-4)
    expected = np.asanyarray(canonical.dataobj)
    assert volume.array.dtype == expected.dtype == np.int16
    np.testing.assert_array_equal(volume.array, expected)
    assert volume.shape == (122, 101, 30)
    np.testing.assert_allclose(volume.spacing, (3.0, 3.0, 3.0), atol=1e-4)


def test_nrrd_lps_header_is_read_as_ras():
    volume = read_volume(CHEST_NRRD)
    image = sitk.ReadImage(str(CHEST_NRRD))

    assert nib.aff2axcodes(volume.affine) == RAS
    assert volume.shape == (128, 128, 34)
    np.testing.assert_allclose(volume.spacing, (3.047, 3.047, 10.0), atol=1e-3)
    assert volume.array.dtype == np.int32
    assert volume.array.min() == -3024  # padding value of the scanner kept as is

    # The header's space directions are (-3.05,0,0) (0,-3.05,0) (0,0,10) in LPS: the file's index axes
    # already run toward patient Right and Anterior, so no flip is needed and voxel (0,0,0) is
    # SimpleITK's (0,0,0).
    np.testing.assert_allclose(_world(volume, (0, 0, 0)), _ras_of_sitk_index(image, (0, 0, 0)), atol=1e-4)
    # NRRD stores LPS, so RAS x and y are the negated LPS coordinates of the header's space origin.
    np.testing.assert_allclose(_world(volume, (0, 0, 0)), (-193.096, -216.396, -340.25), atol=1e-3)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def test_nrrd_value_at_known_world_position_matches_simpleitk():
    volume = read_volume(CHEST_NRRD)
    image = sitk.ReadImage(str(CHEST_NRRD))
    world_ras = np.array([-71.0, -3.0, -170.0])  # inside the chest, 1.5 mm from any voxel border
    sitk_index = image.TransformPhysicalPointToIndex((world_ras * LPS_TO_RAS).tolist())
    assert sitk_index == (40, 70, 17)
    value = image[sitk_index]
    assert value != -3024  # a voxel inside the scan, not padding
    assert volume.array[_index_at(volume, world_ras)] == value


def test_nrrd_stored_in_lps_voxel_order_is_flipped_to_ras(tmp_path):
    """Same chest stored with index axes running Left/Posterior (identity LPS direction): x and y must
    flip."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(CHEST_NRRD)), "LPS")
    assert np.allclose(image.GetDirection(), np.eye(3).ravel())
    path = tmp_path / "chest_lps.nrrd"
    sitk.WriteImage(image, str(path))

    volume = read_volume(path)
    assert nib.aff2axcodes(volume.affine) == RAS
    nx, ny, _ = image.GetSize()
    # After the flip, RAS voxel (0,0,0) (most right, posterior, inferior) is the file's last x and y index.
    corresponding = (nx - 1, ny - 1, 0)
    np.testing.assert_allclose(_world(volume, (0, 0, 0)), _ras_of_sitk_index(image, corresponding), atol=1e-4)
    assert volume.array[0, 0, 0] == image[corresponding]
    np.testing.assert_array_equal(
        volume.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0)[::-1, ::-1, :]
    )
    # and it is the same scan as the original file, voxel for voxel
    np.testing.assert_array_equal(volume.array, read_volume(CHEST_NRRD).array)
    np.testing.assert_allclose(volume.affine, read_volume(CHEST_NRRD).affine, atol=1e-4)


def test_dicom_folder_read():
    volume = read_volume(DICOM_DIR)
    assert volume.shape == (512, 512, 3)
    np.testing.assert_allclose(volume.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-4)
    assert nib.aff2axcodes(volume.affine) == RAS
    assert volume.array.dtype == np.int16
    assert volume.array.min() <= -1000 and volume.array.max() > 500  # air and bone in HU

    # The slices have an identity (LPS) orientation: RAS voxel (0,0,0) is the series' last column and row
    # of the most inferior slice (z = -804.5 mm).
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(DICOM_DIR)))
    image = reader.Execute()
    corresponding = (511, 511, 0)
    np.testing.assert_allclose(_world(volume, (0, 0, 0)), _ras_of_sitk_index(image, corresponding), atol=1e-3)
    assert _world(volume, (0, 0, 0))[2] == pytest.approx(-804.5)
    assert _world(volume, (0, 0, 2))[2] == pytest.approx(-800.5)  # slices sorted inferior -> superior
    assert volume.array[0, 0, 0] == image[corresponding]
    assert volume.array[100, 300, 1] == image[511 - 100, 511 - 300, 1]


def test_folder_without_dicom_is_a_volume_error(tmp_path):
    folder = tmp_path / "not_dicom_here"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images\n")
    with pytest.raises(VolumeError, match="not_dicom_here"):
        read_volume(folder)


def test_missing_file_is_a_volume_error_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_scan.nii.gz"
    with pytest.raises(VolumeError) as info:
        read_volume(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, InputError)  # CLIs report it as a user error


def test_text_file_with_nifti_suffix_is_a_volume_error(tmp_path):
    fake = tmp_path / "fake_scan.nii.gz"
    fake.write_text("this is not an image\n")
    with pytest.raises(VolumeError, match="fake_scan.nii.gz"):
        read_volume(fake)


def test_2d_image_is_a_volume_error(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(path))
    with pytest.raises(VolumeError, match="3D"):
        read_volume(path)


def test_multi_component_image_is_a_volume_error(tmp_path):
    path = tmp_path / "vectors.mha"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3), str(path))
    with pytest.raises(VolumeError, match="one value per voxel"):
        read_volume(path)


# ---------------------------------------------------------------------------------------------------- writing


def _synthetic(kind: str) -> Volume:
    """Small volumes whose voxel axes are not RAS: flipped (LPS-like), permuted, or oblique."""
    rng = np.random.default_rng(1)
    shape = (7, 6, 5)
    if kind == "lps_flipped":
        linear = np.diag([-0.8, -1.1, 2.5])  # index axes run Left, Posterior, Superior
        array = rng.normal(size=shape).astype(np.float32)
    elif kind == "permuted":
        # x index -> Inferior, y index -> Right, z index -> Posterior
        linear = np.array([[0.0, 1.3, 0.0], [0.0, 0.0, -2.0], [-0.7, 0.0, 0.0]])
        array = rng.integers(-1024, 3000, size=shape).astype(np.int16)
    elif kind == "oblique":
        a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
        rot_z = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        rot_x = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
        permute_flip = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
        linear = rot_z @ rot_x @ permute_flip @ np.diag([0.9, 1.7, 3.0])
        array = rng.normal(size=shape).astype(np.float32)
    else:
        raise ValueError(kind)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = (-12.5, 40.25, -300.0)
    assert nib.aff2axcodes(affine) != RAS
    return Volume(array, affine)


def _real(kind: str) -> Volume:
    return {"chest_nrrd": lambda: read_volume(CHEST_NRRD), "totalseg_seg": lambda: read_mask(TOTALSEG_SEG)}[
        kind
    ]()


VOLUMES = ["chest_nrrd", "totalseg_seg", "lps_flipped", "permuted", "oblique"]


def _volume(kind: str) -> Volume:
    return _real(kind) if kind in ("chest_nrrd", "totalseg_seg") else _synthetic(kind)


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
@pytest.mark.parametrize("kind", VOLUMES)
def test_round_trip_keeps_voxels_and_world_geometry(tmp_path, fmt, kind):
    volume = _volume(kind)
    path = write_volume(tmp_path / f"out.{fmt}", volume)
    assert path == tmp_path / f"out.{fmt}" and path.is_file()

    back = read_volume(path)
    expected = to_ras(volume)  # what is read back is the RAS reorientation of what was written
    assert nib.aff2axcodes(back.affine) == RAS
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_array_equal(back.array, expected.array)
    np.testing.assert_allclose(back.affine, expected.affine, atol=1e-3)
    np.testing.assert_allclose(back.spacing, expected.spacing, atol=1e-4)
    assert sorted(back.spacing) == pytest.approx(sorted(volume.spacing), abs=1e-4)
    _assert_same_world_content(volume, back)


@pytest.mark.parametrize("kind", ["lps_flipped", "permuted", "oblique"])
def test_to_ras_keeps_world_positions(kind):
    volume = _synthetic(kind)
    ras = to_ras(volume)
    assert nib.aff2axcodes(ras.affine) == RAS
    assert sorted(ras.shape) == sorted(volume.shape)
    _assert_same_world_content(volume, ras)
    _assert_same_world_content(ras, volume)
    assert to_ras(ras) is ras  # already RAS: nothing to do


@pytest.mark.parametrize("kind", ["chest_nrrd", "permuted", "oblique"])
def test_written_nifti_geometry_is_readable_by_nibabel(tmp_path, kind):
    volume = _volume(kind)
    path = write_volume(tmp_path / "for_other_tools.nii.gz", volume)
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, volume.affine, atol=1e-3)  # written in the given voxel order
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), volume.array)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_write_leaves_no_temporary_file(tmp_path, fmt):
    write_volume(tmp_path / f"ct.{fmt}", _synthetic("permuted"))
    assert _leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == [f"ct.{fmt}"]


def test_failed_write_leaves_neither_target_nor_temporary_file(tmp_path, monkeypatch):
    seen = []

    def broken_write(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")  # the writer got as far as creating its output
        seen.append(Path(filename))
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    target = tmp_path / "ct.nii.gz"
    with pytest.raises(RuntimeError, match="disk full"):
        write_volume(target, _synthetic("permuted"))
    assert (
        len(seen) == 1 and seen[0].parent == tmp_path and seen[0] != target
    )  # it wrote under a temporary name
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "ct.nrrd"
    original = _synthetic("lps_flipped")
    write_volume(target, original)
    before = target.read_bytes()

    def broken_write(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(RuntimeError):
        write_volume(target, original.with_array(original.array * 2))
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_write_creates_missing_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "ct.mha"
    write_volume(target, _synthetic("oblique"))
    assert target.is_file()


# ---------------------------------------------------------------------------------------------------- masks


def test_real_totalsegmentator_mask_passes_unchanged():
    mask = read_mask(TOTALSEG_SEG)
    expected = np.asanyarray(nib.as_closest_canonical(nib.load(TOTALSEG_SEG)).dataobj)
    assert mask.array.dtype.kind in "iu"
    np.testing.assert_array_equal(mask.array, expected)
    labels = set(np.unique(mask.array).tolist())
    assert {
        0,
        1,
        2,
        3,
        5,
        117,
    } <= labels  # background, spleen, kidneys, liver, ... kept as TotalSegmentator ids


def test_real_slicer_segmentation_reads_as_mask():
    mask = read_mask(DATA / "slicerio_Segmentation.seg.nrrd")
    assert mask.shape == (128, 128, 34)
    assert set(np.unique(mask.array).tolist()) <= set(range(8))
    np.testing.assert_allclose(mask.affine, read_volume(CHEST_NRRD).affine, atol=1e-6)  # same grid as the CT


@pytest.mark.parametrize(
    "values, dtype",
    [([0, 1, 5, 200, 255], np.uint8), ([0, 1, 300], np.int32), ([-1, 0, 3], np.int32)],
)
def test_float_mask_with_integral_values_is_cast_to_integers(tmp_path, values, dtype):
    rng = np.random.default_rng(2)
    array = rng.choice(np.array(values, dtype=np.float32), size=(6, 5, 4))
    array.flat[: len(values)] = values  # every value present
    path = write_volume(tmp_path / "float_mask.nii.gz", Volume(array, np.diag([1.5, 1.5, 2.0, 1.0])))
    assert read_volume(path).array.dtype == np.float32  # really stored as float

    mask = read_mask(path)
    assert mask.array.dtype == dtype
    np.testing.assert_array_equal(mask.array, array.astype(np.int64))


@pytest.mark.parametrize(
    "bad, suffix",
    [
        (0.5, "nii.gz"),
        (0.5, "nrrd"),
        (np.nan, "nrrd"),
        (np.inf, "mha"),
        (-np.inf, "mha"),
        (np.nan, "nii.gz"),  # SimpleITK 2.5 would read these as 0; NIfTI goes through nibabel for that reason
        (np.inf, "nii"),
    ],
)
def test_float_mask_with_non_integer_values_is_rejected(tmp_path, bad, suffix):
    array = np.zeros((6, 5, 4), dtype=np.float32)
    array[2, 2, 2] = 1.0
    array[3, 1, 0] = bad
    path = write_volume(tmp_path / f"soft_mask.{suffix}", Volume(array, np.eye(4)))
    with pytest.raises(VolumeError) as info:
        read_mask(path)
    message = str(info.value)
    assert f"soft_mask.{suffix}" in message
    assert "integer" in message
    assert str(bad) in message  # the offending value is shown


def test_boolean_masks_are_written_as_uint8(tmp_path):
    array = np.zeros((4, 5, 6), dtype=bool)
    array[1, 2, 3] = True
    back = read_volume(write_volume(tmp_path / "b.nii.gz", Volume(array, np.eye(4))))
    assert back.array.dtype == np.uint8 and back.array.sum() == 1 and back.array[1, 2, 3] == 1


def test_unsupported_output_format_is_an_input_error(tmp_path):
    with pytest.raises(VolumeError, match="cannot write this format; use one of .nii.gz"):
        write_volume(tmp_path / "x.png", Volume(np.zeros((2, 2, 2), np.int16), np.eye(4)))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- broken DICOM

SLICES = sorted(p.name for p in DICOM_DIR.iterdir())  # ...16590 (z -800.5), 16591 (-802.5), 16592 (-804.5)


def _dicom_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "series"
    folder.mkdir()
    for name in SLICES:
        (folder / name).write_bytes((DICOM_DIR / name).read_bytes())
    return folder


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_dicom_series_with_a_damaged_slice_is_refused_naming_it(tmp_path, damage):
    """GDCM silently drops such a slice: the series used to read as 2 slices 4 mm apart."""
    folder = _dicom_copy(tmp_path)
    middle = folder / SLICES[1]
    data = middle.read_bytes()
    garbage = np.random.default_rng(0).bytes(5000)
    middle.write_bytes(data[: len(data) // 2] if damage == "truncated" else garbage)
    with pytest.raises(VolumeError) as info:
        read_volume(folder)
    message = str(info.value)
    assert str(folder) in message and SLICES[1] in message and "not part of the DICOM series" in message


def test_dicom_series_with_a_missing_slice_is_refused_naming_its_neighbours(tmp_path):
    folder = _dicom_copy(tmp_path)
    (folder / SLICES[1]).unlink()  # the two left are evenly spaced (one step of 4 mm): only numbering tells
    with pytest.raises(VolumeError) as info:
        read_volume(folder)
    message = str(info.value)
    assert "slice(s) missing" in message and "InstanceNumber jumps from 286 to 284" in message
    assert SLICES[0] in message and SLICES[2] in message and "4.000 mm apart" in message


def test_dicom_series_with_uneven_spacing_is_refused(tmp_path):
    folder = _dicom_copy(tmp_path)
    top = folder / SLICES[0]
    position = b"-437.51171875\\-800.5"  # ImagePositionPatient of the top slice; moved up by 1 mm
    assert top.read_bytes().count(position) == 1
    top.write_bytes(top.read_bytes().replace(position, b"-437.51171875\\-799.5"))
    with pytest.raises(VolumeError) as info:
        read_volume(folder)
    message = str(info.value)
    assert "uneven slice spacing (2.000 to 3.000 mm)" in message and SLICES[1] in message


def test_dicom_series_with_a_duplicated_slice_is_refused(tmp_path):
    folder = _dicom_copy(tmp_path)
    (folder / "copy_of_middle").write_bytes((folder / SLICES[1]).read_bytes())
    with pytest.raises(VolumeError, match="copy_of_middle lie at the same position|and copy_of_middle"):
        read_volume(folder)


def test_dicom_folder_with_a_stray_file_is_refused_but_dicomdir_and_hidden_files_are_not(tmp_path):
    folder = _dicom_copy(tmp_path)
    (folder / ".DS_Store").write_bytes(b"\0" * 10)
    (folder / "DICOMDIR").write_bytes(b"\0" * 10)
    assert read_volume(folder).shape == (512, 512, 3)
    (folder / "notes.txt").write_text("scan of 2022\n")
    with pytest.raises(VolumeError, match="1 file.s. are not part of the DICOM series .*: notes.txt"):
        read_volume(folder)


# ------------------------------------------------------------------------------------------- bad geometry


def _nifti_with_sform(path: Path, linear: np.ndarray) -> Path:
    """A NIfTI whose sform is written as given (nibabel refuses to build an image from such an affine)."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    header = img.header
    for row, key in enumerate(("srow_x", "srow_y", "srow_z")):
        header[key] = [*linear[row], 0.0]
    nib.save(nib.Nifti1Image(img.dataobj, None, header), path)
    return path


BAD_SFORMS = {
    "zero spacing": (np.diag([0.0, 1.0, 1.0]), "voxel spacing [0.0, 1.0, 1.0] mm is not usable"),
    "absurd spacing": (np.diag([1e6, 1.0, 1.0]), "voxel spacing [1000000.0, 1.0, 1.0] mm is not usable"),
    "non-finite": (np.diag([np.nan, 1.0, 1.0]), "non-finite"),
    "singular": (np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), "singular"),
}


@pytest.mark.parametrize("case", BAD_SFORMS, ids=list(BAD_SFORMS))
@pytest.mark.parametrize("reader", [read_volume, read_mask, read_geometry])
def test_unusable_nifti_affine_is_refused_naming_the_file(tmp_path, case, reader):
    linear, fragment = BAD_SFORMS[case]
    path = _nifti_with_sform(tmp_path / "bad_geometry.nii.gz", linear)
    with pytest.raises(VolumeError) as info:
        reader(path)
    message = str(info.value)
    assert str(path) in message and fragment in message
    if "spacing" in case:
        assert "(0, 100] mm" in message  # the limit is stated


@pytest.mark.parametrize("value", [0.0, -2.0, np.nan])
@pytest.mark.parametrize("suffix", ["nii", "nii.gz"])
def test_nifti_pixdim_that_nibabel_would_silently_repair_is_refused(tmp_path, value, suffix):
    """Without an sform nibabel reads a zero pixdim as 1 mm and a negative one as its absolute value."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    img.header.set_sform(None, code=0)
    img.header.set_qform(np.eye(4), code=1)
    raw = bytearray(img.header.binaryblock) + bytes(4) + np.zeros(64, np.uint8).tobytes()
    raw[80:84] = np.float32(value).tobytes()  # pixdim[1]; the header is little-endian on this machine
    path = tmp_path / f"pixdim.{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == "nii.gz" else bytes(raw))
    for reader in (read_volume, read_geometry):
        with pytest.raises(VolumeError) as info:
            reader(path)
        assert str(path) in str(info.value) and f"pixdim) [{value}, 1.0, 1.0]" in str(info.value)


@pytest.mark.parametrize("spacing", ["0 1 1", "nan 1 1", "1000000 1 1"])
def test_unusable_metaimage_spacing_is_refused_naming_the_limit(tmp_path, spacing):
    path = tmp_path / "bad.mha"
    header = f"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = {spacing}\n"
    path.write_bytes((header + "ElementType = MET_UCHAR\nElementDataFile = LOCAL\n").encode() + bytes(64))
    for reader in (read_volume, read_mask, read_geometry):
        with pytest.raises(VolumeError) as info:
            reader(path)
        assert str(path) in str(info.value) and "(0, 100] mm" in str(info.value)


def test_thick_slices_within_the_limit_are_read(tmp_path):
    volume = Volume(np.zeros((4, 4, 4), np.int16), np.diag([0.5, 0.5, 100.0, 1.0]))
    back = read_volume(write_volume(tmp_path / "thick.nii.gz", volume))
    assert back.spacing == pytest.approx((0.5, 0.5, 100.0))


@pytest.mark.parametrize("noise", [np.float32(0.99999994), np.float32(1.0001), np.float32(200.0002)])
def test_float_mask_with_float_noise_is_rounded_to_its_labels(tmp_path, noise):
    """0.99999994 was refused with the message 'found 1', naming the value it was closest to."""
    array = np.zeros((6, 5, 4), dtype=np.float32)
    array[1:3, 1:3, 1:3] = noise
    array[4, 4, 3] = 2.0
    path = write_volume(tmp_path / "noisy.nii.gz", Volume(array, np.eye(4)))
    mask = read_mask(path)
    assert mask.array.dtype == np.uint8
    np.testing.assert_array_equal(mask.array, np.round(array).astype(np.uint8))


@pytest.mark.parametrize("value", [3e9, -3e9])
def test_float_mask_beyond_int32_is_refused_instead_of_wrapping(tmp_path, value):
    """3e9 became -2147483648 (a silent int32 wrap)."""
    array = np.zeros((6, 5, 4), dtype=np.float64)
    array[1, 1, 1] = value
    path = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    with pytest.raises(VolumeError, match=r"huge.nii.gz: a mask must hold integer labels in the int32 range"):
        read_mask(path)


@pytest.mark.parametrize("reader", [read_volume, read_mask, read_geometry])
def test_nifti_whose_sform_and_qform_disagree_is_refused(tmp_path, reader):
    """nibabel read the sform, SimpleITK the qform: one file, two placements (here a flipped x axis)."""
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    array[1, 2, 3] = 1
    sform = np.diag([1.5, 1.5, 3.0, 1.0])
    qform = sform.copy()
    qform[0, 0], qform[0, 3] = -1.5, 10.0
    image = nib.Nifti1Image(array, sform)
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    path = tmp_path / "two_forms.nii.gz"
    nib.save(image, path)
    sitk_origin = sitk.ReadImage(str(path)).GetOrigin()
    assert not np.allclose(sitk_origin, [0.0, 0.0, 0.0])  # ITK really places it elsewhere
    with pytest.raises(VolumeError, match=r"two_forms.nii.gz: the NIfTI sform and qform disagree by up to"):
        reader(path)


def test_nifti_whose_sform_and_qform_agree_or_one_is_unset_is_read(tmp_path):
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    affine = np.array([[0.0, 0.0, 3.0, 5.0], [-1.5, 0.0, 0.0, 7.0], [0.0, 1.5, 0.0, -9.0], [0, 0, 0, 1]])
    for name, qcode in (("agree.nii.gz", 1), ("no_qform.nii.gz", 0)):
        image = nib.Nifti1Image(array, affine)
        image.set_qform(affine if qcode else np.eye(4), code=qcode)
        image.set_sform(affine, code=1)
        nib.save(image, tmp_path / name)
        assert read_volume(tmp_path / name).same_grid(to_ras(Volume(array, affine)))
