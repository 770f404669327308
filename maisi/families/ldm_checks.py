"""Checks of an inference config that names a plain LDM preset (:mod:`maisi.families.ldm`).

Torch-free, like the other preset checks (:mod:`maisi.families.checks`): the keys a config may give are
checked by name against the preset's family (:func:`maisi.families.registry.foreign_key_problems`), and what
those keys say against the preset here. Each message starts with the JSON path it concerns.
"""

from __future__ import annotations

from maisi.config import InferConfig
from maisi.families.ct import check_sampler
from maisi.families.ldm import LDM_PRESETS, LDMPreset

PNG = "png"


def unconditional_presets() -> list[str]:
    """The LDM presets ``maisi.infer`` runs: those whose UNet takes no text context."""
    return [name for name, p in LDM_PRESETS.items() if not p.takes_prompts]


def ldm_infer_problems(config: InferConfig) -> list[str]:
    """What an LDM inference config asks that its preset cannot do.

    Refused: a text preset (prompts are not taken yet), a sampler or step count the preset's schedule cannot
    run, guidance without a condition to guide on, and PNG output of 3D volumes.
    """
    preset: LDMPreset = LDM_PRESETS[config.preset]
    if preset.takes_prompts:
        return [
            f"$.preset: '{preset.name}' is a text-conditioned LDM (its UNet cross-attends to a prompt "
            "embedding); maisi.infer does not take prompts yet, so it runs the unconditional LDM presets "
            f"only ({', '.join(unconditional_presets())})"
        ]
    problems = [
        f"$.sampling: {reason}"
        for reason in check_sampler(preset.schedule, config.sampler, config.num_inference_steps)
    ]
    scale = config.sampling.guidance_scale
    if scale > 0:
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


def png_for_maisi_problem(config: InferConfig) -> list[str]:
    """A MAISI preset asked for PNG output (its samples are CT/MR volumes)."""
    if config.output.format != PNG:
        return []
    return [
        f"$.output.format: 'png' is for 2D LDM presets; preset '{config.preset}' makes volumes: use nii.gz, "
        "nii, nrrd or mha (output.preview adds a PNG of three mid-slices)"
    ]
