"""The ``maisi.infer`` config: frozen dataclasses mirroring ``schemas/infer.schema.json`` and the checks
JSON Schema cannot express that relate several keys. Checks against the preset are in :mod:`maisi.preset_checks`."""

from __future__ import annotations

from dataclasses import dataclass

from maisi.options import (
    DEFAULT_STEPS,
    BodyRegion,
    CheckedOrgan,
    DecodeMethod,
    DeviceName,
    Modality,
    Precision,
    Sampler,
    VolumeFormat,
)
from maisi.presets import PRESETS


@dataclass(frozen=True)
class Checkpoints:
    autoencoder: str
    diffusion_unet: str
    controlnet: str | None


@dataclass(frozen=True)
class BodyRegionRange:
    top: BodyRegion
    bottom: BodyRegion


@dataclass(frozen=True)
class SamplingConfig:
    scheduler: Sampler | None
    num_inference_steps: int | None
    conditioning_scale: float


@dataclass(frozen=True)
class DecodingConfig:
    method: DecodeMethod
    sw_roi_size: tuple[int, int, int]
    sw_overlap: float
    memory_budget_mb: int


@dataclass(frozen=True)
class OutputConfig:
    dir: str
    format: VolumeFormat
    prefix: str
    preview: bool


@dataclass(frozen=True)
class QualityCheckConfig:
    enabled: bool
    max_tries: int
    organs: tuple[CheckedOrgan, ...] | None
    fail_on_error: bool


@dataclass(frozen=True)
class InferConfig:
    preset: str
    checkpoints: Checkpoints
    mask: str | None
    output_size: tuple[int, int, int] | None
    spacing: tuple[float, float, float] | None
    body_region: BodyRegionRange | None
    modality: Modality
    label_dict: str | None
    sampling: SamplingConfig
    decoding: DecodingConfig
    num_samples: int
    seed: int
    output: OutputConfig
    quality_check: QualityCheckConfig
    enforce_preset_limits: bool
    device: DeviceName
    precision: Precision

    @property
    def from_mask(self) -> bool:
        return self.mask is not None

    @property
    def sampler(self) -> Sampler:
        """The sampler to use: the configured one or the preset's own."""
        return self.sampling.scheduler or PRESETS[self.preset].schedule.kind

    @property
    def num_inference_steps(self) -> int:
        return self.sampling.num_inference_steps or DEFAULT_STEPS[self.sampler]


def check_infer_config(config: InferConfig) -> list[str]:
    """Cross-key checks; each message starts with the JSON path it concerns."""
    problems: list[str] = []
    if config.from_mask:
        for key in ("output_size", "spacing"):
            if getattr(config, key) is not None:
                problems.append(f"$.{key}: must be null when $.mask is set (the mask defines the grid)")
        if config.checkpoints.controlnet is None:
            problems.append("$.checkpoints.controlnet: required when generating from a mask ($.mask is set)")
    else:
        for key in ("output_size", "spacing"):
            if getattr(config, key) is None:
                problems.append(f"$.{key}: required in image-only mode (set it, or set $.mask)")
    return problems
