"""Generate CT volumes: check every input, load the networks, run sampling and decoding.

Used by ``maisi.infer``; usable from Python::

    plan = plan_generation(config)          # reads the mask, checks labels and grid; writes nothing
    check_memory(plan, device)              # maisi.generation.memory: refuses grids the machine cannot hold
    models = load_models(plan, device)      # builds the preset's networks, loads checkpoints strictly
    ct = generate(plan, models, seed=0)     # a Volume of int16 HU on the plan's grid
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maisi.acceleration import Acceleration, accelerate
from maisi.checkpoints import Weights, check_preset, load_network
from maisi.conditioning import Conditions, binarize_labels, body_region_from_mask
from maisi.config.infer_config import InferConfig
from maisi.data.io import Volume, centred_affine, read_mask
from maisi.device import autocast_dtype
from maisi.errors import CheckpointError, InputError, VolumeError
from maisi.evaluation.quality import hu_check
from maisi.families.checks import guidance_warnings
from maisi.families.ct import MRGridLimits, Preset, get_preset, grid_problems
from maisi.families.networks import RuntimeOptions
from maisi.intensity import is_mr, set_outside_body, unit_to_hu, unit_to_mr
from maisi.labels import BODY_LABEL, labels_not_in_dict, load_label_dict
from maisi.labels.crop import crop
from maisi.masks.anatomy import AnatomyPlan, plan_anatomy, sample_mask
from maisi.masks.resample import pad_to_size, resample_mask
from maisi.masks.tumour_free import lesion_hosts, remove_tumors
from maisi.options import BODY_REGIONS, REGION_INDEX
from maisi.sampling import denoise, make_scheduler
from maisi.seeding import torch_generator
from maisi.vae.codec import decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationPlan:
    """Everything about the samples except the seed: grid, geometry, conditions, sampler."""

    config: InferConfig
    preset: Preset
    shape: tuple[int, int, int]
    affine: np.ndarray
    conditions: Conditions
    mask: Volume | None
    warnings: tuple[str, ...] = ()
    anatomy: AnatomyPlan | None = None  # anatomy mode: the request and its database picks
    crop_box: tuple[slice, ...] | None = None  # mask padded to a size the preset takes: the original voxels
    mask_grid: dict[str, Any] | None = None  # mask mode: how the mask was brought to the generation grid
    sample_record: dict[str, Any] | None = None  # anatomy mode, per sample: how its mask was made
    label_dict: dict[str, int] | None = None  # guidance from a mask: whose hosts make the tumour-free mask
    lesion_hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # guidance: hosts of the lesions

    @property
    def output_mask(self) -> Volume | None:
        """The mask on the grid of the saved CT (the generation grid without the padding)."""
        if self.mask is None or self.crop_box is None:
            return self.mask
        return crop(self.mask, self.crop_box)

    @property
    def has_mask(self) -> bool:
        """Whether samples are generated from a mask (given or retrieved): the ControlNet is used."""
        return self.mask is not None or self.anatomy is not None

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        f = self.preset.vae_factor
        return (1, self.preset.latent_channels, *(s // f for s in self.shape))  # type: ignore[return-value]


@dataclass
class Models:
    """The loaded networks on the compute device, and what their files said."""

    autoencoder: torch.nn.Module
    diffusion_unet: torch.nn.Module
    controlnet: torch.nn.Module | None
    scale_factor: float
    weights: dict[str, Weights] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None  # autocast of the UNet and ControlNet
    acceleration: Acceleration = field(default_factory=Acceleration)
    # Autocast of the VAE decode: float32 on CPU under precision "auto" (in bfloat16 the demo's bone medians
    # moved enough to fail the HU check on every try; see README "Speed").
    decode_dtype: torch.dtype | None = None
    preset_check: dict[str, str] = field(default_factory=dict)  # part -> what check_preset found


def _mask_problems(
    mask: Volume, preset: Preset, config: InferConfig, label_dict: dict[str, int]
) -> list[str]:
    problems = []
    if not mask.array.any():
        # Nothing to condition on: the result would be air everywhere, a blank CT.
        problems.append(
            f"has no labelled voxel (every voxel is 0, background); a mask needs at least the body label "
            f"{BODY_LABEL}"
        )
        return problems
    unknown = labels_not_in_dict(mask.array, label_dict)
    if unknown:
        shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
        problems.append(
            f"labels not in the label dictionary: {shown} (remap the mask to MAISI ids or "
            "extend the dictionary with $.label_dict)"
        )
    return problems


def fitting_size(
    preset: Preset, shape: tuple[int, int, int], enforce_limits: bool
) -> tuple[int, int, int] | None:
    """The smallest size at least ``shape`` on every axis that the preset takes, or None when none is."""
    m = preset.spatial_multiple

    def up(n: int, allowed: tuple[int, ...] | None = None) -> int | None:
        if allowed is None:
            return -(-n // m) * m
        return min((a for a in allowed if a >= n and a % m == 0), default=None)

    if enforce_limits and isinstance(preset.limits, MRGridLimits):  # a short list of allowed shapes
        return next((s for s in preset.limits.shapes() if all(a >= b for a, b in zip(s, shape))), None)
    if enforce_limits and preset.limits:
        xy, z = up(max(shape[:2]), preset.limits.xy_sizes), up(shape[2], preset.limits.z_sizes)
        return None if xy is None or z is None else (xy, xy, z)
    return (up(shape[0]), up(shape[1]), up(shape[2]))  # type: ignore[return-value]


def _fit_mask(
    mask: Volume, preset: Preset, config: InferConfig
) -> tuple[Volume, dict[str, Any] | None, tuple[slice, ...] | None, list[str]]:
    """Bring a user's mask to a grid the preset takes: resampled to $.spacing / $.output_size when given,
    else padded (background) to the next size it takes. Returns the mask, a record, the crop box and the
    grid problems left."""
    record: dict[str, Any] | None = None
    if config.output_size is not None or config.spacing is not None:
        mask, resampling = resample_mask(mask, config.spacing, config.output_size)
        record = {"resampling": resampling}
    enforce = config.enforce_preset_limits
    problems = grid_problems(preset, mask.shape, mask.spacing, enforce)
    box = None
    if problems and config.output_size is None:
        size = fitting_size(preset, mask.shape, enforce)
        if size is not None and not grid_problems(preset, size, mask.spacing, enforce):
            original = mask
            mask, box = pad_to_size(mask, size)
            record = {
                **(record or {}),
                "padding": {
                    "from": list(original.shape),
                    "to": list(size),
                    "crop_box": [[b.start, b.stop] for b in box],
                },
            }
            problems = []
    return mask, record, box, problems


def plan_generation(config: InferConfig, device: torch.device | str = "cpu") -> GenerationPlan:
    """Check the inputs a config names (mask or database, labels, grid) and fix the grid and the conditions.

    ``device``: where a mask generator (anatomy mode with a size request) is loaded.

    Raises:
        InputError: listing every problem found with the mask, or naming the missing body region; in
            anatomy mode, any problem of the database, the generator or the request (see
            :func:`plan_anatomy`).
    """
    preset = get_preset(config.preset)
    warnings = guidance_warnings(config, preset)
    guided = config.sampling.guidance_scale > 0
    top, bottom = (config.body_region.top, config.body_region.bottom) if config.body_region else (None, None)
    if config.anatomy is not None:
        assert config.output_size is not None and config.spacing is not None  # the config checks see to it
        shape, spacing = config.output_size, config.spacing
        label_dict = load_label_dict(config.label_dict)
        anatomy = plan_anatomy(config, label_dict, str(device))
        conditions = Conditions(spacing, top, bottom, config.modality)  # body region: per sample, from a mask
        affine = centred_affine(shape, spacing)
        hosts = label_dict if guided else None
        placed = (
            lesion_hosts(config.anatomy.lesions) if guided else {}
        )  # count as host rules of their classes
        return GenerationPlan(
            config,
            preset,
            shape,
            affine,
            conditions,
            None,
            tuple(warnings),
            anatomy=anatomy,
            label_dict=hosts,
            lesion_hosts=placed,
        )
    if config.mask is None:
        assert (
            config.output_size is not None and config.spacing is not None
        )  # guaranteed by the config checks
        shape, spacing = config.output_size, config.spacing
        conditions = Conditions(spacing, top, bottom, config.modality)
        affine = centred_affine(shape, spacing)
        return GenerationPlan(config, preset, shape, affine, conditions, None, tuple(warnings))

    label_dict = load_label_dict(config.label_dict)
    mask = read_mask(config.mask)
    problems = _mask_problems(mask, preset, config, label_dict)
    if problems:
        raise VolumeError(f"mask {config.mask}:\n  " + "\n  ".join(problems))
    mask, mask_grid, box, problems = _fit_mask(mask, preset, config)
    if problems:
        where = "resampled to $.spacing/$.output_size" if mask_grid else "its grid"
        raise VolumeError(f"mask {config.mask} ({where}):\n  " + "\n  ".join(problems))
    if not np.any(mask.array == BODY_LABEL):
        warnings.append(
            f"mask {config.mask} has no body label {BODY_LABEL}: MAISI's ControlNet expects every "
            f"body voxel that is not an organ labelled {BODY_LABEL}; without it images are poor. Add it "
            "from the CT the mask was made on (air threshold near -800 HU): python -m maisi.labels "
            "envelope --image CT --mask MASK --output MASK_WITH_BODY"
        )
    if top is None and preset.uses_body_region:
        derived = body_region_from_mask(mask.array)
        if derived is None:
            raise InputError(
                f"mask {config.mask}: cannot derive the body region (no brain/skull, lung, abdominal "
                "organ or femur label); set $.body_region in the config"
            )
        top, bottom = derived
    conditions = Conditions(mask.spacing, top, bottom, config.modality)
    fit = {"crop_box": box, "mask_grid": mask_grid, "label_dict": label_dict if guided else None}
    return GenerationPlan(config, preset, mask.shape, mask.affine, conditions, mask, tuple(warnings), **fit)


def plan_for_seed(
    plan: GenerationPlan,
    seed: int,
    planned_digest: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> GenerationPlan:
    """Anatomy mode: the plan of one sample, with its prepared mask and the body region derived from it
    (``progress``: the bars of a generated mask's sampling and decoding). Other modes: the plan itself.

    Raises:
        InputError: the sample's mask cannot be made (see :func:`maisi.masks.anatomy.build_sample_mask`), or
            its body region cannot be derived for a preset conditioned on it.
    """
    if plan.anatomy is None:
        return plan
    sample = sample_mask(plan.anatomy, seed, planned_digest, device, progress)
    conditions = plan.conditions
    if conditions.top_region is None and plan.preset.uses_body_region:
        derived = body_region_from_mask(sample.volume.array)
        if derived is None:
            regions = sorted(REGION_INDEX[r.strip().lower()] for r in plan.anatomy.anatomy.body_region)
            if not regions:
                source = sample.record["entry"]["path"] if "entry" in sample.record else "the generated mask"
                raise InputError(
                    f"seed {seed}: cannot derive the body region of {source} (no marker organ); set "
                    "$.body_region or $.anatomy.body_region"
                )
            derived = (BODY_REGIONS[regions[0]], BODY_REGIONS[regions[-1]])
        conditions = dataclasses.replace(conditions, top_region=derived[0], bottom_region=derived[1])
    # The CT takes the geometry of the resampled database mask (as MAISI saves it), so that world positions
    # in the record (lesion centres) hold for the files.
    volume = sample.volume
    return dataclasses.replace(
        plan, mask=volume, affine=volume.affine.copy(), conditions=conditions, sample_record=sample.record
    )


def load_models(
    plan: GenerationPlan | InferConfig, device: torch.device, acceleration: Acceleration | None = None
) -> Models:
    """Build the preset's networks for ``device``, load the config's checkpoints into them and apply the
    speed switches (:mod:`maisi.acceleration`; default: the device's, with the config's ``compile``).

    Args:
        plan: a plan, or a config (a job of many masks: every mask shares the networks).

    Raises:
        CheckpointError: a missing file, another architecture, or a UNet checkpoint without scale_factor.
    """
    config = plan.config if isinstance(plan, GenerationPlan) else plan
    preset = get_preset(config.preset)
    runtime = RuntimeOptions.for_device(device)
    vae, vae_w = load_network(preset, "autoencoder", config.checkpoints.autoencoder, runtime)
    unet, unet_w = load_network(preset, "diffusion_unet", config.checkpoints.diffusion_unet, runtime)
    if unet_w.scale_factor is None:
        raise CheckpointError(
            f"{unet_w.path}: diffusion UNet checkpoint has no scale_factor; it is part of the "
            "trained model (1 / std of the training latents) and cannot be guessed"
        )
    weights = {"autoencoder": vae_w, "diffusion_unet": unet_w}
    controlnet = None
    if config.writes_mask:  # a mask given, listed or retrieved: the ControlNet is used
        assert config.checkpoints.controlnet is not None  # guaranteed by the config checks
        controlnet, weights["controlnet"] = load_network(
            preset, "controlnet", config.checkpoints.controlnet, runtime
        )
        controlnet = controlnet.to(device)
    elif config.checkpoints.controlnet is not None:
        log.info("image-only mode: the ControlNet checkpoint is not used")
    preset_check = {
        part: check_preset(w, preset, part, config.allow_preset_mismatch)  # type: ignore[arg-type]
        for part, w in weights.items()
    }
    acceleration = acceleration or Acceleration.for_run(config.compile, device)
    unet, controlnet = accelerate(unet.to(device), controlnet, device, acceleration)
    return Models(
        vae.to(device),
        unet,
        controlnet,
        unet_w.scale_factor,
        weights,
        device,
        autocast_dtype(config.precision, device, cpu_bfloat16=True),
        acceleration,
        autocast_dtype(config.precision, device),
        preset_check,
    )


def generate(
    plan: GenerationPlan, models: Models, seed: int, progress: bool = True
) -> tuple[Volume, dict[str, float]]:
    """Generate one CT for ``seed``.

    Returns:
        The CT as a Volume of int16 HU in [-1000, 1000] on the plan's grid (air outside the mask in mask
        mode), and the seconds spent in sampling and decoding. For an MR modality (code >= 8) the volume
        holds int16 MR intensities mapped as MAISI does: [0, 1] -> [0, 1000], no upper clip
        (:func:`maisi.intensity.unit_to_mr`).
    """
    config, device = plan.config, models.device
    if plan.has_mask and plan.mask is None:
        raise ValueError("anatomy mode: generate from the plan of a sample (plan_for_seed)")
    # Noise is drawn on the CPU so a seed gives the same starting point on every device; the starting noise
    # and the per-step noise are independent streams of the seed (maisi.seeding).
    noise = torch.randn(plan.latent_shape, generator=torch_generator(seed, "initial_noise")).to(device)
    step_generator = torch_generator(seed, "step_noise", device)
    control = uncond_control = None
    guidance = config.sampling.guidance_scale
    if plan.mask is not None:
        labels = torch.from_numpy(plan.mask.array.astype(np.int64))[None, None]
        control = binarize_labels(labels).to(device)
        if guidance > 0:  # the unconditional half sees the mask without its tumours
            assert plan.label_dict is not None  # set by plan_generation when guidance is on
            uncond_control = binarize_labels(remove_tumors(labels, plan.label_dict, plan.lesion_hosts)).to(
                device
            )
    scheduler = make_scheduler(plan.preset.schedule, config.sampler)
    t0 = time.perf_counter()
    latents = denoise(
        models.diffusion_unet,
        scheduler,
        noise,
        config.num_inference_steps,
        plan.conditions.network_inputs(plan.preset, 1, device),
        controlnet=models.controlnet,
        control=control,
        conditioning_scale=config.sampling.conditioning_scale,
        generator=step_generator,
        autocast_dtype=models.dtype,
        progress=progress,
        guidance_scale=guidance,
        uncond_control=uncond_control,
    )
    t1 = time.perf_counter()
    image = decode(
        models.autoencoder,
        latents,
        models.scale_factor,
        method=config.decoding.method,
        roi_size=config.decoding.sw_roi_size,
        overlap=config.decoding.sw_overlap,
        memory_budget_bytes=config.decoding.memory_budget_mb << 20,
        autocast_dtype=models.decode_dtype,
        progress=progress,
    )
    t2 = time.perf_counter()
    if is_mr(plan.conditions.modality):
        hu = unit_to_mr(image[0, 0].numpy())  # MR has no HU and no air value: nothing outside a mask is set
    else:
        hu = unit_to_hu(image[0, 0].numpy())
        if plan.mask is not None:
            hu = set_outside_body(hu, plan.mask.array)
    ct = Volume(hu, plan.affine.copy())
    if plan.crop_box is not None:  # the mask was padded to a size the preset takes: back to its grid
        ct = crop(ct, plan.crop_box)
    return ct, {"sampling_s": t1 - t0, "decoding_s": t2 - t1}


RETRY_SEED_STRIDE = 1_000_003  # try k of a sample uses seed + k * stride: far from the other samples' seeds


def generate_checked(
    plan: GenerationPlan, models: Models, seed: int, progress: bool = True
) -> tuple[Volume, dict[str, float], list[dict[str, Any]]]:
    """Generate, run the HU check (mask mode), and generate again with another seed while it fails.

    Returns:
        The CT kept (the first that passes, else the one with the fewest failing organs), the timings of
        all tries, and one record per try: its seed, whether it passed, the organ medians.
    """
    check = plan.config.quality_check
    if check.enabled and is_mr(plan.conditions.modality):  # MAISI runs no HU check on MR (modality >= 8)
        ct, timings = generate(plan, models, seed, progress)
        reason = f"MR output (modality '{plan.conditions.modality}'): the HU check judges CT only"
        return ct, timings, [{"seed": seed, "passed": None, "failed": [], "organs": {}, "reason": reason}]
    if plan.mask is None or not check.enabled:
        ct, timings = generate(plan, models, seed, progress)
        return ct, timings, []
    organs = list(check.organs) if check.organs is not None else None
    tries: list[dict[str, Any]] = []
    best: tuple[int, Volume] | None = None
    totals: dict[str, float] = {}
    for k in range(check.max_tries):
        try_seed = seed + k * RETRY_SEED_STRIDE
        ct, timings = generate(plan, models, try_seed, progress)
        for key, value in timings.items():
            totals[key] = totals.get(key, 0.0) + value
        result = hu_check(ct, plan.output_mask, organs)
        tries.append({"seed": try_seed, **result.to_json()})
        if best is None or len(result.failed) < best[0]:
            best = (len(result.failed), ct)
        if result.passed is None:  # nothing to judge in this mask: another seed would not change that
            log.warning("seed %d: HU check not checked: %s", try_seed, result.reason)
            break
        if result.passed:
            break
        log.warning(
            "seed %d: HU check failed for %s (try %d of %d)",
            try_seed,
            ", ".join(result.failed),
            k + 1,
            check.max_tries,
        )
    assert best is not None
    return best[1], totals, tries
