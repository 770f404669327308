"""How much memory one sample needs at least, and the refusal of a plan the machine cannot hold.

A lower bound from the grid, the preset and the checkpoint files' sizes (not a profile), per stage: the mask
stage when the mask is generated (:mod:`maisi.masks.memory`), then the CT stage. :func:`check_memory` runs
before any work, so a grid that cannot fit is refused (exit 2) instead of failing hours later.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from maisi.device import autocast_dtype
from maisi.errors import InputError

if TYPE_CHECKING:
    from maisi.generation.plan import GenerationPlan

GIB = 1 << 30
LATENT_WORKING_COPIES = 4  # noise, current latents, the UNet's output and the scheduler's update


@dataclass(frozen=True)
class MemoryEstimate:
    """A lower bound of a sample's peak memory: on the host and, when it is not the host, the GPU."""

    host_bytes: int
    device_bytes: int  # 0 when the compute device is the CPU (everything is then counted on the host)


CT_STAGE, MASK_STAGE = "CT", "mask"


def estimate_memory(plan: GenerationPlan, device: torch.device) -> MemoryEstimate:
    """Bytes one sample needs at least: the larger of its stages' estimates (:func:`estimate_stages`), on
    the host and on the device each."""
    stages = estimate_stages(plan, device).values()
    return MemoryEstimate(max(e.host_bytes for e in stages), max(e.device_bytes for e in stages))


def estimate_stages(plan: GenerationPlan, device: torch.device) -> dict[str, MemoryEstimate]:
    """Bytes each stage of a sample needs at least, in the order they run: the mask stage when the mask is
    generated (``$.anatomy.controllable_anatomy_size``, :func:`maisi.masks.memory.estimate_mask_memory`),
    then the CT stage (:func:`estimate_ct_memory`). The mask networks are loaded for the whole run and the CT
    networks before the first sample, so each stage also counts the other's weights."""
    generator = plan.anatomy.generator if plan.anatomy is not None else None
    ct = estimate_ct_memory(plan, device)
    if generator is None:
        return {CT_STAGE: ct}
    from maisi.masks.memory import estimate_mask_memory

    mask = estimate_mask_memory(generator)
    ct_weights = sum(_file_size(getattr(plan.config.checkpoints, part)) for part in _ct_parts(plan))
    return {
        MASK_STAGE: _resident(mask.host_bytes, mask.device_bytes, ct_weights, device),
        CT_STAGE: _resident(ct.host_bytes, ct.device_bytes, mask.parts["weights"], device),
    }


def _resident(host: int, on_device: int, weights: int, device: torch.device) -> MemoryEstimate:
    """A stage's estimate with another stage's ``weights`` loaded on ``device`` too."""
    if device.type == "cpu":
        return MemoryEstimate(host + weights, 0)
    return MemoryEstimate(host, on_device + weights)


def _ct_parts(plan: GenerationPlan) -> list[str]:
    return ["autoencoder", "diffusion_unet"] + (["controlnet"] if plan.has_mask else [])


def estimate_ct_memory(plan: GenerationPlan, device: torch.device) -> MemoryEstimate:
    """Bytes the CT stage of one sample needs at least, from the grid, the preset and the checkpoints' sizes.

    A simple lower bound, not a profile: with N output voxels, L latent elements, c0 the VAE decoder's
    full-resolution channels and s = 4 bytes (float32) or 2 (half precision):

    - latents: 4 L bytes x 4 working copies (noise, latents, UNet output, scheduler update), on the device;
    - networks: the checkpoint files' sizes, on the device;
    - mask mode: the mask itself on the host, plus its ControlNet bit-planes: 48 N on the host while they
      are built (int64 labels 8 N, bool planes 8 N, float32 planes 32 N), then 32 N on the device;
    - decoding: the float32 image (4 N), a float32 temporary of the HU conversion (4 N) and the int16 HU
      (2 N) on the host; 'tiled' keeps the whole-volume intermediates of its last steps on the host
      (c0 s N), 'full' holds the last block's input on the device (c0 s N), 'sliding_window' adds MONAI's
      float32 weight map on the host (4 N);
    - on CPU, host and device are one: the device's share is added to the host's.
    """
    config, preset = plan.config, plan.preset
    voxels = int(np.prod(plan.shape))
    latent = int(np.prod(plan.latent_shape))
    half = autocast_dtype(config.precision, device, cpu_bfloat16=True) is not None
    stored = preset.autoencoder["num_channels"][0] * (2 if half else 4) * voxels
    weights = sum(_file_size(getattr(config.checkpoints, part)) for part in _ct_parts(plan))
    mask = plan.mask.array.nbytes if plan.mask is not None else (voxels if plan.has_mask else 0)  # uint8
    planes = 32 * voxels if plan.has_mask else 0
    on_device = weights + 4 * latent * LATENT_WORKING_COPIES + planes
    decode_host = 10 * voxels
    method = config.decoding.method
    if method == "tiled":
        decode_host += stored  # its tiles' working memory is bounded by memory_budget_mb, not counted here
    elif method == "full":
        on_device += stored
    else:
        decode_host += 4 * voxels
    building_planes = mask + (48 * voxels if plan.has_mask else 0)
    if device.type == "cpu":
        return MemoryEstimate(max(building_planes, mask + decode_host + on_device), 0)
    return MemoryEstimate(max(building_planes, mask + decode_host), on_device)


def _file_size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:  # a missing checkpoint is reported when the networks load
        return 0


def available_ram_bytes() -> int:
    """Physical memory of this machine, or the container's cgroup limit when that is lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # cgroup v2; "max" when unlimited
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _what(plan: GenerationPlan, stage: str) -> tuple[str, str, str]:
    """(config location, what needs the memory, estimate's basis) of a stage, for the refusal."""
    grid = " x ".join(map(str, plan.shape))
    ct = f"preset '{plan.preset.name}', {plan.config.decoding.method} decoding"
    if stage == MASK_STAGE:
        generator = plan.anatomy.generator  # type: ignore[union-attr]
        mask_grid = " x ".join(map(str, generator.preset.mask_shape))
        return (
            "$.anatomy.controllable_anatomy_size",
            f"generating its {mask_grid} mask (the mask stage)",
            f"mask preset '{generator.preset.name}', tiled per-tile-argmax decoding, the CT networks loaded",
        )
    where = f"mask {plan.config.mask}" if plan.config.mask is not None else "$.output_size"
    if plan.anatomy is not None and plan.anatomy.generator is not None:
        return where, f"the CT stage on a {grid} grid", ct + ", the mask networks loaded"
    return where, f"a {grid} grid", ct


def check_memory(plan: GenerationPlan, device: torch.device) -> MemoryEstimate:
    """Refuse a plan a stage of which needs more than the RAM (and on CUDA the GPU's memory) by its estimate.

    Raises:
        InputError: naming the stage (mask generation or the CT's grid), the estimate and what the machine
            has.
    """
    ram = available_ram_bytes()
    for stage, need in estimate_stages(plan, device).items():
        where, what, basis = _what(plan, stage)
        advice = "generate a smaller grid or use a machine with more memory"
        if stage == MASK_STAGE:  # the generator's grid is fixed by its preset
            advice = (
                "retrieve a mask instead (no controllable_anatomy_size) or use a machine with more memory"
            )
        elif need.host_bytes > ram and plan.config.decoding.method == "tiled":
            # The tiled decoder's whole-volume intermediates on the host are often what does not fit.
            window = dataclasses.replace(plan.config.decoding, method="sliding_window")
            other = dataclasses.replace(plan, config=dataclasses.replace(plan.config, decoding=window))
            if estimate_stages(other, device)[CT_STAGE].host_bytes <= ram:
                advice = "set $.decoding.method to 'sliding_window' (approximate), " + advice
        if need.host_bytes > ram:
            raise InputError(
                f"{where}: {what} needs at least {need.host_bytes / GIB:.1f} GiB of RAM (estimate for "
                f"{basis} on {device.type}), but this machine has {ram / GIB:.1f} GiB; {advice}"
            )
        if device.type == "cuda":
            gpu = torch.cuda.get_device_properties(device).total_memory
            if need.device_bytes > gpu:
                raise InputError(
                    f"{where}: {what} needs at least {need.device_bytes / GIB:.1f} GiB of GPU memory "
                    f"(estimate for {basis}), but {device} has {gpu / GIB:.1f} GiB; {advice}"
                )
    return estimate_memory(plan, device)
