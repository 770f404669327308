"""Volumes in and out: NIfTI, NRRD, MHA and DICOM series, geometry kept, RAS in memory, atomic writes.

In memory a volume is an array indexed (x, y, z) whose axes run toward patient Right, Anterior and
Superior (RAS), with a 4x4 affine mapping voxel indices to RAS millimetres. NIfTI files are read with
nibabel (SimpleITK 2.5 silently reads NaN/Inf in NIfTI floats as 0); everything else, and all writing, goes
through SimpleITK (which works in LPS). The LPS/RAS conversion happens here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from maisi.atomic import atomic_path
from maisi.errors import VolumeError

OutputFormat = Literal["nii.gz", "nii", "nrrd", "mha"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("nii.gz", "nii", "nrrd", "mha")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


def require_same_grid(ct: Volume, mask: Volume) -> None:
    """Refuse a CT / mask pair whose grids differ, naming both shapes and spacings.

    Raises:
        VolumeError: different shape, spacing, orientation or position.
    """
    if not ct.same_grid(mask):
        raise VolumeError(f"CT and mask grids differ (CT {list(ct.shape)} at {np.round(ct.spacing, 3).tolist()} mm, "
                          f"mask {list(mask.shape)} at {np.round(mask.spacing, 3).tolist()} mm, or their positions "
                          "differ); resample the mask onto the CT first")  # fmt: skip


def _read_sitk(path: Path) -> sitk.Image:
    if path.is_dir():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise VolumeError(f"{path}: folder holds no DICOM series")
        if len(series) > 1:
            raise VolumeError(f"{path}: folder holds {len(series)} DICOM series ({', '.join(series)}); "
                              "point to a folder with exactly one")  # fmt: skip
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def _read_nifti(path: Path) -> Volume:
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise VolumeError(f"{path}: cannot read as a medical image ({type(e).__name__}: {e})") from None
    while array.ndim > 3 and array.shape[-1] == 1:  # (x, y, z, 1) as some tools write it
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume with one value per voxel, got shape {array.shape}")
    return to_ras(Volume(array, image.affine.astype(np.float64)))


def read_volume(path: str | Path) -> Volume:
    """Read a scalar volume and reorient it to RAS.

    Args:
        path: a NIfTI / NRRD / MHA file, or a folder holding one DICOM series.

    Raises:
        VolumeError: missing or unreadable file, not 3D, or more than one component per voxel.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
        return _read_nifti(path)
    try:
        image = _read_sitk(path)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else "unknown reason"
        raise VolumeError(f"{path}: cannot read as a medical image ({reason})") from None
    if image.GetDimension() != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return to_ras(Volume(array, _LPS_TO_RAS @ lps))


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
            shape, affine = tuple(int(s) for s in header.shape[:3]), header.affine.astype(np.float64)
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
            lps = np.eye(4)
            lps[:3, :3] = direction @ np.diag(reader.GetSpacing())
            lps[:3, 3] = reader.GetOrigin()
            shape, affine = tuple(int(s) for s in reader.GetSize()[:3]), _LPS_TO_RAS @ lps
    except Exception as e:  # noqa: BLE001 - both readers raise several types for corrupt headers
        raise VolumeError(f"{path}: cannot read as a medical image ({type(e).__name__})") from None
    transform = _ras_transform(affine)
    ras_shape = tuple(int(shape[int(axis)]) for axis in np.argsort(transform[:, 0]))
    return ras_shape, affine @ nib.orientations.inv_ornt_aff(transform, shape)  # type: ignore[return-value]


def write_volume(path: str | Path, volume: Volume) -> Path:
    """Write ``volume`` with its geometry; the format follows the suffix (.nii.gz, .nii, .nrrd, .mha).

    The file appears atomically: it is written under a temporary name and renamed.
    """
    path = Path(path)
    if not path.name.lower().endswith(tuple(f".{f}" for f in OUTPUT_FORMATS)):
        raise VolumeError(f"{path}: cannot write this format; use one of {', '.join('.' + f for f in OUTPUT_FORMATS)}")
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
    """Read a label mask and make sure it holds integers (float files with integral values are accepted).

    Raises:
        VolumeError: unreadable, or holding non-integral / non-finite values.
    """
    volume = read_volume(path)
    array = volume.array
    if array.dtype.kind == "b":
        return volume.with_array(array.astype(np.uint8))
    if array.dtype.kind in "iu":
        return volume
    if array.dtype.kind != "f":
        raise VolumeError(f"{path}: a mask must hold integer labels, got voxel type {array.dtype}")
    bad = ~np.isfinite(array) | (array != np.round(array))
    if bad.any():
        raise VolumeError(f"{path}: a mask must hold integer labels, found {float(array[bad].flat[0]):g} "
                          f"({int(bad.sum())} non-integer voxels)")  # fmt: skip
    lo, hi = float(array.min()), float(array.max())
    dtype = np.uint8 if lo >= 0 and hi <= 255 else np.int32
    return volume.with_array(array.astype(dtype))
