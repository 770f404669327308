"""The ``maisi.evaluate`` config: dataclasses mirroring ``schemas/evaluate.schema.json`` and cross-key
checks."""

from __future__ import annotations

from dataclasses import dataclass

from maisi.options import DeviceName, Modality, Precision, ThreadsSetting


@dataclass(frozen=True)
class ReconstructionConfig:
    enabled: bool
    preset: str
    autoencoder: str | None
    memory_budget_mb: int
    target_spacing: tuple[float, float, float] | None


@dataclass(frozen=True)
class DiversityConfig:
    enabled: bool


@dataclass(frozen=True)
class SsimConfig:
    kernel_size: int
    kernel_sigma: float


@dataclass(frozen=True)
class FidConfig:
    weights: str | None
    slice_step: int
    image_size: int
    batch_size: int


@dataclass(frozen=True)
class EvaluateOutputConfig:
    report: str
    montage: str | None
    montage_cases: int


@dataclass(frozen=True)
class EvaluateConfig:
    real_datalist: str | None
    data_root: str | None
    synthetic: str | tuple[str, ...] | None  # a glob pattern or a list of files
    reconstruction: ReconstructionConfig
    diversity: DiversityConfig
    ssim: SsimConfig
    fid: FidConfig
    output: EvaluateOutputConfig
    device: DeviceName
    precision: Precision
    threads: ThreadsSetting
    modality: Modality


def check_evaluate_config(config: EvaluateConfig) -> list[str]:
    problems = []
    if config.real_datalist is None and config.synthetic is None:
        problems.append("$: nothing to evaluate: set $.real_datalist and/or $.synthetic")
    rec = config.reconstruction
    if rec.enabled:
        if config.real_datalist is None:
            problems.append("$.real_datalist: required when $.reconstruction.enabled is true")
        if rec.autoencoder is None:
            problems.append("$.reconstruction.autoencoder: required when $.reconstruction.enabled is true")
    if config.fid.weights is not None and (config.real_datalist is None or config.synthetic is None):
        problems.append(
            "$.fid.weights: the FID compares two sets; set both $.real_datalist and $.synthetic "
            "(or set $.fid.weights to null)"
        )
    return problems
