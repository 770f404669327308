"""Pre-encode one case of a datalist: CT (and label) -> latent, transformed label and sidecar.

Per case: read the CT in RAS, map HU [-1000, 1000] to [0, 1] (MAISI's intensity transform), optionally
resample to a target spacing (MONAI ``Spacing``), pad to a multiple (MONAI ``DivisiblePad``, -1000 HU),
encode with bounded memory, and write the label on the same grid, then the latent, then the sidecar (last:
it marks the case finished). A finished case whose sidecar still matches its inputs and whose files still
match their checksums is skipped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import DivisiblePad, Spacing

import maisi
from maisi.checkpoints import file_sha256
from maisi.conditioning import body_region_from_mask
from maisi.config.encode_config import EncodeConfig
from maisi.data.datalist import one_hot
from maisi.data.io import Volume, read_mask, read_volume, write_volume
from maisi.data.latents import latent_affine, read_sidecar, stem, write_latent, write_sidecar
from maisi.decoding import encode
from maisi.errors import InputError
from maisi.intensity import HU_MAX, HU_MIN, hu_to_unit


@dataclass(frozen=True)
class CaseResult:
    """What happened to one datalist entry; ``entry`` is its line in the output datalist when it succeeded."""

    index: int
    image: str
    status: Literal["encoded", "skipped", "failed", "pending"]
    reason: str | None = None
    entry: dict[str, Any] | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class EncodeJob:
    """What every case of a run shares."""

    config: EncodeConfig
    autoencoder: torch.nn.Module
    vae_factor: int
    vae_sha256: str
    root: Path
    output_datalist_dir: Path
    device: torch.device
    dtype: torch.dtype | None


def output_paths(job: EncodeJob, image_rel: str, has_label: bool) -> tuple[Path, Path | None]:
    """Latent and transformed-label paths of a case, keeping the datalist's sub-folders.

    Outputs never leave ``output_dir``: ``..`` and root parts of the image path are dropped
    (``../cases/c1/ct.nii.gz`` -> ``<output_dir>/cases/c1/ct_emb.nii.gz``).
    """
    parts = [p for p in Path(image_rel).parent.parts if p not in ("..", ".", "/") and not Path(p).anchor]
    folder = Path(job.config.output_dir).joinpath(*parts)
    name = stem(image_rel)
    return folder / f"{name}_emb.nii.gz", (folder / f"{name}_label.nii.gz" if has_label else None)


def _fingerprint(job: EncodeJob, index: int, entry: dict[str, Any], source_sha: str, label_sha: str | None) -> dict:
    c = job.config
    return {
        "source_image": entry["image"], "source_sha256": source_sha, "source_label": entry.get("label"),
        "label_sha256": label_sha, "vae_sha256": job.vae_sha256, "preset": c.preset,
        "target_spacing": list(c.target_spacing) if c.target_spacing else None, "pad_to_multiple": c.multiple,
        "latent": c.latent, "seed": c.seed + index if c.latent == "sample" else None,
        "tiling": {"method": c.tiling.method, "roi_size": list(c.tiling.roi_size), "overlap": c.tiling.overlap}
        if c.tiling.method == "sliding_window" else {"method": c.tiling.method},  # the others are exact
    }  # fmt: skip


def transform(volume: Volume, target_spacing, multiple: int, mode: str) -> MetaTensor:
    """(1, X, Y, Z) MetaTensor resampled (optional) and padded; ``mode`` 'bilinear' for CT, 'nearest' for labels."""
    t = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array))[None], affine=torch.as_tensor(volume.affine))
    if target_spacing is not None:
        t = Spacing(pixdim=target_spacing, mode=mode, padding_mode="zeros")(t)
    return DivisiblePad(k=multiple, mode="constant", value=0)(t)


def _to_volume(t: MetaTensor, dtype) -> Volume:
    return Volume(t[0].numpy().astype(dtype), t.affine.numpy().astype(np.float64))


def _outputs_intact(sidecar: dict, latent: Path, label: Path | None) -> bool:
    if not latent.is_file() or file_sha256(latent) != sidecar.get("latent_sha256"):
        return False
    return label is None or (label.is_file() and file_sha256(label) == sidecar.get("label_sha256_out"))


def _datalist_entry(job: EncodeJob, sidecar: dict, latent: Path, label: Path | None) -> dict[str, Any]:
    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), job.output_datalist_dir.resolve())).as_posix()

    entry = {"image": rel(latent), "label": rel(label) if label else None}
    keys = ("dim", "spacing", "top_region_index", "bottom_region_index", "modality", "fold")
    entry.update({k: sidecar[k] for k in keys if sidecar.get(k) is not None})
    return entry


def encode_case(job: EncodeJob, index: int, entry: dict[str, Any]) -> CaseResult:
    """Encode one datalist entry (or skip it when its outputs are finished and intact)."""
    t0 = time.perf_counter()
    image_path = job.root / entry["image"]
    label_path = job.root / entry["label"] if entry.get("label") else None
    latent_out, label_out = output_paths(job, entry["image"], label_path is not None)
    for p in (image_path, label_path):
        if p is not None and not p.exists():
            raise InputError(f"file not found: {p}")
    fingerprint = _fingerprint(job, index, entry, file_sha256(image_path), file_sha256(label_path) if label_path else None)
    previous = read_sidecar(latent_out)
    if previous and previous.get("fingerprint") == fingerprint and _outputs_intact(previous, latent_out, label_out):
        return CaseResult(index, entry["image"], "skipped", entry=_datalist_entry(job, previous, latent_out, label_out))

    c = job.config
    ct = read_volume(image_path)
    unit = ct.with_array(hu_to_unit(ct.array))
    image_t = transform(unit, c.target_spacing, c.multiple, "bilinear")
    regions = None
    if label_path is not None:
        mask = read_mask(label_path)
        if not mask.same_grid(ct):
            raise InputError(f"{label_path}: grid {list(mask.shape)} differs from its image {list(ct.shape)}")
        label_t = transform(mask.with_array(mask.array.astype(np.int16)), c.target_spacing, c.multiple, "nearest")
        label_vol = _to_volume(label_t, np.uint8 if mask.array.max() <= 255 else np.int16)
        regions = body_region_from_mask(label_vol.array)
    generator = torch.Generator().manual_seed(c.seed + index)
    latent = encode(job.autoencoder, image_t.as_tensor()[None].float().to(job.device), method=c.tiling.method,
                    roi_size=c.tiling.roi_size, overlap=c.tiling.overlap,
                    memory_budget_bytes=c.tiling.memory_budget_mb << 20, sample=c.latent == "sample",
                    generator=generator, autocast_dtype=job.dtype)[0]  # fmt: skip
    image_affine = image_t.affine.numpy().astype(np.float64)
    sidecar: dict[str, Any] = {
        "dim": list(image_t.shape[1:]),
        "spacing": [round(float(s), 6) for s in np.linalg.norm(image_affine[:3, :3], axis=0)],
        "modality": entry.get("modality", c.modality),
        "fold": entry.get("fold"),
        "latent_shape": list(latent.shape),
        "intensity": {"hu_window": [HU_MIN, HU_MAX], "scaled_to": [0.0, 1.0], "pad_value_hu": HU_MIN},
        "maisi_version": maisi.__version__,
    }
    for key, value in (("top_region_index", 0), ("bottom_region_index", 1)):
        if entry.get(key) is not None:
            sidecar[key] = entry[key]
        elif regions is not None:
            sidecar[key] = one_hot(regions[value])
    if label_out is not None:
        write_volume(label_out, label_vol)
        sidecar["label"] = label_out.name
        sidecar["label_sha256_out"] = file_sha256(label_out)
    write_latent(latent_out, latent.numpy(), latent_affine(image_affine, job.vae_factor))
    sidecar["latent_sha256"] = file_sha256(latent_out)
    sidecar["fingerprint"] = fingerprint
    write_sidecar(latent_out, sidecar)
    return CaseResult(index, entry["image"], "encoded", entry=_datalist_entry(job, sidecar, latent_out, label_out),
                      seconds=time.perf_counter() - t0)  # fmt: skip
