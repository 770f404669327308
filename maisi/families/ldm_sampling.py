"""Sample an LDM preset: noise -> the one denoising loop (:func:`maisi.sampling.denoise`) -> MONAI
``AutoencoderKL.decode``.

The seeds' samplers, reproduced for their presets: DDIM 50 steps with the ``leading`` timestep spacing of
GenerativeModels (980, 960, ..., 0), ``clip_sample`` off (the MONAI tutorial left it on, clipping
unit-variance latents to [-1, 1]), the latent shape of the preset, latents divided by the scale factor
before decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from maisi.config import InferConfig
from maisi.device import autocast
from maisi.families.ldm_models import LDMModels
from maisi.options import TimestepSpacing
from maisi.sampling import ContextGuidance, denoise, make_scheduler


@dataclass(frozen=True)
class LDMSample:
    """One decoded sample.

    Attributes:
        image: (*S) float32 decoded image, S the preset's output shape ((X, Y) or (X, Y, Z), RAS axes); the
            seeds' intensities are in [0, 1] (percentile-scaled training images), not clipped here.
        timesteps: the training timesteps the loop visited, in order.
        timestep_spacing: how they were spaced.
        prediction_type: what the scheduler took the UNet's output for (``epsilon`` or ``v_prediction``).
        timings_s: seconds spent sampling and decoding.
    """

    image: np.ndarray
    timesteps: list[int]
    timestep_spacing: TimestepSpacing
    prediction_type: str
    timings_s: dict[str, float]


def timestep_spacing_of(config: InferConfig, models: LDMModels) -> TimestepSpacing:
    """``$.sampling.timestep_spacing``, else the preset's."""
    return config.sampling.timestep_spacing or models.preset.timestep_spacing


def sample_ldm(
    config: InferConfig,
    models: LDMModels,
    seed: int,
    progress: bool = False,
    context: torch.Tensor | None = None,
    guidance: ContextGuidance | None = None,
) -> LDMSample:
    """Generate the sample of ``seed`` (text presets: of the prompt whose (1, 77, D) ``context`` is given,
    guided on the null prompt's embedding by ``guidance``).

    The noise (1, C, *latent) is drawn on the CPU from ``seed`` (the same starting point on every device);
    DDPM's per-step noise comes from ``seed + 1`` on the compute device.
    """
    preset, device = models.preset, models.device
    noise = torch.randn((1, *preset.latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    spacing = timestep_spacing_of(config, models)
    scheduler = make_scheduler(preset.schedule, config.sampler, spacing)
    t0 = time.perf_counter()
    latent = denoise(
        models.diffusion_unet,
        scheduler,
        noise,
        config.num_inference_steps,
        {} if context is None else {"context": context.to(device)},
        generator=torch.Generator(device=device).manual_seed(seed + 1),
        autocast_dtype=models.dtype,
        progress=progress,
        context_guidance=guidance,
    )
    t1 = time.perf_counter()
    with torch.no_grad(), autocast(device, models.decode_dtype):
        image = models.autoencoder.decode(latent / models.scale.value)
    t2 = time.perf_counter()
    return LDMSample(
        image.float()[0, 0].cpu().numpy(),
        [int(t) for t in scheduler.timesteps],
        spacing,
        str(getattr(scheduler, "prediction_type", "epsilon")),
        {"sampling": t1 - t0, "decoding": t2 - t1},
    )
