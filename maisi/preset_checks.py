"""Checks of a loaded config against the preset it names: one function per config kind.

The config layer (:mod:`maisi.config`) checks what a file says on its own; these checks need the preset
registry (:mod:`maisi.presets`, plain data). Every CLI loads its config through :func:`load_checked_config`,
so both kinds of problem are reported together, each with its JSON path, before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from maisi.config import EncodeConfig, EvaluateConfig, InferConfig, TrainConfig, load_config
from maisi.errors import InputError
from maisi.mask_presets import MASK_PRESETS, MaskPreset, get_mask_preset
from maisi.presets import PRESETS, Preset, check_sampler, get_preset, grid_problems


def _preset(name: str, key: str) -> tuple[Preset | None, list[str]]:
    try:
        return get_preset(name), []
    except InputError as e:
        return None, [f"{key}: {e}"]


def infer_problems(config: InferConfig) -> list[str]:
    """Grid, body region, sampler and (anatomy mode) the requested names of an infer config."""
    preset, problems = _preset(config.preset, "$.preset")
    if preset is None:
        return problems
    if not config.from_mask and not config.from_anatomy:
        if preset.uses_body_region and config.body_region is None:
            problems.append(
                f"$.body_region: required in image-only mode: preset '{preset.name}' is conditioned on "
                "body region"
            )
    if config.output_size is not None:
        # In mask mode without a spacing the mask's own spacing applies: only the size can be judged here.
        spacing = config.spacing or (1.0, 1.0, 1.0)
        enforce = config.enforce_preset_limits and config.spacing is not None
        for reason in grid_problems(preset, config.output_size, spacing, enforce):
            problems.append(f"$.output_size/$.spacing: {reason}")
    for reason in check_sampler(preset.schedule, config.sampler, config.num_inference_steps):
        problems.append(f"$.sampling: {reason}")
    if config.from_anatomy:
        problems += _anatomy_name_problems(config)
    return problems


def _anatomy_name_problems(config: InferConfig) -> list[str]:
    """The anatomy request's names against the label dictionary (a file: checked here, not in the config)."""
    from maisi.labels import load_label_dict
    from maisi.masks.anatomy import anatomy_problems  # imports torch (the databases): anatomy mode only

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


def train_problems(config: TrainConfig) -> list[str]:
    """VAE patches and validation windows in whole latent voxels of the preset's VAE.

    The stage is chosen on the command line, so ``$.preset`` may name a CT preset or a mask preset here;
    :func:`maisi.training.run.check_stage_preset` refuses the wrong kind for the stage.
    """
    mask = config.preset in MASK_PRESETS
    f, problems = _vae_factor(config.preset, mask)
    if f is None:
        return problems
    section = "mask_autoencoder" if mask else "autoencoder"
    for key in ("patch_size", "val_roi_size"):
        value = list(getattr(getattr(config, section), key))
        if any(s % f for s in value):
            problems.append(f"$.{section}.{key}: {value} must be multiples of {f}")
    return problems


CHECKS: dict[str, Callable[[Any], list[str]]] = {
    "infer": infer_problems,
    "encode": encode_problems,
    "train": train_problems,
    "evaluate": evaluate_problems,
}


def load_checked_config(path: str | Path, kind: str) -> Any:
    """:func:`maisi.config.load_config` plus the preset checks of ``kind``, all problems reported at once."""
    check = CHECKS.get(kind)
    return load_config(path, kind, checks=(check,) if check else ())
