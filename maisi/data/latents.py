"""Pre-encoded latents on disk: ``<name>_emb.nii.gz`` plus the sidecar ``<name>_emb.nii.gz.json``.

The latent is a float32 NIfTI stored channel-last (x, y, z, C) as MAISI stores it, with an affine whose
voxels are ``factor`` image voxels wide and centred on the image voxels they summarise. The sidecar holds
MAISI's keys (dim, spacing, top/bottom_region_index, modality) and what is needed to trust the file later:
the SHA-256 of the latent itself, of its source image and of the VAE checkpoint, and the settings used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from maisi.atomic import atomic_path, write_json
from maisi.errors import VolumeError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def stem(path: str | Path) -> str:
    """File name without its image suffix (a DICOM folder: the folder name)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def encoded_relpaths(image_rel: str | Path) -> tuple[Path, Path]:
    """(latent, transformed label) of a datalist image, relative to ``maisi.encode``'s output_dir.

    The image's sub-folders are kept; ``..`` and root parts are dropped so that outputs never leave
    output_dir (``../cases/c1/ct.nii.gz`` -> ``cases/c1/ct_emb.nii.gz``). Two images of one stem in one
    folder (``ct.nii.gz``, ``ct.nrrd``) map to the same outputs: callers must refuse that.
    """
    parts = [p for p in Path(image_rel).parent.parts if p not in ("..", ".", "/") and not Path(p).anchor]
    folder = Path(*parts) if parts else Path()
    name = stem(image_rel)
    return folder / f"{name}_emb.nii.gz", folder / f"{name}_label.nii.gz"


def latent_affine(image_affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of a latent whose voxel (i, j, k) summarises image voxels factor*i .. factor*i + factor - 1."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return image_affine @ scale


def write_latent(path: str | Path, latent: np.ndarray, affine: np.ndarray) -> Path:
    """Write a (C, x, y, z) latent as a channel-last float32 NIfTI, atomically."""
    data = np.ascontiguousarray(np.moveaxis(latent.astype(np.float32), 0, -1))
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(data, affine), str(tmp))
    return Path(path)


def read_latent(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(C, x, y, z) float32 latent and its affine."""
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001
        raise VolumeError(f"{path}: cannot read latent ({type(e).__name__}: {e})") from None
    if data.ndim != 4:
        raise VolumeError(f"{path}: a latent is 4D (x, y, z, channels), got shape {data.shape}")
    return np.moveaxis(data, -1, 0), image.affine


def sidecar_path(latent_path: str | Path) -> Path:
    return Path(f"{latent_path}.json")


def read_sidecar(latent_path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a latent, or None when it is missing or unreadable (the latent is then unfinished)."""
    try:
        data = json.loads(sidecar_path(latent_path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_sidecar(latent_path: str | Path, data: dict[str, Any]) -> Path:
    return write_json(sidecar_path(latent_path), data)
