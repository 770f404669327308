"""The memory a generated mask needs (MAISI's Path A), estimated before any work.

With ``$.anatomy.controllable_anatomy_size`` each sample first makes its mask, then its CT;
:func:`maisi.generation.memory.check_memory` judges both stages and asks this module for the first. Like
the CT's, the estimate is a lower bound of what the stage allocates (not the process's baseline nor the
allocator's slack): a run refused that would have fit is worse than one that stops later.

Measured on a CPU (one thread, shared machine; random weights of ``maisi-mask-ddpm``, peak RSS over the RSS
before the step): the 64^3 streamed decode 1536 MB (estimate 1252, 0.82), at 32^3 833 MB (611, 0.73); one
UNet forward on the 4 x 64^3 latent 1492 MB (1078: the attention matrix at 16^3 tokens, 0.72). The tiny and
demo presets' stage measures about 200 MB over the estimate's 44 MB: the libraries' first-use buffers, not
arrays (``tools/bench_mask_memory.py``). ``tests/test_generation_memory.py`` keeps the released preset's
terms under these measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maisi.families.networks import RuntimeOptions
from maisi.masks.generation import MaskGenerationPlan
from maisi.vae.monai_adapter import check_structure
from maisi.vae.tiled import DEFAULT_BUDGET_BYTES, plan_tiles

FLOAT32 = 4
LATENT_COPIES = 4  # noise, current latents, the UNet's output and the scheduler's update
ATTENTION_COPIES = 2  # MONAI's attention without flash: the scores and their scaled / softmaxed copy
ROWS_HELD = (
    3  # rows a streamed level's intermediate holds (the consumer's window with its halo, the next one)
)
# After the decode, per voxel of the generated grid: the uint8 channel indices (1), their int64 lookup index
# (8) and the int16 MAISI ids (2); the post-processing then works on int16 copies and boolean masks.
DECODED_BYTES_PER_VOXEL = 11


@dataclass(frozen=True)
class MaskStageMemory:
    """Bytes the mask stage needs at least, without the CT networks (the caller adds what else is resident).

    Attributes:
        host_bytes: on the host (with the device's share when the device is the CPU).
        device_bytes: on the GPU; 0 on the CPU.
        parts: the estimate's terms in bytes, for the message and the tests.
    """

    host_bytes: int
    device_bytes: int
    parts: dict[str, int]


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def attention_bytes(plan: MaskGenerationPlan) -> int:
    """The largest self-attention matrix of the mask UNet on its latent, ``ATTENTION_COPIES`` times
    (float32: MAISI's UNet upcasts attention); 0 with flash attention (CUDA), which never builds it."""
    if RuntimeOptions.for_device(plan.device).use_flash_attention:
        return 0
    unet = plan.preset.diffusion_unet
    spatial = plan.preset.latent_shape[1:]
    largest = 0
    for level, (channels, attends) in enumerate(zip(unet["channels"], unet["attention_levels"])):
        if not attends:
            continue
        heads = channels // unet["num_head_channels"][level]
        tokens = math.prod(max(1, s >> level) for s in spatial)
        largest = max(largest, heads * tokens * tokens)
    return ATTENTION_COPIES * FLOAT32 * largest


def decode_bytes(
    autoencoder: torch.nn.Module, latent_shape: tuple[int, ...], mask_shape: tuple[int, ...], classes: int
) -> tuple[int, int]:
    """(storage bytes on the host, tile bytes on the device) of :func:`maisi.masks.decode.decode_mask_labels`
    decoding a (C, x, y, z) latent to ``mask_shape`` labels of ``classes`` channels.

    Tiled with streamed levels (its default): a level's input is stored whole while its output grows and
    the rows of its first intermediate are held; the stored steps before the first level hold their input
    or output whole; the result is one byte a voxel. Each tile's working set is the planner's estimate at
    the decoder's default budget. A VAE the tiled path does not know decodes the whole class logits (MONAI's
    sliding window): ``classes`` float32 channels a voxel on the host.
    """
    shape = (1, *latent_shape)
    if check_structure(autoencoder, "decoder") is not None:
        voxels = math.prod(mask_shape)
        return FLOAT32 * classes * voxels + voxels, 0
    plans = plan_tiles(autoencoder, shape, memory_budget_bytes=DEFAULT_BUDGET_BYTES, stream_levels=True)
    stored = 0
    streaming = False
    for plan in plans:
        volume_in = FLOAT32 * plan.channels[0] * math.prod(plan.in_shape)
        volume_out = FLOAT32 * plan.channels[1] * math.prod(plan.out_shape)
        if plan.out_shape != plan.in_shape:  # an upsampling: a streamed level starts from its stored input
            streaming = True
            rows = (
                ROWS_HELD * plan.tile[0] * plan.out_shape[1] * plan.out_shape[2] * plan.channels[1] * FLOAT32
            )
            stored = max(stored, volume_in + rows)
        elif not streaming:
            stored = max(stored, volume_in, volume_out)
    labels = math.prod(plans[-1].out_shape)  # uint8
    return stored + labels, max(p.tile_bytes for p in plans)


def estimate_mask_memory(plan: MaskGenerationPlan) -> MaskStageMemory:
    """The mask stage's peak, at least: its networks, then the larger of the DDPM loop (latents and the UNet's
    attention matrix), the tiled decode and the decoded labels' conversion.

    The mask networks stay loaded for the whole run (each sample generates its mask, then its CT), so the
    caller counts their weights in the CT stage too.
    """
    nets = plan.networks
    weights = _module_bytes(nets.autoencoder) + _module_bytes(nets.diffusion_unet)
    latents = FLOAT32 * LATENT_COPIES * math.prod(plan.preset.latent_shape)
    attention = attention_bytes(plan)
    preset = plan.preset
    storage, tile = decode_bytes(nets.autoencoder, preset.latent_shape, preset.mask_shape, preset.num_classes)
    decoded = DECODED_BYTES_PER_VOXEL * math.prod(plan.preset.mask_shape)
    parts = {
        "weights": weights,
        "latents": latents,
        "attention": attention,
        "decode_storage": storage,
        "decode_tile": tile,
        "decoded": decoded,
    }
    if plan.device.type == "cpu":
        peak = max(latents + attention, storage + tile, decoded)
        return MaskStageMemory(weights + peak, 0, parts)
    # the decode's intermediates live on the host (pinned), its tiles and the loop on the device
    return MaskStageMemory(max(storage, decoded), weights + max(latents + attention, tile), parts)
