"""Diffusion-UNet stage, and the denoising objective the ControlNet stage shares.

DDPM presets learn to predict the noise (epsilon) or, where the preset's schedule says ``v_prediction``,
MONAI's ``get_velocity`` target; rectified-flow presets the velocity ``x0 - noise``; all with an L1 loss,
as MAISI. Latents are multiplied by ``scale_factor`` (1 / std of the training
latents, estimated over several batches and all-reduced across processes) and it is saved with the UNet.
Presets with modality input train for classifier-free guidance as MAISI v2 does: each case's modality code
is sometimes replaced by its parent code or by 0 (unknown), drawn with the step's seeded generator.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler, Scheduler

from maisi.checkpoints import load_network, save_checkpoint
from maisi.config.train_config import TrainConfig
from maisi.distributed import Ranks
from maisi.errors import InputError
from maisi.families.checks import modality_dropout_problems
from maisi.families.ct import Preset
from maisi.families.networks import RuntimeOptions, build_network
from maisi.sampling import make_scheduler
from maisi.training.latent_data import CaseDraw, LatentCases

log = logging.getLogger(__name__)
VALIDATION_SEED = 12345
MAISI_MODALITY_DROPOUT = 0.1  # MAISI v2's rate of both draws (scripts/diff_model_train.py)


def training_scheduler(preset: Preset) -> Scheduler:
    """The scheduler that adds noise during training (the preset's own process)."""
    return make_scheduler(preset.schedule, preset.schedule.kind)


@dataclass(frozen=True)
class NoisedLatents:
    """One draw of the training objective: ``noisy`` (N, C, x, y, z) latents at ``timesteps`` (N,), and the
    ``target`` (N, C, x, y, z) the network should output for them."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def add_training_noise(
    scheduler: Scheduler, latents: torch.Tensor, generator: torch.Generator | None = None
) -> NoisedLatents:
    """Noise ``latents`` (already scaled) at random timesteps of the preset's process."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if isinstance(scheduler, RFlowScheduler):
        timesteps = scheduler.sample_timesteps(latents)
        target = latents - noise  # velocity
    else:
        assert isinstance(scheduler, DDPMScheduler)
        timesteps = torch.randint(
            0, scheduler.num_train_timesteps, (latents.shape[0],), device=latents.device, generator=generator
        )
        # the preset's prediction type: the noise, or v = sqrt(abar) noise - sqrt(1 - abar) x0
        target = (
            noise
            if scheduler.prediction_type == "epsilon"
            else scheduler.get_velocity(latents, noise, timesteps)
        )
    return NoisedLatents(scheduler.add_noise(latents, noise, timesteps), timesteps, target)


def predict(
    unet: torch.nn.Module,
    noised: NoisedLatents,
    unet_inputs: dict[str, torch.Tensor],
    residuals: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]] | None = None,
) -> torch.Tensor:
    """(N, C, x, y, z) float32 output of ``unet`` (with the ControlNet ``residuals`` when given)."""
    extra = residuals(noised.noisy, noised.timesteps) if residuals else {}
    return unet(x=noised.noisy, timesteps=noised.timesteps, **unet_inputs, **extra).float()


def weighted_l1(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean absolute error; ``weights`` (N, 1, x, y, z) multiply the per-voxel error when given."""
    error = (output - target).abs()
    return (error * weights).mean() if weights is not None else error.mean()


def denoising_loss(
    unet: torch.nn.Module,
    scheduler: Scheduler,
    latents: torch.Tensor,
    unet_inputs: dict[str, torch.Tensor],
    residuals: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]] | None = None,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    loss: Literal["l1", "mse"] = "l1",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L1 (MAISI) or mean squared error (the BraTS LDM bundles) between the UNet's output and its target for
    noised ``latents`` (already scaled).

    Returns:
        (loss, output, target); ``weights`` (N, 1, x, y, z) multiply the per-voxel L1 error when given.
    """
    noised = add_training_noise(scheduler, latents, generator)
    output = predict(unet, noised, unet_inputs, residuals)
    if loss == "mse":
        if weights is not None:
            raise ValueError("per-voxel weights are an option of the L1 loss")
        return torch.nn.functional.mse_loss(output, noised.target), output, noised.target
    return weighted_l1(output, noised.target, weights), output, noised.target


def modality_dropout_rates(config: TrainConfig, preset: Preset) -> tuple[float, float]:
    """(parent_rate, unconditional_rate) of ``$.diffusion.modality_dropout`` for ``preset``: a null rate is
    MAISI's where the preset takes a modality, and none otherwise.

    Raises:
        InputError: a nonzero rate for a preset without modality input (checked when the config is loaded;
            raised here for callers of the library that skip that check).
    """
    problems = modality_dropout_problems(config, preset)
    if problems:
        raise InputError(problems[0])
    dropout = config.diffusion.modality_dropout
    parent, uncond = (
        resolved_dropout_rate(v, preset.uses_modality)
        for v in (dropout.parent_rate, dropout.unconditional_rate)
    )
    return parent, uncond


def resolved_dropout_rate(value: float | None, uses_modality: bool) -> float:
    """The rate a ``$.diffusion.modality_dropout`` value trains with: null is MAISI's where the preset takes
    a modality and 0 otherwise; no modality input, no dropout."""
    if not uses_modality:
        return 0.0
    return MAISI_MODALITY_DROPOUT if value is None else float(value)


def drop_modality(
    codes: torch.Tensor, parent_rate: float, unconditional_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """MAISI v2's modality augmentation of (N,) integer codes, drawn with ``generator`` (CPU).

    With ``parent_rate`` a CT sub-code (2-7) becomes 1 and an MR sub-code (>= 9) becomes 8, each case drawn
    on its own; then, independently, with ``unconditional_rate`` a code becomes 0 (unknown modality: the
    unconditional branch of classifier-free guidance). A rate of 0 draws nothing.
    """
    out = codes.clone()
    if parent_rate > 0:
        ct_sub = (out >= 2) & (out < 8) & (torch.rand(out.shape, generator=generator) < parent_rate)
        out[ct_sub] = 1
        mr_sub = (out >= 9) & (torch.rand(out.shape, generator=generator) < parent_rate)
        out[mr_sub] = 8
    if unconditional_rate > 0:
        out[torch.rand(out.shape, generator=generator) < unconditional_rate] = 0
    return out


@dataclass(frozen=True)
class ModalityDropoutDraw:
    """A :class:`CaseDraw` whose modality codes (``unet_inputs["class_labels"]``) then go through
    :func:`drop_modality` with the same step generator: a function of (seed, step, rank) like the cases."""

    cases: CaseDraw
    parent_rate: float
    unconditional_rate: float

    def __call__(self, generator: torch.Generator) -> dict[str, Any]:
        batch = self.cases(generator)
        inputs = batch["unet_inputs"]
        inputs["class_labels"] = drop_modality(
            inputs["class_labels"], self.parent_rate, self.unconditional_rate, generator
        )
        return batch


def estimate_scale_factor(
    cases: LatentCases, batches: int, batch_size: int, ranks: Ranks, device: torch.device
) -> float:
    """1 / std of the training latents over ``batches`` batches per process, combined across processes."""

    def latents() -> Iterable[torch.Tensor]:
        for b in range(batches):
            indices = [
                (b * batch_size * ranks.world_size + ranks.rank * batch_size + i) % len(cases)
                for i in range(batch_size)
            ]
            yield cases.batch(indices, device)["latents"]

    return inverse_std(latents(), ranks, device)[0]


def inverse_std(latents: Iterable[torch.Tensor], ranks: Ranks, device: torch.device) -> tuple[float, int]:
    """(1 / std, number of values) over every tensor of ``latents`` (this process's) and, under torchrun,
    every other process's: sums, sums of squares and counts are all-reduced, so every process gets the
    same factor."""
    total = torch.zeros(3, dtype=torch.float64, device=device)  # sum, sum of squares, count
    for x in latents:
        x = x.to(device=device, dtype=torch.float64)
        total += torch.stack(
            [x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=device, dtype=torch.float64)]
        )
    if ranks.world_size > 1:
        dist.all_reduce(total)
    mean = total[0] / total[2]
    std = torch.sqrt(total[1] / total[2] - mean * mean)
    return float(1.0 / std), int(total[2].item())


@torch.no_grad()
def validation_loss(
    val: LatentCases | None,
    device: torch.device,
    loss_fn: Callable[[dict[str, Any], torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Mean loss over the validation cases with fixed noise and timesteps per case, and the first case's
    output/target mid-slices; the same measurement at every validation."""
    if val is None:
        return {}, {}
    losses, images = [], {}
    for i in range(len(val)):
        torch.manual_seed(VALIDATION_SEED + i)  # RFlow draws its timesteps from the global generator
        generator = torch.Generator(device=device).manual_seed(VALIDATION_SEED + i)
        loss, output, target = loss_fn(val.batch([i], device), generator)
        losses.append(loss.item())
        if i == 0:
            images = {"output": mid_slice(output[0, 0]), "target": mid_slice(target[0, 0])}
    return {"loss": float(np.mean(losses))}, images


def mid_slice(volume: torch.Tensor) -> np.ndarray:
    """Axial mid-slice of a (x, y, z) tensor (a (x, y) one as it is), scaled to [0, 1] for TensorBoard."""
    s = volume if volume.ndim == 2 else volume[:, :, volume.shape[2] // 2]
    s = s.float().cpu().numpy().T[::-1]
    return ((s - s.min()) / (s.max() - s.min() + 1e-8)).astype(np.float32)


def resolve_scale_factor(
    configured: float | None,
    from_init: float | None,
    train: LatentCases,
    batches: int,
    batch_size: int,
    ranks: Ranks,
    device: torch.device,
    what: str,
) -> float:
    """The scale factor a diffusion stage trains with: the configured one, else the init UNet's, else
    1 / std of the training latents (:func:`estimate_scale_factor`; ``what`` names them in the log)."""
    scale = configured or from_init
    if scale is None:
        scale = estimate_scale_factor(train, batches, batch_size, ranks, device)
        log.info("scale_factor = 1 / std of the training %s = %.5f", what, scale)
    return float(scale)


class LatentDiffusionStage(ABC):
    """What the CT and the mask diffusion stages share: the UNet (``model``) learns the denoising objective
    (:func:`denoising_loss`) on latents multiplied by ``scale_factor``, which the resume state keeps and the
    exported UNet (``export_name``, checkpoint part ``export_part``) carries.

    A subclass builds ``model``, ``scheduler`` and ``scale_factor`` and says what conditions the UNet
    (:meth:`unet_inputs`) and how a step's cases are drawn (``batch_draw``).
    """

    export_name: str
    export_part: str
    config: TrainConfig
    preset: Any
    train: Any
    val: Any
    device: torch.device
    model: torch.nn.Module
    scheduler: Scheduler
    scale_factor: float
    scale_factor_source: str | None = None  # how scale_factor was found, saved with it
    objective: Literal["l1", "mse"] = "l1"  # the denoising loss

    @abstractmethod
    def unet_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs of a batch on the device."""

    def loss(
        self, model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, output, target) of ``model`` on a batch on the device (:func:`denoising_loss`)."""
        latents = batch["latents"] * self.scale_factor
        inputs = self.unet_inputs(batch)
        return denoising_loss(
            model, self.scheduler, latents, inputs, generator=generator, loss=self.objective
        )

    def train_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss, _, _ = self.loss(model, self.train.to_device(batch, self.device))
        return {"loss": loss}

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def validate(self, model: torch.nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Mean loss over the validation cases with fixed noise and timesteps per case."""
        model.eval()
        return validation_loss(
            self.val, self.device, lambda batch, generator: self.loss(model, batch, generator)
        )

    def export(self, model: torch.nn.Module, folder: Path, config_sha256: str) -> list[Path]:
        path = Path(folder) / self.export_name
        scale = self.scale_factor
        return [
            save_checkpoint(
                path,
                model,
                self.preset,
                self.export_part,
                scale_factor=scale,
                config_sha256=config_sha256,
                scale_factor_source=self.scale_factor_source,
            )
        ]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scale_factor": self.scale_factor}
        if self.scale_factor_source is not None:
            state["scale_factor_source"] = self.scale_factor_source
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.scale_factor = float(state["scale_factor"])
        self.scale_factor_source = state.get("scale_factor_source", self.scale_factor_source)


class DiffusionStage(LatentDiffusionStage):
    """Train (or finetune) the diffusion UNet on pre-encoded latents."""

    name = "diffusion"
    export_name = "diffusion_unet.pt"
    export_part = "diffusion_unet"

    def __init__(
        self,
        config: TrainConfig,
        preset: Preset,
        train: LatentCases,
        val: LatentCases | None,
        ranks: Ranks,
        device: torch.device,
    ):
        self.config, self.preset, self.train, self.val, self.device = config, preset, train, val, device
        self.modality_dropout = modality_dropout_rates(config, preset)
        if any(self.modality_dropout):
            log.info(
                "modality dropout: parent code with p = %g, unknown (0) with p = %g", *self.modality_dropout
            )
        runtime = RuntimeOptions(use_flash_attention=False)
        from_init = None
        if config.init.diffusion_unet:
            self.model, weights = load_network(preset, "diffusion_unet", config.init.diffusion_unet, runtime)
            from_init = weights.scale_factor
        else:
            self.model = build_network(preset, "diffusion_unet", runtime)
        self.scheduler = training_scheduler(preset)
        dc = config.diffusion
        self.scale_factor = resolve_scale_factor(
            dc.scale_factor,
            from_init,
            train,
            dc.scale_factor_batches,
            config.batch_size,
            ranks,
            device,
            "latents",
        )

    def batch_draw(self) -> CaseDraw | ModalityDropoutDraw:
        cases = CaseDraw(self.train, self.config.batch_size)
        if not any(self.modality_dropout):
            return cases  # draws nothing more: the batches of a run without the option
        return ModalityDropoutDraw(cases, *self.modality_dropout)

    def unet_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return batch["unet_inputs"]
