"""Checks of a loaded config against the preset it names: one function per config kind.

The config layer (:mod:`maisi.config`) checks what a file says on its own; these checks need the preset
registry (:mod:`maisi.families.ct`, plain data). Every CLI loads its config through
:func:`load_checked_config`, so both kinds of problem are reported together, each with its JSON path,
before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from maisi.config import EncodeConfig, EvaluateConfig, InferConfig, TrainConfig, load_config
from maisi.config.loader import read_json
from maisi.errors import InputError
from maisi.families.ct import PRESETS, Preset, check_sampler, get_preset, grid_problems
from maisi.families.ldm import LDM_PRESETS, LDMPreset
from maisi.families.ldm_checks import hub_id_problems, ldm_infer_problems, png_for_maisi_problem
from maisi.families.mask import MASK_PRESETS, MaskPreset, get_mask_preset
from maisi.families.registry import config_keys, foreign_key_problems, foreign_keys
from maisi.resources import load_json

FIRST_MR_CODE = 8  # MAISI: codes 0-7 are CT (0: unknown), 8 and up MR


def _preset(name: str, key: str) -> tuple[Preset | None, list[str]]:
    try:
        return get_preset(name), []
    except InputError as e:
        return None, [f"{key}: {e}"]


def infer_problems(config: InferConfig) -> list[str]:
    """Grid, body region, sampler and (anatomy mode) the requested names of an infer config; an LDM preset's
    config is checked by :func:`maisi.families.ldm_checks.ldm_infer_problems`."""
    if config.preset in LDM_PRESETS:
        return ldm_infer_problems(config)
    preset, problems = _preset(config.preset, "$.preset")
    if preset is None:
        return problems
    problems += png_for_maisi_problem(config)
    if not config.from_mask and not config.from_anatomy and not config.is_batch:
        if preset.uses_body_region and config.body_region is None:
            problems.append(
                f"$.body_region: required in image-only mode: preset '{preset.name}' is conditioned on "
                "body region"
            )
    if (config.from_mask or config.from_anatomy) and not preset.has_controlnet:
        key = "$.mask" if config.from_mask else "$.anatomy"
        problems.append(
            f"{key}: preset '{preset.name}' has no ControlNet (MAISI released none for MR), so it cannot "
            f"generate from a mask or an anatomy request; remove {key} to generate image-only"
        )
    if config.output_size is not None:
        # In mask mode without a spacing the mask's own spacing applies: only the size can be judged here.
        spacing = config.spacing or (1.0, 1.0, 1.0)
        enforce = config.enforce_preset_limits and config.spacing is not None
        for reason in grid_problems(preset, config.output_size, spacing, enforce):
            problems.append(f"$.output_size/$.spacing: {reason}")
    for reason in check_sampler(preset.schedule, config.sampler, config.num_inference_steps):
        problems.append(f"$.sampling: {reason}")
    problems += _modality_problems(config, preset)
    problems += _guidance_problems(config, preset)
    if config.from_anatomy:
        problems += _anatomy_name_problems(config)
    return problems


def modality_family(preset: Preset) -> str:
    """``"ct"`` or ``"mr"``: what the preset's networks generate (CT unless the preset says otherwise)."""
    return getattr(preset, "modality_family", "ct")


def _modality_problems(config: InferConfig, preset: Preset) -> list[str]:
    """The modality name against the preset: none for a preset without modality input, CT codes for a CT
    preset, MR codes for an MR one (0, unknown, fits both)."""
    name = config.modality
    codes: dict[str, int] = load_json("maisi_modality_mapping.json")
    code = codes[name]  # the schema holds the name to the mapping's names
    if not preset.uses_modality:
        if name == "ct":
            return []
        return [
            f"$.modality: '{name}': preset '{preset.name}' has no modality input (its UNet has no class "
            "embedding) and generates CT; leave $.modality at 'ct'"
        ]
    family = modality_family(preset)
    wrong = code >= FIRST_MR_CODE if family == "ct" else 0 < code < FIRST_MR_CODE
    if not wrong:
        return []
    fits = [n for n, c in codes.items() if c == 0 or (c >= FIRST_MR_CODE) == (family == "mr")]
    others = sorted(p.name for p in PRESETS.values() if p.uses_modality and modality_family(p) != family)
    elsewhere = f"; presets for it: {', '.join(others)}" if others else ""
    kind = "an MR" if code >= FIRST_MR_CODE else "a CT"
    return [
        f"$.modality: '{name}' (code {code}) is {kind} modality, but preset '{preset.name}' generates "
        f"{family.upper()}: use one of {', '.join(fits)}{elsewhere}"
    ]


def _guidance_problems(config: InferConfig, preset: Preset) -> list[str]:
    """Guidance needs an unconditional branch: a class embedding, and (from a mask) hosts for the tumours."""
    scale = config.sampling.guidance_scale
    if scale <= 0:
        return []
    if not preset.uses_modality:
        return [
            f"$.sampling.guidance_scale: {scale:g}: preset '{preset.name}' has no modality input, so its "
            "UNet has no unconditional branch (class label 0) to guide against; set it to 0"
        ]
    if not (config.from_mask or config.from_anatomy):
        return []
    from maisi.labels import load_label_dict
    from maisi.masks.tumour_free import (
        lesion_hosts,
        tumour_hosts,
    )  # torch: only when guidance runs from masks

    try:
        label_dict = load_label_dict(config.label_dict)
    except InputError as e:  # anatomy mode reports it with the anatomy names
        return [] if config.from_anatomy else [f"$.label_dict: {e}"]
    lesions = config.anatomy.lesions if config.anatomy is not None else ()
    try:
        tumour_hosts(label_dict, lesion_hosts(lesions, label_dict))  # a lesion's host is its class's rule
    except InputError as e:
        return [f"$.label_dict: {e} (guidance from a mask replaces every tumour by its host)"]
    return []


def guidance_warnings(config: InferConfig, preset: Preset) -> list[str]:
    """What a run with guidance should be told once: the file cannot say if the UNet suits guidance."""
    scale = config.sampling.guidance_scale
    if scale <= 0 or not preset.uses_modality:
        return []
    out = [
        f"$.sampling.guidance_scale {scale:g}: classifier-free guidance needs a UNet trained with modality "
        "dropout (MAISI v2's MR UNets were: defaults rflow-mr 15, rflow-mr-brain 2; rflow-ct ships with 0); "
        "a checkpoint cannot tell whether it was, so compare with guidance 0"
    ]
    if config.modality == "unknown" and not (config.from_mask or config.from_anatomy):
        out.append(
            "$.modality 'unknown' is the unconditional code itself: both halves of the guided batch are the "
            "same, so image-only guidance changes nothing and doubles the cost"
        )
    return out


def _anatomy_name_problems(config: InferConfig) -> list[str]:
    """The anatomy request's names against the label dictionary (a file: checked here, not in the config)."""
    from maisi.labels import load_label_dict
    from maisi.masks.request import anatomy_problems

    try:
        label_dict = load_label_dict(config.label_dict)
    except InputError as e:
        return [f"$.label_dict: {e}"]
    assert config.anatomy is not None
    return anatomy_problems(config.anatomy, label_dict)


def evaluate_problems(config: EvaluateConfig) -> list[str]:
    """The reconstruction's preset exists."""
    if not config.reconstruction.enabled:
        return []
    return _preset(config.reconstruction.preset, "$.reconstruction.preset")[1]


def _mask_preset(name: str, key: str) -> tuple[MaskPreset | None, list[str]]:
    try:
        return get_mask_preset(name), []
    except InputError as e:
        return None, [f"{key}: {e}"]


def _vae_factor(name: str, mask: bool) -> tuple[int | None, list[str]]:
    """VAE factor of the CT preset (or, ``mask``, the mask preset) named ``$.preset``."""
    preset, problems = _mask_preset(name, "$.preset") if mask else _preset(name, "$.preset")
    if preset is None and mask and name in PRESETS:
        problems = [
            f"$.preset: '{name}' is a CT preset; kind 'mask' needs a mask preset ({', '.join(MASK_PRESETS)})"
        ]
    return (preset.vae_factor if preset else None), problems


def encode_problems(config: EncodeConfig) -> list[str]:
    """Padding and sliding-window tiles in whole latent voxels of the preset's VAE (the mask VAE's for kind
    'mask')."""
    f, problems = _vae_factor(config.preset, config.kind == "mask")
    if f is None:
        return problems
    if config.pad_to_multiple is not None and config.pad_to_multiple % f:
        problems.append(
            f"$.pad_to_multiple: {config.pad_to_multiple} is not a multiple of the VAE factor {f}"
        )
    if config.tiling.method == "sliding_window" and any(r % f for r in config.tiling.roi_size):
        problems.append(
            f"$.tiling.roi_size: {list(config.tiling.roi_size)} must be multiples of the VAE factor {f}"
        )
    return problems


def modality_dropout_problems(config: TrainConfig, preset: Preset) -> list[str]:
    """A nonzero modality dropout rate for a preset without modality input (DDPM: no class embedding)."""
    if preset.uses_modality:
        return []
    dropout = config.diffusion.modality_dropout
    rates = {"parent_rate": dropout.parent_rate, "unconditional_rate": dropout.unconditional_rate}
    return [
        f"$.diffusion.modality_dropout.{key}: {value:g}, but preset '{preset.name}' has no modality input "
        "(no class embedding), so there is no modality to drop; set it to 0 or null"
        for key, value in rates.items()
        if value
    ]


def train_problems(config: TrainConfig) -> list[str]:
    """VAE patches and validation windows in whole latent voxels of the preset's VAE; modality dropout only
    where the preset takes a modality.

    The stage is chosen on the command line, so ``$.preset`` may name a CT preset or a mask preset here;
    :func:`maisi.training.run.check_stage_preset` refuses the wrong kind for the stage.
    """
    if config.preset in LDM_PRESETS:
        return ldm_train_problems(config, LDM_PRESETS[config.preset])
    mask = config.preset in MASK_PRESETS
    f, problems = _vae_factor(config.preset, mask)
    if f is None:
        return problems
    if not mask:
        problems += modality_dropout_problems(config, get_preset(config.preset))
    section = "mask_autoencoder" if mask else "autoencoder"
    for key in ("patch_size", "val_roi_size"):
        value = list(getattr(getattr(config, section), key))
        if any(s % f for s in value):
            problems.append(f"$.{section}.{key}: {value} must be multiples of {f}")
    return problems


def ldm_train_problems(config: TrainConfig, preset: LDMPreset) -> list[str]:
    """A plain-LDM preset's training inputs: no text presets yet (they need captions), crops of the preset's
    dimensionality in whole latent voxels, percentiles in order."""
    problems = []
    if preset.takes_prompts:
        problems.append(
            f"$.preset: '{preset.name}' is a text-conditioned LDM preset; maisi.train trains the "
            "unconditional plain-LDM presets only (training on captions is not available yet)"
        )
    ldm, f, dims = config.ldm, preset.vae_factor, preset.spatial_dims
    patch = ldm.autoencoder_patch
    if patch is not None:
        shape = "(x, y) axial slices" if dims == 2 else "(x, y, z) patches"
        if len(patch) != dims:
            problems.append(
                f"$.ldm.autoencoder_patch: {list(patch)} has {len(patch)} values; preset '{preset.name}' is "
                f"{dims}D and trains on {shape}"
            )
        elif any(s % f for s in patch):
            problems.append(
                f"$.ldm.autoencoder_patch: {list(patch)} must be multiples of the autoencoder's factor {f} "
                f"(preset '{preset.name}')"
            )
    if ldm.percentiles is not None and ldm.percentiles[0] >= ldm.percentiles[1]:
        problems.append(f"$.ldm.percentiles: {list(ldm.percentiles)}: the lower must be below the upper")
    return problems


CHECKS: dict[str, Callable[[Any], list[str]]] = {
    "infer": infer_problems,
    "encode": encode_problems,
    "train": train_problems,
    "evaluate": evaluate_problems,
}


def _foreign_key_check(path: str | Path) -> Callable[[InferConfig], list[str]]:
    """The check of the keys an inference file gives (as written, before defaults) against its preset's
    family: each key the family does not take, by name (:func:`maisi.families.registry.foreign_keys`); and
    a ``$.text_encoder.path`` that names a hub id (paths are absolute after loading)."""
    try:
        raw = read_json(path)
    except InputError:  # the loader reports an unreadable file itself
        raw = {}
    given = config_keys(raw)

    def check(config: InferConfig) -> list[str]:
        try:
            keys, problems = foreign_keys(config.preset, given), foreign_key_problems(config.preset, given)
        except InputError:  # an unknown preset: named by the preset checks
            return []
        if not keys:  # a text encoder path as written: a hub id is refused by name
            return hub_id_problems(raw, Path(path).resolve().parent)
        return [f"$.{key}: {problem}" for key, problem in zip(keys, problems)]

    return check


def load_checked_config(path: str | Path, kind: str) -> Any:
    """:func:`maisi.config.load_config` plus the preset checks of ``kind``, all problems reported at once.

    An inference config is also checked for keys its preset's family does not take (exit 2, by name)."""
    check = CHECKS.get(kind)
    checks: list[Callable[[Any], list[str]]] = [check] if check else []
    if kind == "infer":
        checks.insert(0, _foreign_key_check(path))
    return load_config(path, kind, checks=checks)
