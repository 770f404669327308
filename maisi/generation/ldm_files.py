"""The files of one LDM sample: their names, the fixed 8-bit mapping of 2D pictures, and the writers that
keep the geometry.

Names (``<prefix>_seed<N>...``, as for CT):

- 2D: ``_image.<fmt>`` (float32, the decoded values, with the preset's pixel spacing) and ``_image.png``
  (``output.preview``); with ``output.format`` ``png`` only the PNG, which has no spacing;
- 3D: ``_image.<fmt>`` (float32 with the preset's voxel spacing, RAS) and ``_preview.png`` (three mid-slices);
- ``<prefix>_seed<N>.json``: the metadata, written last.

The PNG maps decoded [0, 1] to [0, 255] with the same mapping for every sample (clipped, rounded half up):
the seed bundles divided each image by its own maximum, so two samples' grey levels could not be compared.
Every array is in RAS order ((X, Y[, Z]) running toward patient Right, Anterior, Superior); the PNG shows it
in the radiological convention (patient right on the image left, anterior up), as the CT previews do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from maisi.atomic import atomic_path
from maisi.config import InferConfig, to_jsonable
from maisi.data.io import Volume, centred_affine, write_volume
from maisi.families.ldm import LDM_PARTS, LDMPreset, get_ldm_preset
from maisi.families.registry import config_keys, foreign_keys
from maisi.preview import write_png, write_preview
from maisi.run_paths import RunPaths

PNG = "png"
# The display window of a 3D preview in decoded units: [0, 1], the seeds' training intensity range.
UNIT_WINDOW = (("decoded [0, 1]", 0.5, 1.0),)
PNG_MAPPING = "decoded [0, 1] -> [0, 255]: round(255 * clip(x, 0, 1)), the same for every sample"


SampleKey = int | tuple[int, int]  # the seed, or (prompt index, seed) for text presets


def sample_keys(config: InferConfig) -> list[SampleKey]:
    """The samples of a job: one per seed, or (text presets) one per prompt x seed, prompt-major."""
    seeds = range(config.seed, config.seed + config.num_samples)
    if get_ldm_preset(config.preset).takes_prompts and config.prompts:
        return [(p, s) for p in range(len(config.prompts)) for s in seeds]
    return list(seeds)


def sample_label(key: SampleKey) -> str:
    """How logs name a sample: ``seed 3`` or ``prompt 0 seed 3``."""
    return f"prompt {key[0]} seed {key[1]}" if isinstance(key, tuple) else f"seed {key}"


def ldm_sample_files(config: InferConfig, preset: LDMPreset, key: SampleKey) -> dict[str, Path]:
    """The files of sample ``key`` (keys: image, png or preview, metadata): ``<prefix>_seed<N>...`` or, for a
    prompt, ``<prefix>_p<i>_seed<N>...``."""
    stem = f"p{key[0]}_seed{key[1]}" if isinstance(key, tuple) else f"seed{key}"
    out, stem, fmt = Path(config.output.dir), f"{config.output.prefix}_{stem}", config.output.format
    files = {"image": out / f"{stem}_image.{fmt}"}
    if preset.spatial_dims == 2 and fmt != PNG and config.output.preview:
        files["png"] = out / f"{stem}_image.png"
    elif preset.spatial_dims == 3 and config.output.preview:
        files["preview"] = out / f"{stem}_preview.png"
    files["metadata"] = out / f"{stem}.json"
    return files


def ldm_run_paths(config: InferConfig) -> RunPaths:
    """What an LDM job reads (its two checkpoints; a text preset's text encoder) and writes (the output
    folder, under its lock, and every sample's files), for the guard of :mod:`maisi.run_paths`."""
    preset = get_ldm_preset(config.preset)
    paths = RunPaths()
    for part in LDM_PARTS:
        paths.read(f"$.checkpoints.{part}", getattr(config.checkpoints, part))
    if config.text_encoder is not None and preset.takes_prompts:
        paths.read("$.text_encoder.path", config.text_encoder.path)
        paths.read("$.text_encoder.checkpoint", config.text_encoder.checkpoint)
    paths.write_into("$.output.dir", config.output.dir, lock=True)
    for key in sample_keys(config):
        for kind, path in ldm_sample_files(config, preset, key).items():
            name = key if isinstance(key, int) else f"p{key[0]} seed {key[1]}"
            paths.write(f"the {kind} of sample {name}", path, group=str(key))
    return paths


def resolved_ldm_config(config: InferConfig) -> dict[str, Any]:
    """The resolved config as JSON, less the keys the LDM family does not take (they keep the schema's
    defaults and are never used): what the job's config file, ``--dry-run`` and the metadata show."""
    resolved = to_jsonable(config)
    for key in foreign_keys(config.preset, config_keys(resolved)):
        section, _, inner = key.partition(".")
        if inner:
            resolved[section].pop(inner)
        else:
            resolved.pop(section)
    return resolved


def ldm_job_key(config: InferConfig, checksums: dict[str, Any]) -> str:
    """Identity of what a sample depends on besides its seed (not where it is written, nor how many)."""
    resolved = resolved_ldm_config(config)
    for key in ("output", "num_samples", "seed", "device"):
        resolved.pop(key)
    text = json.dumps({"config": resolved, "sha256": checksums}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Decoded intensities -> grey levels: [0, 1] -> [0, 255], clipped, rounded half up (0.5 -> 128)."""
    return np.floor(np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def display_2d(image: np.ndarray) -> np.ndarray:
    """(X, Y) in RAS -> (rows, cols) for display: anterior up, patient right on the image left."""
    return np.ascontiguousarray(image[::-1, ::-1].T)


def affine_2d(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """3x3 affine (pixel -> RAS mm in the image plane) with the given spacing, centred on the origin."""
    full = centred_affine((*shape, 1), (*spacing, 1.0))
    return full[np.ix_([0, 1, 3], [0, 1, 3])]


def write_image_2d(path: Path, image: np.ndarray, spacing: tuple[float, ...]) -> Path:
    """Write an (X, Y) float32 image in RAS with its pixel spacing (NIfTI, NRRD or MHA by the suffix),
    atomically; the plane's centre is at the origin."""
    affine = affine_2d(image.shape, spacing)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine  # ITK works in LPS
    itk = sitk.GetImageFromArray(np.ascontiguousarray(image.astype(np.float32).T))  # ITK arrays are (y, x)
    itk.SetSpacing([float(s) for s in spacing])
    itk.SetOrigin([float(o) for o in lps[:2, 2]])
    itk.SetDirection([float(d) for d in (lps[:2, :2] / np.asarray(spacing)).ravel()])
    with atomic_path(path) as tmp:
        sitk.WriteImage(itk, str(tmp), useCompression=not path.name.endswith(".nii"))
    return path


def write_ldm_sample(files: dict[str, Path], image: np.ndarray, preset: LDMPreset) -> dict[str, Any]:
    """Write a decoded sample's image files (not the metadata); returns its geometry for the metadata.

    Args:
        files: from :func:`ldm_sample_files`.
        image: (*S) float32 decoded image in RAS order.
        preset: the preset (its dimensions and spacing).
    """
    spacing = preset.spacing_mm or (1.0,) * preset.spatial_dims
    image = image.astype(np.float32)
    if preset.spatial_dims == 2:
        if files["image"].name.endswith(f".{PNG}"):
            write_png(files["image"], display_2d(to_uint8(image)))
        else:
            write_image_2d(files["image"], image, spacing)
        if "png" in files:
            write_png(files["png"], display_2d(to_uint8(image)))
        affine = affine_2d(image.shape, spacing)
    else:
        volume = Volume(image, centred_affine(image.shape, spacing))
        write_volume(files["image"], volume)
        if "preview" in files:
            write_preview(files["preview"], volume, windows=UNIT_WINDOW)
        affine = volume.affine
    return {
        "shape": list(image.shape),
        "spacing_mm": list(spacing) if preset.spacing_mm is not None else None,
        "affine_ras": affine.tolist(),
        "value_range": [float(image.min()), float(image.max())],
        "png_mapping": PNG_MAPPING if (PNG in files or files["image"].suffix == f".{PNG}") else None,
    }
