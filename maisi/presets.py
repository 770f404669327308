"""Network presets as plain data: the architectures, noise schedule and grid limits of each named family.

A preset fixes everything that shapes the weights of the three networks (autoencoder, diffusion UNet,
ControlNet) plus the noise schedule the UNet was trained with. This module imports neither torch nor MONAI,
so configs and ``--help`` can use it; :mod:`maisi.networks` builds the MONAI networks from it.

The ``maisi-ct-*`` presets use exactly the arguments of the released MAISI CT models (MONAI model-zoo bundle
``maisi_ct_generative`` and NV-Generate-CTMR ``configs/config_network_*.json``), so the released weights load
with ``strict=True``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from maisi.errors import InputError
from maisi.options import Sampler

Part = Literal["autoencoder", "diffusion_unet", "controlnet"]
PARTS: tuple[Part, ...] = ("autoencoder", "diffusion_unet", "controlnet")


@dataclass(frozen=True)
class NoiseSchedule:
    """How the diffusion UNet was trained: DDPM (epsilon prediction) or rectified flow (velocity)."""

    kind: Literal["ddpm", "rflow"]
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear_beta"  # ddpm only
    beta_start: float = 0.0015  # ddpm only
    beta_end: float = 0.0195  # ddpm only


@dataclass(frozen=True)
class GridLimits:
    """Output grids a preset was trained for (MAISI's published limits for the released CT models)."""

    xy_sizes: tuple[int, ...]
    z_sizes: tuple[int, ...]
    xy_spacing_mm: tuple[float, float]
    z_spacing_mm: tuple[float, float]
    min_xy_fov_mm: float

    def violations(self, size: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[str]:
        """Human-readable reasons why ``size``/``spacing`` lie outside the limits (empty when inside)."""
        out = []
        if size[0] != size[1]:
            out.append(f"size x ({size[0]}) must equal size y ({size[1]})")
        if size[0] not in self.xy_sizes:
            out.append(f"size x/y {size[0]} is not one of {list(self.xy_sizes)}")
        if size[2] not in self.z_sizes:
            out.append(f"size z {size[2]} is not one of {list(self.z_sizes)}")
        if abs(spacing[0] - spacing[1]) > 1e-3:
            out.append(f"spacing x ({spacing[0]:g} mm) must equal spacing y ({spacing[1]:g} mm)")
        lo, hi = self.xy_spacing_mm
        if not lo <= spacing[0] <= hi:
            out.append(f"spacing x/y {spacing[0]:g} mm is outside [{lo:g}, {hi:g}] mm")
        lo, hi = self.z_spacing_mm
        if not lo <= spacing[2] <= hi:
            out.append(f"spacing z {spacing[2]:g} mm is outside [{lo:g}, {hi:g}] mm")
        fov = min(size[0] * spacing[0], size[1] * spacing[1])
        if fov < self.min_xy_fov_mm:
            out.append(f"field of view in x/y {fov:g} mm is under {self.min_xy_fov_mm:g} mm")
        return out


@dataclass(frozen=True)
class Preset:
    """A named family of the three networks and their noise schedule."""

    name: str
    description: str
    autoencoder: dict[str, Any]
    diffusion_unet: dict[str, Any]
    controlnet: dict[str, Any]
    schedule: NoiseSchedule
    limits: GridLimits | None = None
    default_num_splits: int = field(default=1)  # VAE tensor splits (memory only)

    def network_kwargs(self, part: Part) -> dict[str, Any]:
        """Constructor arguments that determine the weights of ``part`` (a copy)."""
        return dict(getattr(self, part))

    @property
    def vae_factor(self) -> int:
        """Down-sampling factor of the autoencoder per axis (4 for MAISI)."""
        return 2 ** (len(self.autoencoder["num_channels"]) - 1)

    @property
    def spatial_multiple(self) -> int:
        """Image sizes must be multiples of this: VAE factor times the UNet's own down-sampling."""
        return self.vae_factor * 2 ** (len(self.diffusion_unet["num_channels"]) - 1)

    @property
    def uses_body_region(self) -> bool:
        return bool(self.diffusion_unet.get("include_top_region_index_input", False))

    @property
    def uses_spacing(self) -> bool:
        return bool(self.diffusion_unet.get("include_spacing_input", False))

    @property
    def uses_modality(self) -> bool:
        return self.diffusion_unet.get("num_class_embeds") is not None

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder["latent_channels"])


_MAISI_VAE = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    latent_channels=4,
    num_channels=[64, 128, 256],
    num_res_blocks=[2, 2, 2],
    norm_num_groups=32,
    norm_eps=1e-6,
    attention_levels=[False, False, False],
    with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False,
    use_convtranspose=False,
)
_MAISI_TRUNK = dict(
    spatial_dims=3,
    in_channels=4,
    num_channels=[64, 128, 256, 512],
    attention_levels=[False, False, True, True],
    num_head_channels=[0, 0, 32, 32],
    num_res_blocks=2,
)
_MAISI_CONTROL = dict(conditioning_embedding_in_channels=8, conditioning_embedding_num_channels=[8, 32, 64])
_RFLOW_EXTRAS = dict(num_class_embeds=128, resblock_updown=True, include_fc=True)
_MAISI_LIMITS = GridLimits(
    xy_sizes=(256, 384, 512),
    z_sizes=(128, 256, 384, 512, 640, 768),
    xy_spacing_mm=(0.5, 3.0),
    z_spacing_mm=(0.5, 5.0),
    min_xy_fov_mm=256.0,
)

# Tiny networks: CPU tests in seconds. Small: CPU demos.
_TINY_VAE = dict(_MAISI_VAE, num_channels=[8, 16, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4)
_TINY_TRUNK = dict(
    _MAISI_TRUNK,
    num_channels=[16, 32, 32],
    attention_levels=[False, False, True],
    num_head_channels=[0, 0, 8],
    num_res_blocks=1,
    norm_num_groups=8,
)
_TINY_CONTROL = dict(conditioning_embedding_in_channels=8, conditioning_embedding_num_channels=[8, 16, 16])
_SMALL_VAE = dict(_MAISI_VAE, num_channels=[32, 64, 64], num_res_blocks=[1, 1, 1], norm_num_groups=16)
_SMALL_TRUNK = dict(
    _MAISI_TRUNK,
    num_channels=[32, 64, 128, 128],
    num_res_blocks=1,
    norm_num_groups=16,
)


def _family(trunk: dict, control: dict, kind: Literal["ddpm", "rflow"]) -> dict[str, dict]:
    """UNet and ControlNet kwargs sharing one trunk, with MAISI's ddpm or rflow conditioning."""
    if kind == "ddpm":
        unet = dict(
            trunk,
            out_channels=trunk["in_channels"],
            include_spacing_input=True,
            include_top_region_index_input=True,
            include_bottom_region_index_input=True,
        )
        return {"diffusion_unet": unet, "controlnet": dict(trunk, **control)}
    unet = dict(trunk, out_channels=trunk["in_channels"], include_spacing_input=True, **_RFLOW_EXTRAS)
    return {"diffusion_unet": unet, "controlnet": dict(trunk, **control, **_RFLOW_EXTRAS)}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "maisi-ct-ddpm",
            "Released MAISI CT v1 (DDPM, body-region conditioning)",
            autoencoder=_MAISI_VAE,
            **_family(_MAISI_TRUNK, _MAISI_CONTROL, "ddpm"),
            schedule=NoiseSchedule("ddpm"),
            limits=_MAISI_LIMITS,
            default_num_splits=8,
        ),
        Preset(
            "maisi-ct-rflow",
            "Released MAISI CT v2 (rectified flow, modality conditioning)",
            autoencoder=_MAISI_VAE,
            **_family(_MAISI_TRUNK, _MAISI_CONTROL, "rflow"),
            schedule=NoiseSchedule("rflow"),
            limits=_MAISI_LIMITS,
            default_num_splits=4,
        ),
        Preset(
            "tiny-ddpm",
            "Tiny networks for CPU tests (DDPM)",
            autoencoder=_TINY_VAE,
            **_family(_TINY_TRUNK, _TINY_CONTROL, "ddpm"),
            schedule=NoiseSchedule("ddpm"),
        ),
        Preset(
            "tiny-rflow",
            "Tiny networks for CPU tests (rectified flow)",
            autoencoder=_TINY_VAE,
            **_family(_TINY_TRUNK, _TINY_CONTROL, "rflow"),
            schedule=NoiseSchedule("rflow"),
        ),
        Preset(
            "small-rflow",
            "Small networks for CPU demos (rectified flow)",
            autoencoder=_SMALL_VAE,
            **_family(_SMALL_TRUNK, _MAISI_CONTROL, "rflow"),
            schedule=NoiseSchedule("rflow"),
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; an unknown name raises InputError with the closest known names."""
    try:
        return PRESETS[name]
    except KeyError:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise InputError(
            f"unknown preset '{name}'.{suggestion} Known presets: {', '.join(PRESETS)}"
        ) from None


def grid_problems(
    preset: Preset, shape: tuple[int, int, int], spacing: tuple[float, float, float], enforce_limits: bool
) -> list[str]:
    """Why a generation grid does not suit ``preset`` (empty when it does): the one check of output grids.

    Sizes must be multiples of the preset's :attr:`Preset.spatial_multiple`; with ``enforce_limits``, the
    released presets' published size, spacing and field-of-view limits apply as well.
    """
    problems = []
    m = preset.spatial_multiple
    if any(s % m for s in shape):
        target = [-(-s // m) * m for s in shape]
        problems.append(
            f"size {list(shape)} is not a multiple of {m} per axis, as preset '{preset.name}' needs "
            f"(e.g. pad to {target})"
        )
    if enforce_limits and preset.limits:
        for reason in preset.limits.violations(shape, tuple(round(s, 4) for s in spacing)):
            problems.append(
                f"{reason} (preset '{preset.name}' limits; $.enforce_preset_limits false relaxes them)"
            )
    return problems


COMPATIBLE_SAMPLERS: dict[str, tuple[Sampler, ...]] = {"ddpm": ("ddpm", "ddim"), "rflow": ("rflow",)}


def check_sampler(schedule: NoiseSchedule, sampler: Sampler, num_steps: int) -> list[str]:
    """Why ``sampler`` with ``num_steps`` cannot sample a UNet trained on ``schedule`` (empty if it can)."""
    problems = []
    if sampler not in COMPATIBLE_SAMPLERS[schedule.kind]:
        problems.append(
            f"sampler '{sampler}' cannot sample a {schedule.kind}-trained UNet; "
            f"use one of {list(COMPATIBLE_SAMPLERS[schedule.kind])}"
        )
    if num_steps > schedule.num_train_timesteps:
        problems.append(
            f"{num_steps} inference steps exceed the {schedule.num_train_timesteps} training timesteps"
        )
    return problems
