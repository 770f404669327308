"""One denoising loop for DDPM, DDIM and rectified flow, with optional ControlNet residuals and
classifier-free guidance.

Schedulers come from ``monai.networks.schedulers``; this module only chooses and drives them.

Guidance on class labels follows MAISI v2 (NV-Generate-CTMR ``scripts/utils_infer.py``,
``diff_model_infer.py``): the batch is doubled, conditional half first; the unconditional half has class
label 0 and, with a ControlNet, its own control (the tumour-free mask); the model outputs are combined as
uncond + s * (cond - uncond) before the scheduler step. Here the combination is done in float32 (MAISI: in
the autocast dtype). Guidance on a text ``context`` (:class:`ContextGuidance`) doubles the batch the same way,
the unconditional half taking the null embedding the model was trained with (not MONAI's ``-1`` fill of
``DiffusionInferer.sample(cfg=...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch
from monai.networks.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    RFlowScheduler,
    Scheduler,
)

from maisi.conditioning import UNCONDITIONAL_MODALITY
from maisi.device import autocast
from maisi.errors import InputError
from maisi.families.ct import NoiseSchedule, check_sampler, ddpm_steps_problem
from maisi.options import DEFAULT_STEPS, Sampler, TimestepSpacing
from maisi.progress import progress_bar

__all__ = [
    "DEFAULT_STEPS",
    "ContextGuidance",
    "Sampler",
    "check_sampler",
    "denoise",
    "make_scheduler",
    "set_timesteps",
]


@dataclass(frozen=True)
class ContextGuidance:
    """Classifier-free guidance on the text context ``unet_inputs["context"]`` (N, L, D).

    Attributes:
        null_context: (1, L, D) or (N, L, D) embedding of the null prompt the model was trained with (e.g. the
            encoded start + 76 x end tokens); the unconditional half of the batch gets it.
        scale: guidance scale g, output = uncond + g * (cond - uncond) (Stable Diffusion's convention):
            None or 1 runs the conditional model alone (no unconditional pass), 0 gives the unconditional
            prediction, above 1 guides.
    """

    null_context: torch.Tensor
    scale: float | None

    def __post_init__(self) -> None:
        if self.null_context.ndim != 3:
            raise ValueError(
                f"null_context must be (1 or N, L, D), got shape {tuple(self.null_context.shape)}"
            )
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"context guidance scale must be a finite number >= 0 or None, got {self.scale}")

    @property
    def needs_unconditional(self) -> bool:
        """Whether the loop runs the unconditional half (a scale other than None or 1)."""
        return self.scale is not None and self.scale != 1


# Where make_scheduler records the timestep spacing on the scheduler, for set_timesteps.
_SPACING_ATTR = "maisi_timestep_spacing"


def make_scheduler(
    schedule: NoiseSchedule, sampler: Sampler, timestep_spacing: TimestepSpacing = "linspace"
) -> Scheduler:
    """The MONAI scheduler that samples a UNet trained on ``schedule`` with ``sampler``: DDPM and DDIM
    take the schedule's ``prediction_type`` (epsilon or v); rectified flow predicts the velocity.

    Args:
        schedule: the noise schedule the UNet was trained with.
        sampler: ``ddpm``, ``ddim`` or ``rflow``.
        timestep_spacing: DDIM's inference timesteps (recorded on the scheduler for :func:`set_timesteps`):
            ``linspace`` (MONAI >= 1.6: round(linspace(T - 1, 0, n)), 999, 979, ..., 0 for 50 of 1000) or
            ``leading`` (the seeds' GenerativeModels: (n - 1 - i) * (T // n), 980, 960, ..., 0). DDPM runs
            every training timestep, where both are the same; rectified flow takes ``linspace`` only.
    """
    problems = check_sampler(schedule, sampler, schedule.num_train_timesteps)
    if timestep_spacing not in get_args(TimestepSpacing):
        problems.append(
            f"timestep_spacing '{timestep_spacing}' is not one of {list(get_args(TimestepSpacing))}"
        )
    elif sampler == "rflow" and timestep_spacing != "linspace":
        problems.append(f"timestep_spacing '{timestep_spacing}' is for DDIM; rectified flow has its own")
    if problems:
        raise InputError(problems[0])
    if sampler == "rflow":
        return RFlowScheduler(
            num_train_timesteps=schedule.num_train_timesteps,
            use_discrete_timesteps=False,
            use_timestep_transform=True,
            sample_method="uniform",
        )
    betas = dict(
        num_train_timesteps=schedule.num_train_timesteps,
        schedule=schedule.beta_schedule,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        clip_sample=False,
        prediction_type=schedule.prediction_type,
    )  # clip_sample must be off for latents
    scheduler = DDPMScheduler(**betas) if sampler == "ddpm" else DDIMScheduler(**betas)
    setattr(scheduler, _SPACING_ATTR, timestep_spacing)
    return scheduler


def set_timesteps(
    scheduler: Scheduler,
    num_steps: int,
    latent_shape: tuple[int, ...],
    device: torch.device,
    timestep_spacing: TimestepSpacing | None = None,
) -> None:
    """Set the inference timesteps; rectified flow shifts them by the latent size, as MAISI does.

    ``timestep_spacing`` (default: what :func:`make_scheduler` recorded, else ``linspace``) spaces DDIM's.
    """
    spacing = timestep_spacing or getattr(scheduler, _SPACING_ATTR, "linspace")
    if isinstance(scheduler, DDIMScheduler) and spacing == "leading":
        scheduler.set_timesteps(num_steps, device=device)  # MONAI's checks of num_steps
        stride = scheduler.num_train_timesteps // num_steps
        leading = torch.arange(num_steps - 1, -1, -1, device=device, dtype=torch.long) * stride
        scheduler.timesteps = leading + scheduler.steps_offset
    elif isinstance(scheduler, RFlowScheduler):
        scheduler.set_timesteps(num_steps, device=device, input_img_size_numel=math.prod(latent_shape[2:]))
    elif isinstance(scheduler, DDPMScheduler) and num_steps != scheduler.num_train_timesteps:
        raise ValueError(ddpm_steps_problem(num_steps, scheduler.num_train_timesteps))
    else:
        scheduler.set_timesteps(num_steps, device=device)


def _step(
    scheduler: Scheduler,
    output: torch.Tensor,
    t: torch.Tensor,
    next_t: torch.Tensor,
    x: torch.Tensor,
    generator: torch.Generator | None,
    final: bool,
) -> torch.Tensor:
    """One reverse step from timestep ``t`` to ``next_t`` (``final``: the last step, to clean data)."""
    if isinstance(scheduler, RFlowScheduler):
        # MONAI's own step, as MAISI samples: it takes dt = (t - int(next_t)) / T, truncating the float next
        # timestep, so each step overshoots by up to one training timestep (output std about 1 % low on a
        # Gaussian at a 128^3 latent, 30 steps). Kept for parity with MAISI's samples of the same seed.
        return scheduler.step(output, t, x, next_t)[0]
    if isinstance(scheduler, DDPMScheduler):
        # stochastic: seeded generator; MONAI's step takes the x0 of epsilon or v itself
        return scheduler.step(output, t, x, generator=generator)[0]
    # DDIM (eta 0). MONAI 1.6's DDIMScheduler.step moves to the noise level of t - T // n, but set_timesteps
    # spaces the timesteps as round(linspace(T - 1, 0, n)): for n not 1 or T the sample lands on another
    # noise level than the next timestep the UNet is told (2 steps: level 499, then asked as t = 0). So take
    # MONAI's x0 prediction and re-noise it with the predicted epsilon to next_t's level (the DDIM update).
    # For v-prediction the noise is derived from v: re-noising with v itself drives every sample to 0.
    x0 = scheduler.step(output, t, x)[1]
    if final:  # set_alpha_to_one: the last step ends on the x0 prediction
        return x0
    return scheduler.add_noise(x0, predicted_noise(scheduler, output, t, x), next_t.view(1))


def predicted_noise(
    scheduler: DDPMScheduler | DDIMScheduler, output: torch.Tensor, t: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """The noise epsilon that a DDPM-trained UNet's ``output`` (N, C, ...) at timestep ``t`` predicts for
    ``x`` (N, C, ...): the output itself for epsilon prediction; for v-prediction
    eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t (as x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v)."""
    if scheduler.prediction_type == "epsilon":
        return output
    if scheduler.prediction_type != "v_prediction":
        raise ValueError(f"prediction_type {scheduler.prediction_type!r} is not sampled here")
    abar = scheduler.alphas_cumprod[t.long()].to(device=x.device, dtype=x.dtype)
    return abar.sqrt() * output + (1 - abar).sqrt() * x


@torch.no_grad()
def denoise(
    unet: torch.nn.Module,
    scheduler: Scheduler,
    noise: torch.Tensor,
    num_steps: int,
    unet_inputs: dict[str, torch.Tensor],
    *,
    controlnet: torch.nn.Module | None = None,
    control: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    guidance_scale: float = 0.0,
    uncond_control: torch.Tensor | None = None,
    context_guidance: ContextGuidance | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` to a (scaled) latent.

    Args:
        unet: the diffusion UNet (``DiffusionModelUNetMaisi``).
        scheduler: a MONAI DDPM, DDIM or rectified-flow scheduler (see :func:`make_scheduler`).
        noise: (N, C, x, y, z) standard normal starting point, on the compute device.
        num_steps: number of inference steps.
        unet_inputs: conditioning keyword tensors (spacing, body region, class labels), see
            :meth:`maisi.conditioning.Conditions.network_inputs`; a text-conditioned UNet's (N, L, D)
            ``context``.
        controlnet: optional ControlNet; its residuals are added to the UNet's skip connections.
        control: (N, 8, 4x, 4y, 4z) bit-encoded label mask for the ControlNet.
        conditioning_scale: multiplier on the ControlNet residuals.
        generator: random generator on the compute device (DDPM adds noise at every step).
        autocast_dtype: half-precision dtype for the networks, or None for float32.
        progress: show a progress bar.
        guidance_scale: classifier-free guidance scale s; 0 runs the plain loop (no doubled batch). Needs
            ``class_labels`` in ``unet_inputs`` (the unconditional half gets label 0).
        uncond_control: (N, 8, 4x, 4y, 4z) control of the unconditional half (the tumour-free mask); needed
            with guidance and a ControlNet.
        context_guidance: classifier-free guidance on ``unet_inputs["context"]`` with its own null
            embedding and scale (see :class:`ContextGuidance`); not together with ``guidance_scale``.

    Returns:
        (N, C, x, y, z) float32 latent in the scaled space (divide by ``scale_factor`` before decoding).
    """
    if (controlnet is None) != (control is None):
        raise ValueError("controlnet and control must be given together")
    guided = guidance_scale > 0
    if guided and context_guidance is not None:
        raise ValueError(
            "guide on class labels (guidance_scale) or on a context (context_guidance), not both"
        )
    if guided:
        unet_inputs, control = _guided_inputs(unet_inputs, control, uncond_control)
    elif guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    elif context_guidance is not None and context_guidance.needs_unconditional:
        guided, guidance_scale = True, float(context_guidance.scale)  # type: ignore[arg-type]
        unet_inputs = _context_guided_inputs(unet_inputs, context_guidance.null_context)
        control = None if control is None else torch.cat((control, control))
    device = noise.device
    set_timesteps(scheduler, num_steps, tuple(noise.shape), device)
    timesteps = scheduler.timesteps
    next_timesteps = torch.cat(
        (timesteps[1:], torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device))
    )
    class_labels = unet_inputs.get("class_labels")
    x = noise
    for i, (t, next_t) in enumerate(
        progress_bar(
            zip(timesteps, next_timesteps),
            total=len(timesteps),
            enabled=progress,
            desc="denoising",
            leave=False,
        )
    ):
        x_in = torch.cat((x, x)) if guided else x
        t_batch = torch.full((x_in.shape[0],), float(t), device=device)
        with autocast(device, autocast_dtype):
            residuals = {}
            if controlnet is not None:
                down, mid = controlnet(
                    x=x_in,
                    timesteps=t_batch,
                    controlnet_cond=control,
                    conditioning_scale=conditioning_scale,
                    class_labels=class_labels,
                )
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            output = unet(x=x_in, timesteps=t_batch, **unet_inputs, **residuals)
        output = output.float()
        if guided:
            cond, uncond = output.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        x = _step(scheduler, output, t, next_t, x, generator, final=i == len(timesteps) - 1)
    return x


def _guided_inputs(
    unet_inputs: dict[str, torch.Tensor], control: torch.Tensor | None, uncond_control: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The doubled batch's inputs: conditional half as given, unconditional half with class label 0 and
    ``uncond_control``. Built once, before the loop."""
    labels = unet_inputs.get("class_labels")
    if labels is None:
        raise ValueError("guidance needs class_labels: its unconditional half is class label 0")
    if control is not None and uncond_control is None:
        raise ValueError("guidance with a ControlNet needs uncond_control (the tumour-free mask)")
    doubled = {k: torch.cat((v, v)) for k, v in unet_inputs.items()}
    doubled["class_labels"] = torch.cat((labels, torch.full_like(labels, UNCONDITIONAL_MODALITY)))
    if control is not None:
        control = torch.cat((control, uncond_control.to(control)))  # type: ignore[union-attr]
    return doubled, control


def _context_guided_inputs(
    unet_inputs: dict[str, torch.Tensor], null_context: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The doubled batch's inputs for guidance on a text context: conditional half as given, unconditional
    half with ``null_context`` (1 or N, L, D) in place of ``context`` (N, L, D). Built once, before the
    loop."""
    context = unet_inputs.get("context")
    if context is None:
        raise ValueError("context guidance needs unet_inputs['context'] (N, L, D)")
    n = context.shape[0]
    if null_context.shape[1:] != context.shape[1:] or null_context.shape[0] not in (1, n):
        raise ValueError(
            f"null_context of shape {tuple(null_context.shape)} does not fit context of shape "
            f"{tuple(context.shape)}: expected (1 or {n}, {context.shape[1]}, {context.shape[2]})"
        )
    doubled = {k: torch.cat((v, v)) for k, v in unet_inputs.items()}
    doubled["context"] = torch.cat((context, null_context.to(context).expand_as(context)))
    return doubled
