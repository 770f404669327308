"""Generate a mask from organ sizes: MAISI's Path A (``$.anatomy.controllable_anatomy_size``).

Per sample, in MAISI's order (NV-Generate-CTMR ``LDMSampler.sample_one_mask`` and
``ensure_output_size_and_spacing``):

1. the size request is snapped to the nearest row of the size table, then the named slots overwrite it
   (:func:`maisi.masks.sizes.snap_to_table`; once per job, the same vector for every sample);
2. DDPM sampling of the mask latent, conditioned by cross-attention on that vector, through the one
   denoising loop of :func:`maisi.sampling.denoise` (starting and per-step noise: streams of the sample's
   seed, :mod:`maisi.seeding`);
3. decoding with the exact tiled decoder and a per-tile argmax (:func:`maisi.masks.decode.decode_mask_labels`:
   the class logits of the whole volume never exist), channel -> MAISI id;
4. MAISI's post-processing (:func:`maisi.masks.postprocess.postprocess_generated_mask`);
5. nearest resampling to ``$.output_size`` / ``$.spacing``; a requested organ that the resampling loses
   stops the sample with MAISI's meaning ("Resampled mask does not contain required class labels").

The mask keeps MAISI ids and every organ. The record holds the requested, snapped and final size vectors and
the organ volumes (mL) of the generated mask on its own grid, with their sizes on the reference's scale when a
size reference is configured (:mod:`maisi.masks.sizes`), so what was asked can be compared with what came out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi.config.infer_config import InferConfig, MaskGeneratorConfig
from maisi.data.io import Volume, centred_affine
from maisi.errors import InputError, RunFailure
from maisi.families.ct import check_sampler
from maisi.families.mask import MaskPreset, get_mask_preset
from maisi.files import file_sha256, why_absent
from maisi.masks.decode import channels_to_maisi_ids, decode_mask_labels
from maisi.masks.networks import MaskNetworks, load_mask_networks
from maisi.masks.postprocess import postprocess_generated_mask
from maisi.masks.resample import resample_mask
from maisi.masks.sizes import (
    SIZE_SLOTS,
    SLOT_IDS,
    SizeReference,
    SizeSnap,
    load_size_reference,
    load_size_table,
    organ_volumes_ml,
    size_of_volume,
    snap_to_table,
    target_tumour_id,
)
from maisi.options import MaskSampler
from maisi.resources import checkout_file
from maisi.sampling import denoise, make_scheduler
from maisi.seeding import torch_generator

log = logging.getLogger(__name__)

# What a released CT preset uses when $.anatomy.mask_generator leaves a file null (maisi.download's layout).
RELEASED_GENERATOR = {
    "preset": "maisi-mask-ddpm",
    "autoencoder": "models/maisi/mask_generation_autoencoder.pt",
    "diffusion_unet": "models/maisi/mask_generation_diffusion_unet.pt",
    "size_conditions": "models/maisi/datasets/all_anatomy_size_conditions.json",
}
RELEASED_CT_PRESETS = ("maisi-ct-ddpm", "maisi-ct-rflow")


@dataclass(frozen=True)
class MaskGenerationPlan:
    """A checked size request with its loaded generator; makes each sample's mask on demand.

    Attributes:
        preset: the mask preset (architecture, latent shape, native spacing).
        networks: the loaded mask VAE and UNet on the compute device, and the UNet's ``scale_factor``.
        request: the ``(name, size)`` pairs as configured.
        snap: the nearest table row and the final conditioning vector.
        required_ids: MAISI ids the mask must hold (named slots whose size is not -1).
        reference: size reference for reporting achieved sizes, or None.
        files: path and SHA-256 of every file the masks depend on (part of the job's identity).
        output_size, spacing: the output grid.
        sampler: ``"ddpm"`` (MAISI's, all training timesteps) or ``"ddim"``.
        num_steps: the sampler's steps.
        device: where the networks run.
    """

    preset: MaskPreset
    networks: MaskNetworks
    request: tuple[tuple[str, float], ...]
    snap: SizeSnap
    required_ids: tuple[int, ...]
    reference: SizeReference | None
    files: dict[str, dict[str, str]]
    output_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    sampler: MaskSampler
    num_steps: int
    device: torch.device

    @property
    def target_tumour(self) -> int | None:
        return target_tumour_id(self.snap.final)


def _resolve(value: str | None, key: str, preset: str) -> Path:
    """A configured file, or the released default of a released CT preset."""
    if value is not None:
        return Path(value)
    if preset in RELEASED_CT_PRESETS:
        return checkout_file(RELEASED_GENERATOR[key], f"$.anatomy.mask_generator.{key}")
    raise InputError(
        f"$.anatomy.mask_generator.{key}: required for preset '{preset}' (only the released MAISI presets "
        "have a default: the files of python -m maisi.download)"
    )


def _existing(path: Path, key: str) -> Path:
    if not path.is_file():
        raise InputError(
            f"$.anatomy.mask_generator.{key}: {path} {why_absent(path)} (the released mask generator and its "
            "size table come with python -m maisi.download)"
        )
    return path


def plan_mask_generation(config: InferConfig, device: torch.device) -> MaskGenerationPlan:
    """Check the size request against the generator's files and load the generator; generates nothing.

    Raises:
        InputError: a missing file, a size table that is not MAISI's format or does not fit the checkpoint's
            conditioning width, a reference that is not one, or a checkpoint of another shape.
    """
    anatomy = config.anatomy
    assert anatomy is not None and anatomy.generates_mask and config.output_size and config.spacing
    generator: MaskGeneratorConfig = anatomy.mask_generator
    preset_name = generator.preset or (
        RELEASED_GENERATOR["preset"] if config.preset in RELEASED_CT_PRESETS else None
    )
    if preset_name is None:
        raise InputError(
            f"$.anatomy.mask_generator.preset: required for preset '{config.preset}' (only the released "
            "MAISI presets have a default, maisi-mask-ddpm)"
        )
    try:
        preset = get_mask_preset(preset_name)
    except InputError as e:
        raise InputError(f"$.anatomy.mask_generator.preset: {e}") from None
    paths = {
        key: _existing(_resolve(getattr(generator, key), key, config.preset), key)
        for key in ("autoencoder", "diffusion_unet", "size_conditions")
    }
    width = int(preset.diffusion_unet["cross_attention_dim"])
    table = load_size_table(paths["size_conditions"], width)
    reference = None
    if generator.size_reference is not None:
        paths["size_reference"] = _existing(Path(generator.size_reference), "size_reference")
        reference = load_size_reference(paths["size_reference"])
    networks = load_mask_networks(preset, paths["autoencoder"], paths["diffusion_unet"], device)
    snap = snap_to_table(anatomy.controllable_anatomy_size, table)
    problems = check_sampler(preset.schedule, generator.scheduler, generator.steps)
    if problems:
        raise InputError(f"$.anatomy.mask_generator.num_inference_steps: {problems[0]}")
    names = dict(zip(SIZE_SLOTS, SLOT_IDS))
    return MaskGenerationPlan(
        preset=preset,
        networks=networks,
        request=tuple(anatomy.controllable_anatomy_size),
        snap=snap,
        required_ids=tuple(names[n] for n in anatomy.required_anatomy),
        reference=reference,
        files={k: {"path": str(p), "sha256": file_sha256(p)} for k, p in paths.items()},
        output_size=config.output_size,
        spacing=config.spacing,
        sampler=generator.scheduler,
        num_steps=generator.steps,
        device=device,
    )


@torch.no_grad()
def sample_mask_labels(plan: MaskGenerationPlan, seed: int, progress: bool = False) -> np.ndarray:
    """Sample the mask latent of ``seed`` and decode it: (X, Y, Z) MAISI ids on the generator's grid."""
    nets, device = plan.networks, plan.device
    # Noise on the CPU, as for the CT: a seed gives the same mask on every device.
    noise = torch.randn((1, *plan.preset.latent_shape), generator=torch_generator(seed, "mask_initial_noise"))
    context = torch.tensor(plan.snap.final, dtype=torch.float32).reshape(1, 1, -1).to(device)
    latent = denoise(
        nets.diffusion_unet,
        make_scheduler(plan.preset.schedule, plan.sampler),
        noise.to(device),
        plan.num_steps,
        {"context": context},
        generator=torch_generator(seed, "mask_step_noise", device),
        progress=progress,
    )
    channels = decode_mask_labels(nets.autoencoder, latent, nets.scale_factor, progress=progress)
    return channels_to_maisi_ids(channels)[0, 0].numpy()


def _achieved(mask: np.ndarray, spacing: tuple[float, ...], plan: MaskGenerationPlan) -> dict[str, Any]:
    """Volume (mL) and, with a reference, size of each slot's organ in the generated mask (a null size with
    its reason where the reference has no volumes of that organ)."""
    volumes = organ_volumes_ml(mask, spacing)
    out: dict[str, Any] = {"volumes_ml": {s: round(float(v), 3) for s, v in zip(SIZE_SLOTS, volumes)}}
    if plan.reference is None:
        out["sizes"] = None
        out["reason"] = "not checked: no $.anatomy.mask_generator.size_reference to put volumes on the scale"
        return out
    sizes, reasons = {}, {}
    for slot, volume in zip(SIZE_SLOTS, volumes):
        known = plan.reference.get(slot) is not None and len(plan.reference[slot]) > 0
        sizes[slot] = round(size_of_volume(slot, float(volume), plan.reference), 4) if known else None
        if not known:  # no volumes to rank it among: a null size says why
            reasons[slot] = f"not checked: the size reference has no {slot}"
    out["sizes"] = sizes
    out["reasons"] = reasons  # slot -> why its size is null (empty when every slot was measured)
    return out


def _lost(plan: MaskGenerationPlan, mask: np.ndarray) -> list[int]:
    present = set(np.unique(mask).tolist())
    return [i for i in plan.required_ids if i not in present]


def generate_mask(
    plan: MaskGenerationPlan, seed: int, progress: bool = False
) -> tuple[Volume, dict[str, Any]]:
    """The generated, post-processed mask of ``seed`` on the output grid, and its record.

    Raises:
        RunFailure: a requested organ is missing from the generated mask or lost by the resampling to
            the output grid (MAISI: "Resampled mask does not contain required class labels"); the inputs
            were valid, so this is the sample's failure (exit 1), not bad input.
    """
    started = time.perf_counter()
    names = dict(zip(SLOT_IDS, SIZE_SLOTS))
    labels = sample_mask_labels(plan, seed, progress)
    cleaned, post = postprocess_generated_mask(labels, plan.target_tumour)
    native_grid = centred_affine(plan.preset.mask_shape, [plan.preset.spacing_mm] * 3)
    native = Volume(cleaned.astype(np.int16), native_grid)
    record: dict[str, Any] = {
        "source": "generated (MAISI's mask diffusion model, Path A)",
        "request": {"controllable_anatomy_size": [list(pair) for pair in plan.request]},
        "size_table_row": plan.snap.row,
        "size_table_distance": round(plan.snap.distance, 6),
        "snapped_sizes": dict(zip(SIZE_SLOTS, plan.snap.snapped)),
        "conditioning_sizes": dict(zip(SIZE_SLOTS, plan.snap.final)),
        "generator": {
            "preset": plan.preset.name,
            "sampler": plan.sampler,
            "steps": plan.num_steps,
            "files": plan.files,
        },
        "post_processing": post,
        "achieved": _achieved(cleaned, native.spacing, plan),
    }
    missing = _lost(plan, cleaned)
    if missing:
        raise RunFailure(
            f"seed {seed}: the generated mask holds no {', '.join(repr(names[i]) for i in missing)} "
            "(asked for with a size other than -1); try other seeds or sizes"
        )
    volume, resampling = resample_mask(native, plan.spacing, plan.output_size)
    record["resampling"] = resampling
    record["seconds"] = round(time.perf_counter() - started, 3)
    lost = _lost(plan, volume.array)
    if lost:
        raise RunFailure(
            f"seed {seed}: resampled mask does not contain required class labels "
            f"{', '.join(repr(names[i]) for i in lost)} on the output grid {list(plan.output_size)} at "
            f"{list(plan.spacing)} mm (generated at {plan.preset.spacing_mm:g} mm); a finer $.spacing or a "
            "larger $.output_size keeps them"
        )
    return volume, record
