"""Checks of an inference config that names a plain LDM preset (:mod:`maisi.families.ldm`).

Torch-free, like the other preset checks (:mod:`maisi.families.checks`): the keys a config may give are
checked by name against the preset's family (:func:`maisi.families.registry.foreign_key_problems`), and what
those keys say against the preset here. Each message starts with the JSON path it concerns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from maisi.config import InferConfig
from maisi.families.ct import check_sampler
from maisi.families.ldm import LDM_PRESETS, LDMPreset

PNG = "png"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as maisi.text.encoder recognises it


def ldm_infer_problems(config: InferConfig) -> list[str]:
    """What an LDM inference config asks that its preset cannot do.

    Refused: a text preset without prompts or a text encoder (:func:`text_problems`), a sampler or step
    count the preset's schedule cannot run, guidance without a condition to guide on, and PNG output of 3D
    volumes.
    """
    preset: LDMPreset = LDM_PRESETS[config.preset]
    problems = text_problems(config, preset) if preset.takes_prompts else []
    problems += [
        f"$.sampling: {reason}"
        for reason in check_sampler(preset.schedule, config.sampler, config.num_inference_steps)
    ]
    scale = config.sampling.guidance_scale
    if scale > 0 and not preset.takes_prompts:
        problems.append(
            f"$.sampling.guidance_scale: {scale:g}: preset '{preset.name}' is unconditional (no prompt, no "
            "class), so there is no condition to guide on; set it to 0"
        )
    if config.output.format == PNG and preset.spatial_dims != 2:
        problems.append(
            f"$.output.format: 'png' is for 2D presets; preset '{preset.name}' makes {preset.spatial_dims}D "
            "volumes: use nii.gz, nii, nrrd or mha (output.preview adds a PNG of three mid-slices)"
        )
    return problems


def text_problems(config: InferConfig, preset: LDMPreset) -> list[str]:
    """A text preset's prompts and text encoder: both required, at least one prompt, exactly one source."""
    problems = []
    if config.prompts is None:
        problems.append(
            f"$.prompts: required by preset '{preset.name}' (a text-conditioned LDM: one sample per prompt "
            'x seed), e.g. "prompts": ["Small right pleural effusion"]'
        )
    elif not config.prompts:
        problems.append("$.prompts: an empty list: give at least one prompt (one sample per prompt x seed)")
    encoder = config.text_encoder
    if encoder is None:
        problems.append(
            f"$.text_encoder: required by preset '{preset.name}': {{\"path\": a local CLIPTextModel folder}} "
            f'or {{"checkpoint": a tiny text encoder record}} of width {preset.context_width}'
        )
    elif (encoder.path is None) == (encoder.checkpoint is None):
        problems.append("$.text_encoder: give exactly one of path (a CLIPTextModel folder) and checkpoint")
    return problems


def hub_id_problems(raw: Any, config_dir: Path) -> list[str]:
    """``$.text_encoder.path`` as written that names a Hugging Face Hub id rather than a local folder (the
    loader makes paths absolute, so this looks at the file's text)."""
    encoder = raw.get("text_encoder") if isinstance(raw, dict) else None
    value = encoder.get("path") if isinstance(encoder, dict) else None
    if not isinstance(value, str) or not _HUB_ID.match(value) or (config_dir / value).exists():
        return []
    return [
        f"$.text_encoder.path: {value!r} looks like a Hugging Face Hub id: only local folders are loaded "
        "(local_files_only): stabilityai/stable-diffusion-2-1 left the Hub in November 2025, so point it at "
        "the text_encoder/ folder of a copy you have"
    ]


def png_for_maisi_problem(config: InferConfig) -> list[str]:
    """A MAISI preset asked for PNG output (its samples are CT/MR volumes)."""
    if config.output.format != PNG:
        return []
    return [
        f"$.output.format: 'png' is for 2D LDM presets; preset '{config.preset}' makes volumes: use nii.gz, "
        "nii, nrrd or mha (output.preview adds a PNG of three mid-slices)"
    ]
