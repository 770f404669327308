"""Pre-encode one case of a datalist: CT (and label) -> latent, transformed label and sidecar.

Per case: read the image in RAS, map it to [0, 1] as MAISI does for its modality (the entry's ``modality``,
else the config's; :func:`maisi.intensity.to_unit`: CT HU [-1000, 1000], MR its 0-99.5 percentile range, not
clipped), optionally resample to a target spacing (MONAI ``Spacing``), pad to a multiple (MONAI
``DivisiblePad``, unit 0: -1000 HU, or the MR image's minimum),
encode with bounded memory, and write the label on the same grid, then the latent, then the sidecar (last:
it marks the case finished). A finished case whose sidecar still matches its inputs and whose files still
match their checksums is skipped. Non-finite CT voxels fail the case unless the config's ``nonfinite`` is
"fill_air"; a latent that came out non-finite is never written.

With kind "mask" a case is the entry's label mask instead: read in RAS, its MAISI ids checked against the
mask VAE's 125 channels, optionally resampled (nearest), padded with background, turned into 8 bit-planes and
encoded with the mask VAE of a mask preset; the sidecar records kind "mask" and the entry's ``anatomy_size``
when it has one (the mask_diffusion training stage reads them). No label is written.

Before any case runs, :func:`check_outputs` refuses a run whose outputs would land on one of its inputs
or on each other.
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
from maisi import threads
from maisi.conditioning import binarize_labels, body_region_from_mask
from maisi.config.encode_config import EncodeConfig
from maisi.data.datalist import case_modality, one_hot
from maisi.data.io import Volume, read_mask, read_volume, write_volume
from maisi.data.latents import (
    encoded_relpaths,
    latent_affine,
    read_latent,
    read_sidecar,
    sidecar_path,
    write_latent,
    write_sidecar,
)
from maisi.data.metatensor import to_metatensor, to_volume
from maisi.errors import InputError, RunFailure
from maisi.files import file_sha256
from maisi.intensity import HU_MIN, is_mr, to_unit
from maisi.labels import MAX_LABEL
from maisi.run_paths import RunPaths
from maisi.vae.codec import encode


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


def source_key(kind: str) -> str:
    """The datalist key of what a run encodes: the CT ``image``, or (kind "mask") the ``label`` mask."""
    return "label" if kind == "mask" else "image"


def output_paths(job: EncodeJob, image_rel: str, has_label: bool) -> tuple[Path, Path | None]:
    """Latent and transformed-label paths of a case, keeping the datalist's sub-folders (see
    :func:`maisi.data.latents.encoded_relpaths`); ``image_rel`` is the encoded file (the mask, for kind
    "mask")."""
    latent, label = encoded_relpaths(image_rel)
    out = Path(job.config.output_dir)
    return out / latent, (out / label if has_label else None)


def run_paths(
    config: EncodeConfig, entries: list[dict[str, Any]], root: Path, out_datalist: Path
) -> RunPaths:
    """What an encoding run reads (datalist, VAE, each case's image and label) and writes (each case's
    latent, sidecar and label, the output datalist), for the guard of :mod:`maisi.run_paths`."""
    paths = RunPaths().read("the input datalist", config.datalist)
    paths.read("the autoencoder checkpoint", config.autoencoder)
    for i, entry in enumerate(entries):
        if config.kind == "image" and entry.get("image"):  # kind "mask" never reads the CT
            paths.read(f"the image of $.training[{i}]", root / entry["image"])
        if entry.get("label"):
            paths.read(f"the label of $.training[{i}]", root / entry["label"])
    out = Path(config.output_dir)
    paths.write_into("$.output_dir", out)
    key = source_key(config.kind)
    for i, entry in enumerate(entries):
        if not entry.get(key):
            continue  # nothing to encode: refused before this by the run (kind "mask" without a label)
        latent, label = encoded_relpaths(entry[key])
        case = f"$.training[{i}] ({entry[key]})"
        paths.write(f"the latent of {case}", out / latent, case)
        paths.write(f"the sidecar of {case}", sidecar_path(out / latent), case)
        if entry.get("label") and config.kind == "image":
            paths.write(f"the transformed label of {case}", out / label, case)
    return paths.write("the output datalist", out_datalist)


def check_outputs(
    config: EncodeConfig, entries: list[dict[str, Any]], root: Path, out_datalist: Path
) -> None:
    """Refuse, before any work, a run that would write onto one of its own inputs or write one file twice.

    Raises:
        InputError: listing every output that is an input (or lies inside an input folder, e.g. a DICOM
            series) and every pair of cases whose outputs collide, each naming both sides and the path.
    """
    run_paths(config, entries, root, out_datalist).check("encode")


def _fingerprint(
    job: EncodeJob, index: int, entry: dict[str, Any], source_sha: str, label_sha: str | None
) -> dict:
    c = job.config
    mr = {"intensity": "mr_percentile"} if is_mr(case_modality(entry, c.modality)) else {}  # CT: as before
    return {
        **mr,
        "source_image": entry["image"],
        "source_sha256": source_sha,
        "source_label": entry.get("label"),
        "label_sha256": label_sha,
        "vae_sha256": job.vae_sha256,
        "preset": c.preset,
        "target_spacing": list(c.target_spacing) if c.target_spacing else None,
        "pad_to_multiple": c.multiple,
        "latent": c.latent,
        "seed": c.seed + index if c.latent == "sample" else None,
        "tiling": {
            "method": c.tiling.method,
            "roi_size": list(c.tiling.roi_size),
            "overlap": c.tiling.overlap,
        }
        if c.tiling.method == "sliding_window"
        else {"method": c.tiling.method},  # the others are exact
    }


def transform(volume: Volume, target_spacing, multiple: int, mode: str) -> MetaTensor:
    """(1, X, Y, Z) MetaTensor resampled (optional) and padded; ``mode`` 'bilinear' for CT, 'nearest' for
    labels."""
    t = to_metatensor(volume)
    if target_spacing is not None:
        t = Spacing(pixdim=target_spacing, mode=mode, padding_mode="zeros")(t)
    return DivisiblePad(k=multiple, mode="constant", value=0)(t)


def _outputs_intact(sidecar: dict, latent: Path, label: Path | None) -> bool:
    if not latent.is_file() or file_sha256(latent) != sidecar.get("latent_sha256"):
        return False
    return label is None or (label.is_file() and file_sha256(label) == sidecar.get("label_sha256_out"))


def _may_skip(
    job: EncodeJob, previous: dict | None, fingerprint: dict, latent: Path, label: Path | None
) -> bool:
    """A finished case is skipped when its sidecar matches today's inputs and its files are intact."""
    if not previous or previous.get("fingerprint") != fingerprint:
        return False
    if not _outputs_intact(previous, latent, label):
        return False
    if "nonfinite_filled" not in previous:  # written before non-finite checks existed: its latent may be NaN
        return bool(np.isfinite(read_latent(latent)[0]).all())
    # under "error", a case whose voxels were filled earlier is redone (and fails)
    return job.config.nonfinite == "fill_air" or previous["nonfinite_filled"] == 0


def finite_ct(ct: Volume, path: Path, policy: str, mr: bool = False) -> tuple[Volume, int]:
    """The image with its non-finite voxels handled by ``policy``, and how many there were.

    One NaN voxel spreads through the encoder's convolutions and normalisations to the whole latent, so
    "error" refuses the case; "fill_air" sets those voxels to -1000 HU (CT) or, for MR (``mr``), to the
    smallest finite value of the image (its background).

    Raises:
        InputError: non-finite voxels under the "error" policy, naming the file and the count.
    """
    bad = ~np.isfinite(ct.array)
    count = int(bad.sum())
    if count == 0:
        return ct, 0
    if policy == "error":
        raise InputError(
            f"{path}: {count} non-finite voxel(s) (NaN or inf) in the CT; fix the image, or set "
            '"nonfinite": "fill_air" in the encode config to encode them as air (-1000 HU)'
        )
    fill = float(np.min(ct.array[~bad])) if mr and count < ct.array.size else HU_MIN
    return ct.with_array(np.where(bad, fill, ct.array)), count


def _check_ct_has_air(ct: Volume, path: Path, modality: str) -> None:
    """Refuse a "CT" with no voxel below 0 HU: air is -1000 HU and fat about -100, so this is an MR image
    listed as CT or a CT stored without its rescale intercept (air at +24); clipped to [-1000, 1000] HU it
    would be encoded as something it is not.

    Raises:
        InputError: naming ``path``, the lowest value and the two ways out.
    """
    lowest = float(np.min(ct.array))
    if lowest < 0:
        return
    raise InputError(
        f"{path}: no voxel below 0 HU (lowest {lowest:g}) in an image encoded as {modality}: not CT in HU "
        "(an MR image? set the entry's or the config's \"modality\"), or a CT stored without its rescale "
        "intercept (air should be -1000 HU)"
    )


def _check_label_range(labels: np.ndarray, path: Path) -> None:
    """Refuse labels the written uint8 label cannot hold: a cast would wrap -1 to 255 (a valid MAISI id) and
    the ControlNet reads labels as 8 bit-planes anyway.

    Raises:
        InputError: naming ``path`` and the labels outside 0..MAX_LABEL.
    """
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi <= MAX_LABEL:
        return
    values = np.unique(labels)
    bad = [int(v) for v in values[(values < 0) | (values > MAX_LABEL)]]
    shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    raise InputError(
        f"{path}: label(s) [{shown}] outside 0..{MAX_LABEL} (MAISI ids); remap the mask to MAISI ids "
        "first (python -m maisi.labels remap)"
    )


def _check_finite_latent(latent: torch.Tensor, image_path: Path) -> None:
    bad = int((~torch.isfinite(latent)).sum())
    if bad:
        raise RunFailure(
            f"{image_path}: its latent has {bad} non-finite value(s) of {latent.numel()}; "
            "nothing of this case was written (check the VAE checkpoint and the precision)"
        )


def _datalist_entry(job: EncodeJob, sidecar: dict, latent: Path, label: Path | None) -> dict[str, Any]:
    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), job.output_datalist_dir.resolve())).as_posix()

    entry = {"image": rel(latent), "label": rel(label) if label else None}
    keys = ("dim", "spacing", "top_region_index", "bottom_region_index", "modality", "fold", "anatomy_size")
    entry.update({k: sidecar[k] for k in keys if sidecar.get(k) is not None})
    return entry


def _mask_fingerprint(job: EncodeJob, index: int, entry: dict[str, Any], mask_sha: str) -> dict:
    """What a mask latent depends on: the mask, its size vector (recorded in the sidecar) and the settings."""
    sources = ("source_image", "source_sha256", "source_label", "label_sha256")
    settings = {k: v for k, v in _fingerprint(job, index, entry, "", None).items() if k not in sources}
    return {
        "kind": "mask",
        "source_label": entry["label"],
        "label_sha256": mask_sha,
        "anatomy_size": entry.get("anatomy_size"),
        **settings,
    }


def mask_bit_planes(job: EncodeJob, mask: Volume, path: Path) -> tuple[MetaTensor, torch.Tensor]:
    """A MAISI-id mask resampled (nearest, optional) and padded with background: (1, X, Y, Z) MetaTensor of
    ids, and its (1, 8, X, Y, Z) float bit-planes, the mask VAE's input.

    Raises:
        InputError: ids the mask VAE has no channel for (named, with the file).
    """
    from maisi.training.mask_autoencoder import unknown_ids, unknown_ids_message

    bad = unknown_ids(mask.array)
    if bad:
        raise InputError(unknown_ids_message(path, bad))
    ids = transform(
        mask.with_array(mask.array.astype(np.int16)),
        job.config.target_spacing,
        job.config.multiple,
        "nearest",
    )
    return ids, binarize_labels(ids.as_tensor().round().long()[None])


def _encode_checked(job: EncodeJob, index: int, volume: torch.Tensor, source: Path) -> torch.Tensor:
    """(1, C, X, Y, Z) VAE input -> its (C', x, y, z) latent, with the config's tiling and the case's seeded
    generator; refused when not finite, before anything of the case is written.

    Raises:
        RunFailure: the latent holds NaN or inf (naming ``source``).
    """
    c = job.config
    generator = torch.Generator().manual_seed(c.seed + index)
    latent = encode(
        job.autoencoder,
        volume.to(job.device),
        method=c.tiling.method,
        roi_size=c.tiling.roi_size,
        overlap=c.tiling.overlap,
        memory_budget_bytes=c.tiling.memory_budget_mb << 20,
        sample=c.latent == "sample",
        generator=generator,
        autocast_dtype=job.dtype,
    )[0]
    _check_finite_latent(latent, source)
    return latent


def _write_latent_and_sidecar(
    job: EncodeJob,
    latent_out: Path,
    latent: torch.Tensor,
    affine: np.ndarray,
    sidecar: dict[str, Any],
    fingerprint: dict,
) -> None:
    """Write the latent (on the grid ``vae_factor`` times coarser than ``affine``), then its sidecar with the
    latent's checksum and the case's fingerprint; the sidecar last, as it marks the case finished."""
    write_latent(latent_out, latent.numpy(), latent_affine(affine, job.vae_factor))
    sidecar["latent_sha256"] = file_sha256(latent_out)
    sidecar["fingerprint"] = fingerprint
    write_sidecar(latent_out, sidecar)


def encode_mask_case(job: EncodeJob, index: int, entry: dict[str, Any]) -> CaseResult:
    """Encode one entry's label mask with the mask VAE (or skip it when finished and intact)."""
    t0 = time.perf_counter()
    mask_path = job.root / entry["label"]
    latent_out, _ = output_paths(job, entry["label"], False)
    if not mask_path.exists():
        raise InputError(f"file not found: {mask_path}")
    fingerprint = _mask_fingerprint(job, index, entry, file_sha256(mask_path))
    previous = read_sidecar(latent_out)
    if _may_skip(job, previous, fingerprint, latent_out, None):
        return CaseResult(
            index, entry["label"], "skipped", entry=_datalist_entry(job, previous, latent_out, None)
        )
    mask = read_mask(mask_path)
    ids, bits = mask_bit_planes(job, mask, mask_path)
    latent = _encode_checked(job, index, bits, mask_path)
    affine = ids.affine.numpy().astype(np.float64)
    sidecar: dict[str, Any] = {
        "kind": "mask",
        "dim": list(ids.shape[1:]),
        "spacing": [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "fold": entry.get("fold"),
        "latent_shape": list(latent.shape),
        "label_ids": sorted(int(v) for v in np.unique(mask.array)),
        "maisi_version": maisi.__version__,
        "threads": threads.record(),  # torch threads, and why
    }
    if entry.get("anatomy_size") is not None:
        sidecar["anatomy_size"] = list(entry["anatomy_size"])
    _write_latent_and_sidecar(job, latent_out, latent, affine, sidecar, fingerprint)
    return CaseResult(
        index,
        entry["label"],
        "encoded",
        entry=_datalist_entry(job, sidecar, latent_out, None),
        seconds=time.perf_counter() - t0,
    )


def encode_case(job: EncodeJob, index: int, entry: dict[str, Any]) -> CaseResult:
    """Encode one datalist entry (or skip it when its outputs are finished and intact)."""
    if job.config.kind == "mask":
        return encode_mask_case(job, index, entry)
    t0 = time.perf_counter()
    image_path = job.root / entry["image"]
    label_path = job.root / entry["label"] if entry.get("label") else None
    latent_out, label_out = output_paths(job, entry["image"], label_path is not None)
    for p in (image_path, label_path):
        if p is not None and not p.exists():
            raise InputError(f"file not found: {p}")
    fingerprint = _fingerprint(
        job, index, entry, file_sha256(image_path), file_sha256(label_path) if label_path else None
    )
    previous = read_sidecar(latent_out)
    if _may_skip(job, previous, fingerprint, latent_out, label_out):
        return CaseResult(
            index, entry["image"], "skipped", entry=_datalist_entry(job, previous, latent_out, label_out)
        )

    c = job.config
    modality = case_modality(entry, c.modality)
    ct, filled = finite_ct(read_volume(image_path), image_path, c.nonfinite, is_mr(modality))
    if not is_mr(modality):
        _check_ct_has_air(ct, image_path, modality)
    unit_array, intensity = to_unit(ct.array, modality, str(image_path))
    unit = ct.with_array(unit_array)
    image_t = transform(unit, c.target_spacing, c.multiple, "bilinear")
    regions = None
    if label_path is not None:
        mask = read_mask(label_path)
        if not mask.same_grid(ct):
            raise InputError(f"{label_path}: grid {list(mask.shape)} differs from its image {list(ct.shape)}")
        _check_label_range(mask.array, label_path)
        label_t = transform(
            mask.with_array(mask.array.astype(np.int16)), c.target_spacing, c.multiple, "nearest"
        )
        label_vol = to_volume(label_t, np.uint8)
        regions = body_region_from_mask(label_vol.array)
    latent = _encode_checked(job, index, image_t.as_tensor()[None].float(), image_path)
    image_affine = image_t.affine.numpy().astype(np.float64)
    sidecar: dict[str, Any] = {
        "dim": list(image_t.shape[1:]),
        "spacing": [round(float(s), 6) for s in np.linalg.norm(image_affine[:3, :3], axis=0)],
        "modality": modality,
        "fold": entry.get("fold"),
        "latent_shape": list(latent.shape),
        "intensity": intensity,  # how the image was mapped to [0, 1] (MR: the window of this image)
        "maisi_version": maisi.__version__,
        "nonfinite_filled": filled,  # voxels set to -1000 HU (MR: the image minimum) by "fill_air"
        "threads": threads.record(),  # torch threads, and why
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
    _write_latent_and_sidecar(job, latent_out, latent, image_affine, sidecar, fingerprint)
    return CaseResult(
        index,
        entry["image"],
        "encoded",
        entry=_datalist_entry(job, sidecar, latent_out, label_out),
        seconds=time.perf_counter() - t0,
    )
