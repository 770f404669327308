"""Volumes in and out: NIfTI, NRRD, MHA and DICOM series, geometry kept, RAS in memory, atomic writes.

In memory a volume is an array indexed (x, y, z) whose axes run toward patient Right, Anterior and
Superior (RAS), with a 4x4 affine mapping voxel indices to RAS millimetres. NIfTI files are read with
nibabel (SimpleITK 2.5 silently reads NaN/Inf in NIfTI floats as 0); everything else, and all writing, goes
through SimpleITK (which works in LPS). The LPS/RAS conversion happens here and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from maisi.atomic import atomic_path
from maisi.errors import VolumeError
from maisi.files import why_absent

OutputFormat = Literal["nii.gz", "nii", "nrrd", "mha"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("nii.gz", "nii", "nrrd", "mha")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Largest voxel spacing accepted, in mm: thick CT slices are 5-10 mm; 100 mm and more is a broken header.
MAX_SPACING_MM = 100.0
# A float mask value this close to an integer is that integer (float32 noise), further off it is refused.
MASK_ROUNDING = 1e-3
# A NIfTI's sform and qform further apart than this (mm, at any corner) make its geometry ambiguous.
NIFTI_FORM_TOLERANCE_MM = 0.1


@dataclass(frozen=True, eq=False)  # arrays have no single truth value
class Volume:
    """A 3D volume: ``array`` indexed (x, y, z) in RAS order, ``affine`` voxel -> RAS mm."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    def same_grid(self, other: Volume, atol_mm: float = 1e-3) -> bool:
        """Same voxel shape and the same voxel -> world mapping (within ``atol_mm``)."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol_mm)

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry, new voxels (which must have the same spatial shape)."""
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(f"shape {array.shape} does not match the volume's {self.array.shape}")
        return Volume(array, self.affine.copy())


def centred_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine with the given spacing whose volume centre sits at the world origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return affine


def require_same_grid(ct: Volume, mask: Volume) -> None:
    """Refuse a CT / mask pair whose grids differ, naming both shapes and spacings.

    Raises:
        VolumeError: different shape, spacing, orientation or position.
    """
    if not ct.same_grid(mask):
        raise VolumeError(
            f"CT and mask grids differ (CT {list(ct.shape)} at {np.round(ct.spacing, 3).tolist()} mm, "
            f"mask {list(mask.shape)} at {np.round(mask.spacing, 3).tolist()} mm, or their positions "
            "differ); resample the mask onto the CT first"
        )


def _dicom_series_files(folder: Path) -> list[str]:
    """File names of the one DICOM series in ``folder``, in GDCM's slice order.

    Raises:
        VolumeError: no series, several series, or files in the folder that are not part of the series
            (GDCM silently leaves out a truncated or garbage slice, which would read as a series with a gap).
    """
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise VolumeError(
            f"{folder}: folder holds {len(series)} DICOM series ({', '.join(series)}); "
            "point to a folder with exactly one"
        )
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    members = {Path(n).resolve() for n in names}
    # DICOMDIR indexes a medium and hidden files are the system's; anything else must be a slice.
    others = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR" and p.resolve() not in members
    )
    if others:
        raise VolumeError(
            f"{folder}: {len(others)} file(s) are not part of the DICOM series "
            f"(unreadable, truncated or not DICOM): {_some(others)}; remove them or repair the series"
        )
    return names


def _some(names: list[str], limit: int = 5) -> str:
    """At most ``limit`` names, then how many more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _slice_header(name: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Origin (LPS mm), direction (3x3) and InstanceNumber (None if absent) of one DICOM file, header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    reader.ReadImageInformation()
    number = reader.GetMetaData("0020|0013").strip() if reader.HasMetaDataKey("0020|0013") else ""
    direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.array(reader.GetOrigin(), dtype=np.float64)
    return origin, direction, int(number) if number.isdigit() else None


def _sorted_slices(folder: Path, names: list[str]) -> list[str]:
    """The series' files sorted along the slice normal, once the slice positions are checked.

    Refused: unreadable slices, two slices at one position, uneven spacing or a missing slice. ITK reads such
    a series anyway, with one spacing for the whole stack: a gap makes every slice sit at the wrong height.
    A slice is judged missing when the positions are even but the InstanceNumbers, which follow the
    positions, jump by more than one.

    Raises:
        VolumeError: naming the files concerned.
    """
    headers, unreadable = [], []
    for name in names:
        try:
            headers.append(_slice_header(name))
        except RuntimeError:
            unreadable.append(Path(name).name)
    if unreadable:
        raise VolumeError(f"{folder}: unreadable DICOM slice(s): {_some(unreadable)}")
    if len(names) < 2:
        return names
    normal = headers[0][1][:, 2]
    heights = np.array([origin @ normal for origin, _, _ in headers])
    order = np.argsort(heights, kind="stable")  # GDCM does not always sort (e.g. with a duplicated slice)
    names, heights = [names[i] for i in order], heights[order]
    numbers = [headers[i][2] for i in order]
    files = [Path(n).name for n in names]
    steps = np.diff(heights)
    if np.any(steps < 1e-3):
        i = int(np.argmin(steps))
        raise VolumeError(f"{folder}: slices {files[i]} and {files[i + 1]} lie at the same position")
    typical = float(np.median(steps))
    tolerance = max(0.01, 0.01 * typical)  # mm: rounding in ImagePositionPatient, not a real difference
    if np.any(np.abs(steps - typical) > tolerance):
        i = int(np.argmax(np.abs(steps - typical)))
        raise VolumeError(
            f"{folder}: uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm): {steps[i]:.3f} mm "
            f"between {files[i]} and {files[i + 1]} (a missing or extra slice?)"
        )
    if None not in numbers:
        jumps = np.diff(np.array(numbers, dtype=np.int64))
        if (np.all(jumps > 0) or np.all(jumps < 0)) and np.any(np.abs(jumps) != 1):
            i = int(np.flatnonzero(np.abs(jumps) != 1)[0])
            raise VolumeError(
                f"{folder}: slice(s) missing: InstanceNumber jumps from {numbers[i]} to {numbers[i + 1]} "
                f"between {files[i]} and {files[i + 1]} ({steps[i]:.3f} mm apart)"
            )
    return names


def _read_sitk(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(_sorted_slices(path, _dicom_series_files(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def check_affine(path: str | Path, affine: np.ndarray) -> None:
    """Refuse a voxel -> world mapping no scan can have.

    That is: non-finite values, a spacing outside (0, MAX_SPACING_MM] mm, or parallel axes (singular).

    Raises:
        VolumeError: naming ``path`` and the offending spacing.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(affine)):
        raise VolumeError(f"{path}: the voxel -> world mapping holds non-finite values; fix the header")
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or np.any(spacing > MAX_SPACING_MM):
        shown = [float(f"{s:.6g}") for s in spacing]
        raise VolumeError(
            f"{path}: voxel spacing {shown} mm is not usable; "
            f"every spacing must lie in (0, {MAX_SPACING_MM:g}] mm"
        )
    # With unit columns |det| is 1 for orthogonal axes and 0 for parallel ones.
    if abs(np.linalg.det(linear / spacing)) < 1e-3:
        raise VolumeError(f"{path}: the voxel -> world mapping is singular (two voxel axes are parallel)")


def _check_nifti_pixdim(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a zero, negative or non-finite pixdim where the geometry comes from it (no sform).

    nibabel silently sets a zero pixdim to 1 and makes a negative one positive, so the raw header is read.
    """
    if int(image.header["sform_code"]) > 0:
        return
    with nib.openers.ImageOpener(path) as f:
        raw = type(image.header).from_fileobj(f, check=False)
    pixdim = [float(v) for v in raw["pixdim"][1:4]]
    if not all(np.isfinite(v) and 0 < v <= MAX_SPACING_MM for v in pixdim):
        raise VolumeError(
            f"{path}: voxel spacing (pixdim) {pixdim} mm is not usable; every spacing must lie in "
            f"(0, {MAX_SPACING_MM:g}] mm"
        )


def _check_nifti_forms(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a NIfTI whose sform and qform, both set, place the voxels in different places.

    nibabel (and so this package, and MONAI's default reader) uses the sform, ITK-based tools (SimpleITK,
    ITK-SNAP, Slicer) may use the qform: the same file then shows, and aligns with its mask, differently.
    """
    header = image.header
    if int(header["sform_code"]) <= 0 or int(header["qform_code"]) <= 0:
        return
    shape = np.asarray((*image.shape[:3], 1, 1)[:3], dtype=np.float64)  # a 2D file is refused later
    corners = np.array([[i, j, k, 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * [*(shape - 1), 1]
    sform, qform = header.get_sform(), header.get_qform()
    gap = float(np.max(np.linalg.norm((corners @ sform.T - corners @ qform.T)[:, :3], axis=1)))
    if not gap <= NIFTI_FORM_TOLERANCE_MM:
        raise VolumeError(
            f"{path}: the NIfTI sform and qform disagree by up to {gap:.3g} mm (tools differ in which they "
            "use); fix the header, e.g. set the qform to the sform or one of the codes to 0"
        )


def _read_nifti(path: Path) -> Volume:
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise VolumeError(f"{path}: cannot read as a medical image ({type(e).__name__}: {e})") from None
    _check_nifti_pixdim(path, image)
    check_affine(path, image.affine)
    _check_nifti_forms(path, image)
    while array.ndim > 3 and array.shape[-1] == 1:  # (x, y, z, 1) as some tools write it
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume with one value per voxel, got shape {array.shape}")
    return to_ras(Volume(array, image.affine.astype(np.float64)))


def _itk_reason(error: RuntimeError) -> str:
    """The last line of an ITK exception, with a hint where ITK refused the file's spacing."""
    reason = str(error).strip().splitlines()[-1][:200] if str(error).strip() else "unknown reason"
    if "spacing" in reason.lower():  # ITK refuses a zero or NaN spacing, and may show NaN as 0
        reason += f"; every voxel spacing must lie in (0, {MAX_SPACING_MM:g}] mm"
    return reason


def read_volume(path: str | Path) -> Volume:
    """Read a scalar volume and reorient it to RAS.

    Args:
        path: a NIfTI / NRRD / MHA file, or a folder holding one DICOM series.

    Raises:
        VolumeError: missing or unreadable file, not 3D, more than one component per voxel, an unusable
            spacing or affine (see :func:`check_affine`), or a DICOM folder with unreadable, missing or
            unevenly spaced slices.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file {why_absent(path)}")
    if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
        return _read_nifti(path)
    try:
        image = _read_sitk(path)
    except RuntimeError as e:
        raise VolumeError(f"{path}: cannot read as a medical image ({_itk_reason(e)})") from None
    if image.GetDimension() != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            f"{path}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}"
        )
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    affine = _itk_ras_affine(image)
    check_affine(path, affine)
    return to_ras(Volume(array, affine))


def _itk_ras_affine(image: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """The RAS affine of an ITK image or of a reader's header (ITK gives direction, spacing, origin in
    LPS)."""
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ lps


def _ras_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform taking the array axes of ``affine`` to R, A, S."""
    current = nib.orientations.io_orientation(affine)
    return nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(("R", "A", "S")))


def to_ras(volume: Volume) -> Volume:
    """Permute/flip the array axes so they run R, A, S (the affine follows; world positions unchanged)."""
    transform = _ras_transform(volume.affine)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return volume
    array = nib.orientations.apply_orientation(volume.array, transform)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.array.shape)
    return Volume(np.ascontiguousarray(array), affine)


def read_geometry(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine of a volume as :func:`read_volume` would return them, from the header only.

    Raises:
        VolumeError: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        volume = read_volume(path)  # folders (DICOM) and missing files: the full reader explains
        return volume.shape, volume.affine
    try:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            header = nib.load(path)
            _check_nifti_pixdim(path, header)
            check_affine(path, header.affine)
            _check_nifti_forms(path, header)
            shape, affine = tuple(int(s) for s in header.shape[:3]), header.affine.astype(np.float64)
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape, affine = tuple(int(s) for s in reader.GetSize()[:3]), _itk_ras_affine(reader)
    except VolumeError:
        raise
    except RuntimeError as e:  # SimpleITK
        raise VolumeError(f"{path}: cannot read as a medical image ({_itk_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - both readers raise several types for corrupt headers
        raise VolumeError(f"{path}: cannot read as a medical image ({type(e).__name__})") from None
    check_affine(path, affine)
    transform = _ras_transform(affine)
    ras_shape = tuple(int(shape[int(axis)]) for axis in np.argsort(transform[:, 0]))
    return ras_shape, affine @ nib.orientations.inv_ornt_aff(transform, shape)  # type: ignore[return-value]


def check_output_path(
    path: str | Path, option: str, inputs: dict[str, str | Path] | None = None, volume: bool = True
) -> Path:
    """Refuse an output location before any work is done.

    Args:
        path: where the output will be written.
        option: how the user named it (``--output``), for the message.
        inputs: the inputs of the same command by option name; the output must be none of them.
        volume: the output is a volume, so its suffix must be one :func:`write_volume` can write.

    Raises:
        VolumeError: the path is a folder, lies under a file, is one of ``inputs``, or (``volume``) has a
            suffix no writer knows.
    """
    path = Path(path)
    if path.is_dir():
        raise VolumeError(f"{option} {path}: is a folder; give a file name")
    blocker = next((parent for parent in path.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise VolumeError(f"{option} {path}: cannot be written, {blocker} is a file, not a folder")
    for name, source in (inputs or {}).items():
        if source is not None and Path(source).resolve() == path.resolve():
            raise VolumeError(f"{option} {path}: is the input given as {name}; write to another file")
    if volume and not path.name.lower().endswith(tuple(f".{f}" for f in OUTPUT_FORMATS)):
        formats = ", ".join("." + f for f in OUTPUT_FORMATS)
        raise VolumeError(f"{option} {path}: cannot write this format; use one of {formats}")
    return path


def write_volume(path: str | Path, volume: Volume) -> Path:
    """Write ``volume`` with its geometry; the format follows the suffix (.nii.gz, .nii, .nrrd, .mha).

    The file appears atomically: it is written under a temporary name and renamed.
    """
    path = Path(path)
    if not path.name.lower().endswith(tuple(f".{f}" for f in OUTPUT_FORMATS)):
        raise VolumeError(
            f"{path}: cannot write this format; use one of {', '.join('.' + f for f in OUTPUT_FORMATS)}"
        )
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    lps = _LPS_TO_RAS @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection([float(d) for d in (lps[:3, :3] / spacing).ravel()])
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=not path.name.endswith(".nii"))
    return path


def read_mask(path: str | Path) -> Volume:
    """Read a label mask and make sure it holds integers.

    Float files are accepted when every value lies within :data:`MASK_ROUNDING` of an integer (float noise
    such as 0.99999994 from a resampler or a scaled NIfTI); they are rounded to uint8 (0..255) or int32.

    Raises:
        VolumeError: unreadable, or holding non-integral, non-finite or (float) values beyond the int32 range.
    """
    volume = read_volume(path)
    array = volume.array
    if array.dtype.kind == "b":
        return volume.with_array(array.astype(np.uint8))
    if array.dtype.kind in "iu":
        return volume
    if array.dtype.kind != "f":
        raise VolumeError(f"{path}: a mask must hold integer labels, got voxel type {array.dtype}")
    rounded = np.round(array)
    with np.errstate(invalid="ignore"):  # inf - inf: refused as non-finite just below
        bad = ~np.isfinite(array) | (np.abs(array - rounded) > MASK_ROUNDING)
    if bad.any():
        raise VolumeError(
            f"{path}: a mask must hold integer labels, found {float(array[bad].flat[0]):.7g} "
            f"({int(bad.sum())} non-integer voxels; a label mask resampled with linear interpolation?)"
        )
    lo, hi = float(rounded.min()), float(rounded.max())
    int32 = np.iinfo(np.int32)
    if lo < int32.min or hi > int32.max:  # the cast below would wrap them
        worst = lo if lo < int32.min else hi
        raise VolumeError(f"{path}: a mask must hold integer labels in the int32 range, found {worst:g}")
    dtype = np.uint8 if lo >= 0 and hi <= 255 else np.int32
    return volume.with_array(rounded.astype(dtype))


def write_volumes(items: list[tuple[str | Path, Volume]]) -> list[Path]:
    """Write several volumes (a CT and its mask) so that either all of them appear or none.

    Every volume is written under a temporary name first; the files are renamed into place only once all
    of them are written, so a failure on the last leaves none of the new files.
    """
    paths = [Path(path) for path, _ in items]
    with contextlib.ExitStack() as stack:
        temporaries = [stack.enter_context(atomic_path(path)) for path in paths]
        for tmp, (_, volume) in zip(temporaries, items):
            write_volume(tmp, volume)
    return paths
