"""The ``maisi.train`` config: dataclasses mirroring ``schemas/train.schema.json`` and cross-key checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from maisi.options import DeviceName, ThreadsSetting

Stage = Literal["autoencoder", "diffusion", "controlnet", "mask_autoencoder", "mask_diffusion"]
STAGES: tuple[Stage, ...] = ("autoencoder", "diffusion", "controlnet", "mask_autoencoder", "mask_diffusion")
MASK_STAGES: tuple[Stage, ...] = ("mask_autoencoder", "mask_diffusion")  # networks of a mask preset


@dataclass(frozen=True)
class InitWeights:
    autoencoder: str | None
    diffusion_unet: str | None
    controlnet: str | None
    mask_autoencoder: str | None
    mask_diffusion_unet: str | None


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float | None
    warmup_steps: int
    decay: Literal["constant", "linear", "cosine"]
    min_lr_ratio: float


@dataclass(frozen=True)
class ModalityDropoutConfig:
    """Modality-code dropout for classifier-free guidance; null rates: MAISI's 0.1 where the preset takes a
    modality."""

    parent_rate: float | None
    unconditional_rate: float | None


@dataclass(frozen=True)
class DiffusionStageConfig:
    scale_factor: float | None
    scale_factor_batches: int
    modality_dropout: ModalityDropoutConfig


@dataclass(frozen=True)
class ControlNetStageConfig:
    weighted_loss: float
    weighted_loss_label: tuple[int, ...]
    label_dict: str | None
    conditioning_scale: float
    region_contrastive_weight: float
    region_contrastive_delta: float


@dataclass(frozen=True)
class AutoencoderStageConfig:
    patch_size: tuple[int, int, int]
    min_foreground: float
    train_decoder_only: bool
    recon_loss: Literal["l1", "l2"]
    kl_weight: float
    perceptual_weight: float
    perceptual_weights: str | None
    adversarial_weight: float
    adversarial_warmup_steps: int
    discriminator_lr: float
    val_method: Literal["tiled", "sliding_window"]
    val_memory_budget_mb: int
    val_roi_size: tuple[int, int, int]


@dataclass(frozen=True)
class MaskAutoencoderStageConfig:
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    dice_weight: float
    ce_weight: float
    kl_weight: float
    val_roi_size: tuple[int, int, int]


@dataclass(frozen=True)
class MaskDiffusionStageConfig:
    scale_factor: float | None
    scale_factor_batches: int


@dataclass(frozen=True)
class LDMDataConfig:
    """How the plain-LDM stages read images (``$.ldm``)."""

    channel: str | None
    resample: bool
    center_crop: tuple[int, int, int] | None
    percentiles: tuple[float, float] | None
    autoencoder_patch: tuple[int, ...] | None
    flip_prob: float
    num_validation: int


@dataclass(frozen=True)
class LoaderConfig:
    num_workers: int
    prefetch_factor: int
    cache_rate: float


@dataclass(frozen=True)
class TrainConfig:
    preset: str
    datalist: str
    data_root: str | None
    fold: int | None
    output_dir: str
    init: InitWeights
    steps: int
    batch_size: int
    seed: int
    optimizer: OptimizerConfig
    amp: Literal["auto", "off", "float16", "bfloat16"]
    checkpoint_every: int
    validate_every: int
    log_every: int
    tensorboard: bool
    diffusion: DiffusionStageConfig
    controlnet: ControlNetStageConfig
    autoencoder: AutoencoderStageConfig
    mask_autoencoder: MaskAutoencoderStageConfig
    mask_diffusion: MaskDiffusionStageConfig
    ldm: LDMDataConfig
    loader: LoaderConfig
    device: DeviceName
    threads: ThreadsSetting


def check_train_config(config: TrainConfig) -> list[str]:
    """Checks that hold for every stage; stage-specific needs are checked when the stage starts."""
    problems = []
    if config.optimizer.warmup_steps >= config.steps and config.optimizer.warmup_steps > 0:
        problems.append(
            f"$.optimizer.warmup_steps: {config.optimizer.warmup_steps} is not below $.steps {config.steps}"
        )
    return problems
