"""Latent -> image through the VAE decoder.

Two methods for now: one full decoder pass, or MONAI's sliding window with Gaussian blending (MAISI's
approach, approximate at tile seams). An exact, memory-bounded tiled decoder is planned (issue 5).
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.inferers import SlidingWindowInferer

from maisi.device import autocast

DecodeMethod = Literal["full", "sliding_window"]


@torch.no_grad()
def decode(
    autoencoder: torch.nn.Module,
    latents: torch.Tensor,
    scale_factor: float,
    *,
    method: DecodeMethod = "full",
    roi_size: tuple[int, int, int] = (48, 48, 48),
    overlap: float = 0.6666,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Decode scaled latents to images.

    Args:
        autoencoder: the VAE (``AutoencoderKlMaisi``), on the latents' device.
        latents: (N, C, x, y, z) latents in the diffusion (scaled) space.
        scale_factor: the UNet checkpoint's ``scale_factor``; latents are divided by it first.
        method: ``"full"`` or ``"sliding_window"``.
        roi_size: sliding-window tile in latent voxels; a tile covering the whole latent means one pass.
        overlap: sliding-window overlap fraction.
        autocast_dtype: half-precision dtype, or None for float32.
        progress: progress bar over the sliding-window tiles.

    Returns:
        (N, 1, fx, fy, fz) float32 images on the CPU, nominally in [0, 1].
    """
    z = latents / scale_factor
    device = latents.device
    whole = all(r >= s for r, s in zip(roi_size, z.shape[2:]))
    with autocast(device, autocast_dtype):
        if method == "full" or whole:
            image = autoencoder.decode_stage_2_outputs(z)
        else:
            inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=1, overlap=overlap, mode="gaussian",
                                           sw_device=device, device=torch.device("cpu"), progress=progress)  # fmt: skip
            image = inferer(z, autoencoder.decode_stage_2_outputs)
    return image.float().cpu()
