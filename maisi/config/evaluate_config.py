"""The ``maisi.evaluate`` config: dataclasses mirroring ``schemas/evaluate.schema.json`` and cross-key
checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    table: str | None


Files = str | tuple[str, ...]  # a glob pattern, a folder, or a list of files


@dataclass(frozen=True)
class IntensityRule:
    mode: Literal["range", "percentile"]
    low: float
    high: float
    lower_percentile: float
    upper_percentile: float


@dataclass(frozen=True)
class LdmSsimConfig:
    kernel_size: int
    kernel_sigma: float
    scales: int


@dataclass(frozen=True)
class LdmReconstructionConfig:
    enabled: bool
    preset: str | None
    autoencoder: str | None
    held_out: Files | None


@dataclass(frozen=True)
class LdmDiversityConfig:
    enabled: bool
    max_pairs: int
    seed: int


@dataclass(frozen=True)
class MemorisationConfig:
    enabled: bool
    distance: Literal["l2", "ssim"]
    threshold_quantile: float


@dataclass(frozen=True)
class LdmFidConfig:
    network: Literal["resnet", "xrv-densenet121"]
    weights: str | None
    image_size: int
    slice_step: int
    batch_size: int


@dataclass(frozen=True)
class AdherenceConfig:
    no_finding: Files
    findings: tuple[dict, ...]  # {name, prompt, images, detector: {name, box, threshold, direction}}


@dataclass(frozen=True)
class LdmEvaluateConfig:
    """``$.ldm``: evaluation of a plain LDM's 2D images or 3D volumes (see ``maisi.evaluation.ldm_run``)."""

    spatial_dims: Literal[2, 3]
    real: Files | None
    synthetic: Files | None
    training: Files | None
    intensity: IntensityRule
    ssim: LdmSsimConfig
    reconstruction: LdmReconstructionConfig
    diversity: LdmDiversityConfig
    memorisation: MemorisationConfig
    fid: LdmFidConfig
    adherence: AdherenceConfig | None


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
    ldm: LdmEvaluateConfig | None


def check_ldm_config(config: EvaluateConfig) -> list[str]:
    """Cross-key problems of an evaluation with ``$.ldm`` (each naming its key)."""
    ldm = config.ldm
    if ldm is None:
        return []
    problems = []
    for key, value in (
        ("$.real_datalist", config.real_datalist),
        ("$.synthetic", config.synthetic),
        ("$.fid.weights", config.fid.weights),
        ("$.output.montage", config.output.montage),
    ):
        if value is not None:
            problems.append(
                f"{key}: must be null with $.ldm (the LDM evaluation has its own keys under $.ldm)"
            )
    if config.reconstruction.enabled:
        problems.append("$.reconstruction.enabled: must be false with $.ldm (use $.ldm.reconstruction)")
    rec = ldm.reconstruction
    if rec.enabled:
        for key in ("preset", "autoencoder", "held_out"):
            if getattr(rec, key) is None:
                problems.append(
                    f"$.ldm.reconstruction.{key}: required when $.ldm.reconstruction.enabled is true"
                )
    rule = ldm.intensity
    if rule.mode == "range" and rule.high <= rule.low:
        problems.append(
            f"$.ldm.intensity.high: {rule.high} must be greater than $.ldm.intensity.low {rule.low}"
        )
    if rule.mode == "percentile" and rule.upper_percentile <= rule.lower_percentile:
        problems.append(
            f"$.ldm.intensity.upper_percentile: {rule.upper_percentile} must be greater than "
            f"$.ldm.intensity.lower_percentile {rule.lower_percentile}"
        )
    if ldm.fid.weights is not None and (ldm.real is None or ldm.synthetic is None):
        problems.append(
            "$.ldm.fid.weights: the FID compares two sets; set both $.ldm.real and $.ldm.synthetic"
        )
    if ldm.fid.weights is not None and ldm.spatial_dims == 3 and ldm.fid.network != "resnet":
        problems.append(
            f"$.ldm.fid.network: '{ldm.fid.network}' is a 2D radiograph network; the 2.5D FID of volumes "
            "takes 'resnet'"
        )
    for i, finding in enumerate(ldm.adherence.findings if ldm.adherence else ()):
        box = finding["detector"]["box"]
        if box[2] <= box[0] or box[3] <= box[1]:
            problems.append(
                f"$.ldm.adherence.findings[{i}].detector.box: {list(box)} is empty; "
                "expected [row_start, col_start, row_stop, col_stop] with stops greater than starts"
            )
    if not any((ldm.synthetic, rec.enabled, ldm.adherence)):
        problems.append(
            "$.ldm: nothing to evaluate: set $.ldm.synthetic, $.ldm.reconstruction or $.ldm.adherence"
        )
    return problems


def check_evaluate_config(config: EvaluateConfig) -> list[str]:
    if config.ldm is not None:
        return check_ldm_config(config)
    problems = []
    if config.output.table is not None:
        problems.append("$.output.table: only the LDM evaluation ($.ldm) writes a text table; set it to null")
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
