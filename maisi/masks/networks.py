"""Build and load MAISI's mask-generation networks (Path A) from a mask preset.

The mask VAE is MONAI's ``AutoencoderKlMaisi`` (8 bit channels in, one logit per class out) and the mask UNet
MONAI's ``DiffusionModelUNet`` conditioned by cross-attention on the 10-slot size vector. The released
files load strictly (``weights_only``): ``mask_generation_autoencoder.pt`` is a plain state dict,
``mask_generation_diffusion_unet.pt`` a dict with ``unet_state_dict`` and ``scale_factor`` (as
NV-Generate-CTMR ``scripts/inference.py`` reads them); our own checkpoints
(:func:`maisi.checkpoints.save_checkpoint` with part ``mask_autoencoder`` / ``mask_diffusion_unet``) load the
same way, their recorded architecture checked first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.networks.nets import DiffusionModelUNet

from maisi.checkpoints import MaskCheckpointPart, Weights, check_fits, read_weights
from maisi.errors import CheckpointError
from maisi.families.mask import MaskPart, MaskPreset
from maisi.families.networks import RuntimeOptions

CHECKPOINT_PART: dict[MaskPart, MaskCheckpointPart] = {
    "autoencoder": "mask_autoencoder",
    "diffusion_unet": "mask_diffusion_unet",
}


@dataclass(frozen=True)
class MaskNetworks:
    """The loaded mask generator, in eval mode on one device.

    Attributes:
        autoencoder: the mask VAE; ``decode`` maps a (N, 4, x, y, z) latent to (N, C, 4x, 4y, 4z) logits.
        diffusion_unet: the latent UNet; ``forward(x, timesteps, context=(N, 1, 10))``.
        scale_factor: latents are multiplied by it for the UNet and divided by it before decoding.
    """

    autoencoder: torch.nn.Module
    diffusion_unet: torch.nn.Module
    scale_factor: float


def build_mask_network(
    preset: MaskPreset, part: MaskPart, runtime: RuntimeOptions | None = None
) -> torch.nn.Module:
    """Build one mask network of ``preset`` from MONAI's class, with the runtime options applied.

    Args:
        preset: the mask preset.
        part: ``"autoencoder"`` or ``"diffusion_unet"``.
        runtime: memory/speed options (never change a weight); default: everything off (CPU-safe).
    """
    if part not in CHECKPOINT_PART:
        raise ValueError(f"part must be 'autoencoder' or 'diffusion_unet', got {part!r}")
    runtime = runtime or RuntimeOptions()
    kwargs = preset.network_kwargs(part)
    if part == "autoencoder":
        return AutoencoderKlMaisi(
            **kwargs,
            norm_float16=runtime.norm_float16,
            use_checkpointing=runtime.use_checkpointing,
            use_flash_attention=runtime.use_flash_attention,
            num_splits=preset.default_num_splits,
            dim_split=1,
        )
    return DiffusionModelUNet(**kwargs, use_flash_attention=runtime.use_flash_attention)


def load_mask_network(
    preset: MaskPreset, part: MaskPart, path: str | Path, runtime: RuntimeOptions | None = None
) -> tuple[torch.nn.Module, Weights]:
    """Build ``part`` of ``preset`` and load ``path`` into it strictly (eval mode, CPU).

    Raises:
        CheckpointError: (exit 2) missing or unreadable file, a file holding code, another network's
            weights, or weights of another shape (the file and the first mismatching keys named).
    """
    weights = read_weights(path, CHECKPOINT_PART[part])
    network = build_mask_network(preset, part, runtime)
    check_fits(weights, preset, CHECKPOINT_PART[part], network)
    network.load_state_dict(weights.state_dict, strict=True)
    return network.eval(), weights


def load_mask_networks(
    preset: MaskPreset,
    autoencoder_path: str | Path,
    diffusion_path: str | Path,
    device: torch.device | str = "cpu",
    runtime: RuntimeOptions | None = None,
) -> MaskNetworks:
    """Load the mask VAE and the mask UNet (released layouts or ours) and the UNet's ``scale_factor``.

    Args:
        preset: the mask preset both files must fit.
        autoencoder_path: MAISI's ``mask_generation_autoencoder.pt`` or our ``mask_autoencoder`` checkpoint.
        diffusion_path: MAISI's ``mask_generation_diffusion_unet.pt`` or our ``mask_diffusion_unet``
            checkpoint; it must carry the ``scale_factor``.
        device: where the networks go.
        runtime: memory/speed options; default chosen from ``device``.

    Raises:
        CheckpointError: as :func:`load_mask_network`, or a UNet file without ``scale_factor``.
    """
    device = torch.device(device)
    runtime = runtime or RuntimeOptions.for_device(device)
    # the UNet first: its scale_factor is checked before the (larger, on CUDA) VAE is placed
    unet, weights = load_mask_network(preset, "diffusion_unet", diffusion_path, runtime)
    if weights.scale_factor is None:
        raise CheckpointError(
            f"{weights.path}: mask diffusion UNet checkpoint has no scale_factor (MAISI's file carries one)"
        )
    vae, _ = load_mask_network(preset, "autoencoder", autoencoder_path, runtime)
    return MaskNetworks(vae.to(device), unet.to(device), weights.scale_factor)
