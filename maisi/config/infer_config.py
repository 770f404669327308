"""The ``maisi.infer`` config: frozen dataclasses mirroring ``schemas/infer.schema.json`` and the checks JSON
Schema cannot express that relate several keys. Checks against the preset are in
:mod:`maisi.families.checks`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from maisi.config.schema import build_dataclass, fill_defaults, load_schema
from maisi.config.size_request import ABSENT, size_request_problems
from maisi.families.ct import PRESETS
from maisi.families.ldm import LDM_PRESETS
from maisi.options import (
    DEFAULT_STEPS,
    REGION_INDEX,
    BodyRegion,
    CheckedOrgan,
    CompileOption,
    DecodeMethod,
    DeviceName,
    ImageFormat,
    MaskSampler,
    Modality,
    NullPrompt,
    Precision,
    Sampler,
    ThreadsSetting,
    TimestepSpacing,
)


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
    guidance_scale: float  # classifier-free guidance; 0: off
    null_prompt: NullPrompt  # text presets: the unconditional half's prompt
    timestep_spacing: TimestepSpacing | None  # LDM presets; None: the preset's
    scale_factor: float | None  # LDM presets; None: the UNet checkpoint's, else the preset's


@dataclass(frozen=True)
class TextEncoderConfig:
    """Text presets' encoder: a local CLIPTextModel folder or a tiny encoder record (exactly one)."""

    path: str | None
    checkpoint: str | None


@dataclass(frozen=True)
class DecodingConfig:
    method: DecodeMethod
    sw_roi_size: tuple[int, int, int]
    sw_overlap: float
    memory_budget_mb: int


@dataclass(frozen=True)
class OutputConfig:
    dir: str
    format: ImageFormat
    prefix: str
    preview: bool


@dataclass(frozen=True)
class QualityCheckConfig:
    enabled: bool
    max_tries: int
    organs: tuple[CheckedOrgan, ...] | None
    fail_on_error: bool


@dataclass(frozen=True)
class LesionSpec:
    """A lesion to place in the retrieved mask: a label-dictionary name, its size and its host organ(s)."""

    label: str
    diameter_mm: float
    host: tuple[str, ...]


@dataclass(frozen=True)
class MaskGeneratorConfig:
    """The mask-generation model of MAISI's Path A (null files: the released ones, for released presets)."""

    preset: str | None
    autoencoder: str | None
    diffusion_unet: str | None
    size_conditions: str | None
    size_reference: str | None
    scheduler: MaskSampler
    num_inference_steps: int | None

    @property
    def steps(self) -> int:
        """The sampler's steps: as configured, else 1000 for DDPM (MAISI's) and 50 for DDIM."""
        return self.num_inference_steps or DEFAULT_STEPS[self.scheduler]


@dataclass(frozen=True)
class AnatomyConfig:
    """Anatomy mode: what the CT must hold; the mask comes from a database (MAISI's retrieval path)."""

    anatomy_list: tuple[str, ...]
    body_region: tuple[str, ...]
    mask_database: str | None
    mask_root: str | None
    augment: bool
    lesions: tuple[LesionSpec, ...]
    controllable_anatomy_size: tuple[tuple[str, float], ...]
    mask_generator: MaskGeneratorConfig

    def __post_init__(self) -> None:
        # The loader builds nested dataclasses only for object fields; the lesions arrive as plain objects.
        lesions = tuple(item if isinstance(item, LesionSpec) else _lesion(item) for item in self.lesions)
        object.__setattr__(self, "lesions", lesions)
        # [name, size] pairs -> (name, float) pairs; anything else is left for size_request_problems to name.
        sizes = tuple(
            (entry[0], float(entry[1]))
            if len(entry) == 2 and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)
            else tuple(entry)
            for entry in self.controllable_anatomy_size
        )
        object.__setattr__(self, "controllable_anatomy_size", sizes)

    @property
    def generates_mask(self) -> bool:
        """MAISI's Path A: a size request is given, so the mask is generated instead of retrieved."""
        return bool(self.controllable_anatomy_size)

    @property
    def required_anatomy(self) -> tuple[str, ...]:
        """Names the sample's mask must hold: ``anatomy_list`` when retrieving; when generating, the named
        slots whose size is not -1 (MAISI uses all named slots, -1 ones included, which a mask asked not to
        hold them could never pass)."""
        if not self.generates_mask:
            return self.anatomy_list
        return tuple(name for name, size in self.controllable_anatomy_size if size != ABSENT)


def _lesion(item: dict[str, Any]) -> LesionSpec:
    host = item["host"]
    hosts = (host,) if isinstance(host, str) else tuple(host)
    return LesionSpec(item["label"], float(item["diameter_mm"]), hosts)


@dataclass(frozen=True)
class DatalistInput:
    """Many masks from a KiTS-style datalist: the label of each case (of one fold, or of all)."""

    path: str
    fold: int | None
    data_root: str | None


@dataclass(frozen=True)
class InferConfig:
    preset: str
    checkpoints: Checkpoints
    mask: str | None
    masks: tuple[str, ...] | None
    datalist: DatalistInput | None
    anatomy: AnatomyConfig | None
    prompts: tuple[str, ...] | None
    text_encoder: TextEncoderConfig | None
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
    allow_preset_mismatch: bool
    device: DeviceName
    precision: Precision
    compile: CompileOption
    threads: ThreadsSetting

    @property
    def from_mask(self) -> bool:
        return self.mask is not None

    @property
    def from_anatomy(self) -> bool:
        return self.anatomy is not None

    @property
    def is_batch(self) -> bool:
        """Many masks in one job: $.masks or $.datalist (each input then runs as mask mode)."""
        return self.masks is not None or self.datalist is not None

    @property
    def writes_mask(self) -> bool:
        """Whether each sample has a mask (saved next to its CT): mask, batch and anatomy modes."""
        return self.mask is not None or self.anatomy is not None or self.is_batch

    @property
    def is_ldm(self) -> bool:
        """Whether ``$.preset`` is a plain LDM preset (:mod:`maisi.families.ldm`), not a MAISI one."""
        return self.preset in LDM_PRESETS

    @property
    def sampler(self) -> Sampler:
        """The sampler to use: the configured one or the preset's own."""
        if self.is_ldm:
            return self.sampling.scheduler or LDM_PRESETS[self.preset].sampler
        return self.sampling.scheduler or PRESETS[self.preset].schedule.kind

    @property
    def num_inference_steps(self) -> int:
        """The configured steps, else the LDM preset's (for its own sampler) or the sampler's default."""
        if self.sampling.num_inference_steps:
            return self.sampling.num_inference_steps
        if self.is_ldm and self.sampler == LDM_PRESETS[self.preset].sampler:
            return LDM_PRESETS[self.preset].num_steps
        return DEFAULT_STEPS[self.sampler]


def _region_problems(regions: tuple[str, ...]) -> list[str]:
    """Unknown body-region names, with did-you-mean (MAISI's spellings and ours, case-insensitive)."""
    problems = []
    for i, name in enumerate(regions):
        key = name.strip().lower()
        if key in REGION_INDEX:
            continue
        hints = difflib.get_close_matches(key, list(REGION_INDEX), n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
        known = ", ".join(REGION_INDEX)
        problems.append(f"$.anatomy.body_region[{i}]: unknown body region '{name}'{hint} (known: {known})")
    return problems


def _default_mask_generator() -> MaskGeneratorConfig:
    """``$.anatomy.mask_generator`` as the schema's defaults give it (what an absent block means)."""
    schema = load_schema("infer")["properties"]["anatomy"]["properties"]["mask_generator"]
    return build_dataclass(MaskGeneratorConfig, fill_defaults({}, schema))


def _size_request_config_problems(anatomy: AnatomyConfig) -> list[str]:
    """MAISI's rules on the size request, and the keys it replaces (explicit where MAISI silently ignores)."""
    where = "$.anatomy.controllable_anatomy_size"
    if not anatomy.generates_mask:
        # An empty list retrieves the mask; generator settings would be silently unused: a forgotten request.
        if anatomy.mask_generator != _default_mask_generator():
            return [
                f"{where}: empty, but $.anatomy.mask_generator is set: the mask generator runs only for a "
                f"size request (e.g. [['liver', 0.5]]); an empty list retrieves the mask from the database, "
                "so remove $.anatomy.mask_generator for that"
            ]
        return []
    problems = size_request_problems(anatomy.controllable_anatomy_size, where)
    # MAISI ignores body_region and anatomy_list when sizes are given; we refuse them instead of ignoring.
    if anatomy.body_region:
        problems.append(
            f"$.anatomy.body_region: must be empty when {where} is set: a generated mask covers what the "
            "mask model gives (MAISI ignores body_region then)"
        )
    if anatomy.anatomy_list:
        problems.append(
            f"$.anatomy.anatomy_list: must be empty when {where} is set: the mask must hold the named organs "
            "whose size is not -1 (MAISI replaces anatomy_list by them)"
        )
    if anatomy.lesions:
        problems.append(f"$.anatomy.lesions: lesions are placed in retrieved masks only; {where} is set")
    return problems


INPUT_KEYS = ("mask", "masks", "datalist", "anatomy")  # where the masks come from: at most one


def check_infer_config(config: InferConfig) -> list[str]:
    """Cross-key checks; each message starts with the JSON path it concerns. The input modes are MAISI's:
    an LDM preset's config is checked against its preset (:mod:`maisi.families.ldm_checks`)."""
    if config.is_ldm:
        return []
    problems: list[str] = []
    if config.from_mask and config.from_anatomy:
        return ["$.anatomy: cannot be combined with $.mask (a mask is given or retrieved, not both)"]
    inputs = [key for key in INPUT_KEYS if getattr(config, key) is not None]
    if len(inputs) > 1:
        given = ", ".join(f"$.{key}" for key in inputs)
        return [f"{given}: set at most one of $.mask, $.masks, $.datalist, $.anatomy (got {len(inputs)})"]
    if config.is_batch:
        if config.checkpoints.controlnet is None:
            key = "$.masks" if config.masks is not None else "$.datalist"
            problems.append(f"$.checkpoints.controlnet: required when generating from masks ({key} is set)")
        return problems
    if config.from_anatomy:
        assert config.anatomy is not None
        for key in ("output_size", "spacing"):
            if getattr(config, key) is None:
                problems.append(f"$.{key}: required in anatomy mode ($.anatomy is set): the grid to generate")
        if config.checkpoints.controlnet is None:
            problems.append("$.checkpoints.controlnet: required in anatomy mode ($.anatomy is set)")
        problems += _region_problems(config.anatomy.body_region)
        problems += _size_request_config_problems(config.anatomy)
    elif config.from_mask:
        if config.checkpoints.controlnet is None:
            problems.append("$.checkpoints.controlnet: required when generating from a mask ($.mask is set)")
    else:
        for key in ("output_size", "spacing"):
            if getattr(config, key) is None:
                problems.append(
                    f"$.{key}: required in image-only mode (set it, or set $.mask, $.masks, $.datalist or "
                    "$.anatomy)"
                )
    return problems
