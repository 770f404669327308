"""Latent <-> image through the VAE: decoding, and encoding with the same three methods.

* ``"full"``: one whole-volume pass of the MONAI network (exact; memory grows with the volume).
* ``"sliding_window"``: MONAI's ``SlidingWindowInferer`` with Gaussian blending (MAISI's approach;
  approximate at tile seams, GroupNorm statistics per window, overlap computed several times).
* ``"tiled"``: :mod:`maisi.vae.tiled`, exact (equal to ``"full"`` up to float rounding) with the compute
  device's working memory bounded by ``memory_budget_bytes``; intermediates stay on the host. It relies on
  MONAI's private module structure; a model the adapter does not recognise runs the ``"full"`` pass instead,
  with one :class:`TilingFallbackWarning` naming what was not recognised.
"""

from __future__ import annotations

import warnings

import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import DivisiblePad
from monai.utils import convert_to_tensor

from maisi.device import autocast
from maisi.options import DECODE_METHODS, DecodeMethod
from maisi.progress import shown
from maisi.vae.monai_adapter import Part, check_structure
from maisi.vae.tiled import decode_tiled, encode_tiled

_VERB = {"decoder": "decoding", "encoder": "encoding"}


class TilingFallbackWarning(UserWarning):
    """The tiled method could not run this model; MONAI's whole-volume pass ran instead."""


def _check_method(method: str) -> None:
    if method not in DECODE_METHODS:
        raise ValueError(f"method must be one of {list(DECODE_METHODS)}, got {method!r}")


def _can_tile(autoencoder: torch.nn.Module, part: Part) -> bool:
    """Whether the tiled path knows this model's ``part``; if not, one warning naming what it did not know."""
    reason = check_structure(autoencoder, part)
    if reason is None:
        return True
    # Whole volume rather than sliding windows: it stays exact, as "tiled" is; only the memory bound is lost.
    warnings.warn(
        f"tiled VAE {_VERB[part]} does not recognise this model ({reason}); running MONAI's whole-volume "
        "pass instead: exact, but its memory grows with the volume (method 'sliding_window' bounds it)",
        TilingFallbackWarning,
        stacklevel=4,  # the caller of decode()/encode(), past torch.no_grad's wrapper
    )
    return False


def _sliding_window(
    roi_size: tuple[int, int, int], overlap: float, device: torch.device, progress: bool
) -> SlidingWindowInferer:
    """MAISI's way: Gaussian-blended windows computed on ``device``, the result gathered on the CPU."""
    return SlidingWindowInferer(
        roi_size=roi_size,
        sw_batch_size=1,
        overlap=overlap,
        mode="gaussian",
        sw_device=device,
        device=torch.device("cpu"),
        progress=shown(progress),  # MONAI's bar obeys --no-progress too
    )


@torch.no_grad()
def decode(
    autoencoder: torch.nn.Module,
    latents: torch.Tensor,
    scale_factor: float,
    *,
    method: DecodeMethod = "full",
    roi_size: tuple[int, int, int] = (48, 48, 48),
    overlap: float = 0.6666,
    memory_budget_bytes: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Decode scaled latents to images.

    Args:
        autoencoder: the VAE (``AutoencoderKlMaisi``), on the latents' device.
        latents: (N, C, x, y, z) latents in the diffusion (scaled) space.
        scale_factor: the UNet checkpoint's ``scale_factor``; latents are divided by it first.
        method: ``"full"``, ``"sliding_window"`` or ``"tiled"``.
        roi_size: sliding-window tile in latent voxels; a tile covering the whole latent means one pass.
        overlap: sliding-window overlap fraction.
        memory_budget_bytes: ``"tiled"``: bound on one tile's working memory on the compute device
            (default 1 GiB); tile sizes are derived from it per layer. A model the tiled path does not
            recognise is decoded in one pass, with a :class:`TilingFallbackWarning`.
        autocast_dtype: half-precision dtype, or None for float32.
        progress: progress bar over the tiles.

    Returns:
        (N, 1, fx, fy, fz) float32 images on the CPU, nominally in [0, 1].
    """
    _check_method(method)
    z = latents / scale_factor
    device = latents.device
    whole = all(r >= s for r, s in zip(roi_size, z.shape[2:]))
    with autocast(device, autocast_dtype):
        if method == "tiled" and _can_tile(autoencoder, "decoder"):
            image = decode_tiled(autoencoder, z, memory_budget_bytes=memory_budget_bytes, progress=progress)
        elif method in ("full", "tiled") or whole:
            image = autoencoder.decode_stage_2_outputs(z)
        else:
            inferer = _sliding_window(roi_size, overlap, device, progress)
            image = inferer(z, autoencoder.decode_stage_2_outputs)
    return image.float().cpu()


@torch.no_grad()
def encode(
    autoencoder: torch.nn.Module,
    images: torch.Tensor,
    *,
    method: DecodeMethod = "sliding_window",
    roi_size: tuple[int, int, int] = (128, 128, 128),
    overlap: float = 0.25,
    memory_budget_bytes: int | None = None,
    sample: bool = False,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Encode images to (unscaled) latents.

    Args:
        autoencoder: the VAE, on the images' device.
        images: (N, 1, X, Y, Z) intensities in [0, 1], sizes multiples of the VAE factor.
        method: ``"full"`` (one pass), ``"sliding_window"`` (MONAI, Gaussian blending; bounded memory,
            approximate) or ``"tiled"`` (exact, bounded memory).
        roi_size: sliding-window tile in image voxels (multiples of the VAE factor).
        overlap: sliding-window overlap fraction.
        memory_budget_bytes: ``"tiled"``: bound on one tile's working memory (default 1 GiB). A model the
            tiled path does not recognise is encoded in one pass, with a :class:`TilingFallbackWarning`.
        sample: draw ``mu + sigma * eps`` (as MAISI's ``encode_stage_2_inputs``) instead of returning ``mu``.
        generator: CPU generator for ``eps`` when sampling.
        autocast_dtype: half-precision dtype, or None for float32.
        progress: progress bar over the tiles.

    Returns:
        (N, C, X/f, Y/f, Z/f) float32 latents on the CPU.
    """
    _check_method(method)
    device = images.device

    def mu_sigma(x: torch.Tensor) -> torch.Tensor:
        mu, sigma = autoencoder.encode(x)
        return torch.cat([mu, sigma], dim=1)

    whole = all(r >= s for r, s in zip(roi_size, images.shape[2:]))
    with autocast(device, autocast_dtype):
        if method == "tiled" and _can_tile(autoencoder, "encoder"):
            both = torch.cat(
                encode_tiled(autoencoder, images, memory_budget_bytes=memory_budget_bytes, progress=progress),
                dim=1,
            )
        elif method in ("full", "tiled") or whole:
            both = mu_sigma(images)
        else:
            inferer = _sliding_window(roi_size, overlap, device, progress)
            both = inferer(images, mu_sigma)
    mu, sigma = both.float().cpu().chunk(2, dim=1)
    if not sample:
        return mu
    return mu + sigma * torch.randn(mu.shape, generator=generator)


def round_trip(
    autoencoder: torch.nn.Module,
    unit: torch.Tensor,
    vae_factor: int,
    memory_budget_mb: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The VAE round trip of a (1, 1, X, Y, Z) image in [0, 1] (on the VAE's device) as the pipeline does it:
    padded to the VAE factor, encoded to the posterior mean, decoded (exact tiles within the memory budget),
    cropped back. Shared by training's validation and ``maisi.evaluate``.

    Returns:
        (1, 1, X, Y, Z) float32 in [0, 1] on the CPU.
    """
    device = next(autoencoder.parameters()).device
    size = unit.shape[2:]
    padded = DivisiblePad(k=vae_factor, mode="constant", value=0, method="end")(unit[0])
    padded = convert_to_tensor(padded, track_meta=False)[None]
    budget = memory_budget_mb << 20
    latent = encode(
        autoencoder, padded.to(device), method="tiled", memory_budget_bytes=budget, autocast_dtype=dtype
    )
    image = decode(
        autoencoder, latent.to(device), 1.0, method="tiled", memory_budget_bytes=budget, autocast_dtype=dtype
    )
    return image[..., : size[0], : size[1], : size[2]].clamp(0.0, 1.0)
