"""Build the networks of a preset (:mod:`maisi.families.ct`) from MONAI classes.

Options that only trade memory or speed
(flash attention, float16 normalisation, tensor splits, gradient checkpointing) are *runtime* options,
picked from the device when the networks are built, so a checkpoint never depends on the machine.

The ``maisi-ct-*`` presets use exactly the arguments of the released MAISI CT models, so the released
weights load with ``strict=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

from maisi.families.ct import Part, Preset

__all__ = ["RuntimeOptions", "architecture_of", "build_network", "count_parameters"]

NETWORK_CLASSES: dict[str, type[torch.nn.Module]] = {
    "autoencoder": AutoencoderKlMaisi,
    "diffusion_unet": DiffusionModelUNetMaisi,
    "controlnet": ControlNetMaisi,
}

# Constructor arguments that change memory use or speed but not a single weight.
RUNTIME_KEYS = frozenset(
    {
        "use_flash_attention",
        "norm_float16",
        "num_splits",
        "dim_split",
        "use_checkpointing",
        "save_mem",
        "print_info",
    }
)


@dataclass(frozen=True)
class RuntimeOptions:
    """Memory/speed options chosen from the device at build time; never change the weights."""

    use_flash_attention: bool = False
    norm_float16: bool = False
    use_checkpointing: bool = False

    @classmethod
    def for_device(cls, device: torch.device) -> RuntimeOptions:
        """Flash attention and float16 normalisation on CUDA only (they raise or crawl on CPU)."""
        on_cuda = device.type == "cuda"
        return cls(use_flash_attention=on_cuda, norm_float16=on_cuda)


def build_network(preset: Preset, part: Part, runtime: RuntimeOptions | None = None) -> torch.nn.Module:
    """Build one network of a preset with the runtime options applied.

    Args:
        preset: the preset.
        part: ``"autoencoder"``, ``"diffusion_unet"`` or ``"controlnet"``.
        runtime: memory/speed options; default: everything off (CPU-safe).
    """
    runtime = runtime or RuntimeOptions()
    kwargs = preset.network_kwargs(part)
    if part == "autoencoder":
        kwargs.update(
            norm_float16=runtime.norm_float16,
            use_checkpointing=runtime.use_checkpointing,
            use_flash_attention=runtime.use_flash_attention,
            num_splits=preset.default_num_splits,
            dim_split=1,
        )
    else:
        kwargs.update(use_flash_attention=runtime.use_flash_attention)
        if part == "controlnet":
            kwargs.update(use_checkpointing=runtime.use_checkpointing)
    return NETWORK_CLASSES[part](**kwargs)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def architecture_of(preset: Preset, part: Part) -> dict[str, Any]:
    """Weight-determining arguments of ``part``, as stored in our checkpoints (JSON-friendly)."""
    return {k: v for k, v in preset.network_kwargs(part).items() if k not in RUNTIME_KEYS}
