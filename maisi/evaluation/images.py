"""The image sets of an LDM evaluation: which files, read as arrays, put on [0, 1] by one rule.

A set is a glob pattern, a folder (its image files, not recursive) or a list of files. 2D images (PNG, or 2D
NIfTI / NRRD) are read with SimpleITK as stored, (rows, columns), singleton axes dropped and RGB(A) averaged
to grey (alpha ignored); 3D volumes through :func:`maisi.data.io.read_volume` (RAS, (X, Y, Z)). Every image
of every set goes to [0, 1] by the one rule of ``$.ldm.intensity`` (:func:`to_unit`), so real and synthetic
images are compared on the same scale.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from maisi.config.evaluate_config import Files, IntensityRule
from maisi.data.io import read_volume
from maisi.errors import InputError

IMAGE_SUFFIXES = (".png", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def image_files(spec: Files | None, key: str) -> list[Path]:
    """The files of a set: a glob pattern, a folder, or a list.

    Raises:
        InputError: a pattern or folder with no image, or listed files that do not exist, naming ``key``.
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        if Path(spec).is_dir():
            found = sorted(p for p in Path(spec).iterdir() if _is_image(p))
            if not found:
                raise InputError(f"{key}: folder {spec} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            return found
        found = sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if _is_image(p))
        if not found:
            raise InputError(f"{key}: no image file matches '{spec}'")
        return found
    files = [Path(p) for p in spec]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise InputError(f"{key}: {len(missing)} file(s) not found: {', '.join(missing[:10])}")
    return files


def read_image(path: Path, spatial_dims: int, key: str) -> np.ndarray:
    """A float32 array of one image: 2D (rows, columns) or 3D (X, Y, Z).

    Raises:
        InputError: unreadable file, or not of ``spatial_dims`` dimensions (naming the file and ``key``).
    """
    if spatial_dims == 3:
        try:
            return read_volume(path).array.astype(np.float32)
        except InputError as e:
            raise InputError(f"{key}: {e}") from None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(
            f"{key}: {path}: cannot read as an image ({str(e).strip().splitlines()[-1]})"
        ) from None
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array[..., :3].mean(axis=-1)  # RGB(A) -> grey; alpha ignored
    array = array.reshape([s for s in array.shape if s != 1] or [1])
    if array.ndim != 2:
        raise InputError(
            f"{key}: {path}: expected a 2D image ($.ldm.spatial_dims 2), got shape {list(array.shape)}"
        )
    return array


def to_unit(array: np.ndarray, rule: IntensityRule, where: str) -> np.ndarray:
    """Put an image on [0, 1] by ``rule`` (clipped): a fixed range, or the image's own percentiles.

    Raises:
        InputError: a constant image under the percentile rule (no range), naming ``where``.
    """
    if rule.mode == "range":
        low, high = float(rule.low), float(rule.high)
    else:
        low, high = (float(v) for v in np.percentile(array, [rule.lower_percentile, rule.upper_percentile]))
        if high <= low:
            raise InputError(
                f"{where}: its {rule.lower_percentile:g}-{rule.upper_percentile:g} percentile range is empty "
                f"(a constant image?); $.ldm.intensity.mode 'range' maps it with fixed numbers"
            )
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def describe_rule(rule: IntensityRule) -> str:
    """One line stating the intensity rule (for the report)."""
    if rule.mode == "range":
        return f"(x - {rule.low:g}) / ({rule.high:g} - {rule.low:g}), clipped to [0, 1], for every image"
    return (
        f"each image by its own {rule.lower_percentile:g}th..{rule.upper_percentile:g}th percentiles to "
        "[0, 1], clipped"
    )


def load_set(files: list[Path], spatial_dims: int, rule: IntensityRule, key: str) -> list[torch.Tensor]:
    """Every file of a set as a (1, 1, *spatial) float32 tensor on [0, 1]."""
    return [
        torch.from_numpy(to_unit(read_image(p, spatial_dims, key), rule, f"{key}: {p}"))[None, None]
        for p in files
    ]


def one_shape(images: list[torch.Tensor], files: list[Path], key: str) -> tuple[int, ...]:
    """The spatial shape the images of a set share.

    Raises:
        InputError: several shapes (listing a file of each), naming ``key``.
    """
    shapes: dict[tuple[int, ...], Path] = {}
    for image, path in zip(images, files):
        shapes.setdefault(tuple(image.shape[2:]), path)
    if len(shapes) > 1:
        listed = "; ".join(f"{list(s)} ({p})" for s, p in list(shapes.items())[:4])
        raise InputError(f"{key}: images of one shape are needed, got {len(shapes)} shapes: {listed}")
    return next(iter(shapes))
