"""Network presets as plain data: the architectures, noise schedule and grid limits of each named family.

A preset fixes everything that shapes the weights of the three networks (autoencoder, diffusion UNet,
ControlNet) plus the noise schedule the UNet was trained with. This module imports neither torch nor MONAI,
so configs and ``--help`` can use it; :mod:`maisi.families.networks` builds the MONAI networks from it.

The ``maisi-ct-*`` presets use exactly the arguments of the released MAISI CT models (MONAI model-zoo bundle
``maisi_ct_generative`` and NV-Generate-CTMR ``configs/config_network_*.json``), so the released weights load
with ``strict=True``. The ``maisi-mr-*`` presets are NV-Generate-CTMR's ``rflow-mr`` and ``rflow-mr-brain``
variants: every variant of that repository builds its networks from the one ``config_network_rflow.json``
(its README's "Network Detail" row; ``environment_rflow-mr.json`` and
``environment_maisi_diff_model_rflow-mr*.json`` only name the files), so ``autoencoder_v2.pt`` has the
architecture of ``autoencoder_v1.pt`` and the MR UNets that of the CT rflow UNet. No MR ControlNet was
released (``trained_controlnet_path: null``): those presets have no ``controlnet`` part.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from maisi.errors import InputError
from maisi.options import Sampler

T = TypeVar("T")

Part = Literal["autoencoder", "diffusion_unet", "controlnet"]
PARTS: tuple[Part, ...] = ("autoencoder", "diffusion_unet", "controlnet")
ModalityFamily = Literal["ct", "mr"]
PredictionType = Literal["epsilon", "v_prediction"]  # what a DDPM-trained UNet outputs (MONAI's names)


@dataclass(frozen=True)
class NoiseSchedule:
    """How the diffusion UNet was trained: DDPM (predicting the noise epsilon, or
    v = sqrt(abar) eps - sqrt(1 - abar) x0) or rectified flow (predicting the velocity x0 - noise)."""

    kind: Literal["ddpm", "rflow"]
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear_beta"  # ddpm only
    beta_start: float = 0.0015  # ddpm only
    beta_end: float = 0.0195  # ddpm only
    prediction_type: PredictionType = "epsilon"  # ddpm only

    def __post_init__(self) -> None:
        if self.prediction_type not in get_args(PredictionType):
            choices = list(get_args(PredictionType))
            raise ValueError(f"prediction_type must be one of {choices}, got {self.prediction_type!r}")
        if self.kind == "rflow" and self.prediction_type != "epsilon":
            raise ValueError(
                f"prediction_type {self.prediction_type!r}: a rectified-flow UNet predicts the velocity; "
                "leave prediction_type at its default"
            )


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
class MRGridLimits:
    """Output grids of the released MR presets: MAISI's ``check_input_mr`` (NV-Generate-CTMR
    ``scripts/sample_mask.py``) plus the variant's published maximum volume (its README's "Max Volume").

    Sizes: at least two equal; z = 128 needs x = y in ``z128_xy_sizes``; z = 256 needs one of
    ``z256_shapes``; no other z. Every spacing in ``spacing_mm``. MAISI puts no field-of-view floor on MR.
    """

    z128_xy_sizes: tuple[int, ...] = (128, 256, 384, 512)
    z256_shapes: tuple[tuple[int, int, int], ...] = ((128, 256, 256), (256, 128, 256), (256, 256, 256))
    spacing_mm: tuple[float, float] = (0.4, 5.0)
    max_size: tuple[int, int, int] = (512, 512, 128)  # compared as a voxel count (MAISI's "Max Volume")

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every size the limits allow, smallest volume first."""
        shapes = [(s, s, 128) for s in self.z128_xy_sizes] + list(self.z256_shapes)
        cap = self.max_size[0] * self.max_size[1] * self.max_size[2]
        return sorted((s for s in shapes if s[0] * s[1] * s[2] <= cap), key=lambda s: (s[0] * s[1] * s[2], s))

    def violations(self, size: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[str]:
        """Human-readable reasons why ``size``/``spacing`` lie outside the limits (empty when inside)."""
        out = []
        x, y, z = size
        if x != y and x != z and y != z:
            out.append(f"at least two of the sizes {list(size)} must be equal")
        if z == 128:
            if x != y or x not in self.z128_xy_sizes:
                out.append(
                    f"with size z 128, sizes x and y must be equal and one of {list(self.z128_xy_sizes)}"
                )
        elif z == 256:
            if tuple(size) not in self.z256_shapes:
                out.append(f"with size z 256 the size must be one of {[list(s) for s in self.z256_shapes]}")
        else:
            out.append(f"size z {z} is not one of [128, 256]")
        cap = self.max_size[0] * self.max_size[1] * self.max_size[2]
        if x * y * z > cap:
            shown = "x".join(map(str, self.max_size))
            out.append(f"size {list(size)} has more voxels than the maximum volume {shown}")
        lo, hi = self.spacing_mm
        bad = [f"{s:g}" for s in spacing if not lo <= s <= hi]
        if bad:
            out.append(f"spacing {', '.join(bad)} mm is outside [{lo:g}, {hi:g}] mm")
        return out


@dataclass(frozen=True)
class Preset:
    """A named family of the three networks and their noise schedule."""

    name: str
    description: str
    autoencoder: dict[str, Any]
    diffusion_unet: dict[str, Any]
    controlnet: dict[str, Any] | None  # None: no ControlNet exists (image-only generation)
    schedule: NoiseSchedule
    limits: GridLimits | MRGridLimits | None = None
    default_num_splits: int = field(default=1)  # VAE tensor splits (memory only)
    modality_family: ModalityFamily = "ct"  # which images the networks were trained on

    @property
    def parts(self) -> tuple[Part, ...]:
        """The parts this preset has (every one but, for the MR presets, the ControlNet)."""
        return tuple(p for p in PARTS if getattr(self, p) is not None)

    @property
    def has_controlnet(self) -> bool:
        """Whether generation from a mask is possible (MAISI released no MR ControlNet)."""
        return self.controlnet is not None

    def network_kwargs(self, part: Part) -> dict[str, Any]:
        """Constructor arguments that determine the weights of ``part`` (a copy).

        Raises:
            InputError: the preset has no such part (the MR presets have no ControlNet).
        """
        kwargs = getattr(self, part)
        if kwargs is None:
            raise InputError(
                f"preset '{self.name}' has no {part} (it generates image-only); "
                f"its parts are {', '.join(self.parts)}"
            )
        return dict(kwargs)

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


# AutoencoderKlMaisi's arguments for MAISI's CT VAE; the mask VAE (maisi.families.mask) is the same network
# with other channels.
MAISI_VAE = dict(
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

# check_input_mr with each variant's "Max Volume" (NV-Generate-CTMR README): under check_input_mr's shapes
# neither maximum binds (512x512x128 is the largest shape it allows); they are kept as published.
_MR_LIMITS = MRGridLimits(max_size=(512, 512, 128))
_MR_BRAIN_LIMITS = MRGridLimits(max_size=(512, 512, 256))

# Tiny networks: CPU tests in seconds. Small: CPU demos.
_TINY_VAE = dict(MAISI_VAE, num_channels=[8, 16, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4)
_TINY_TRUNK = dict(
    _MAISI_TRUNK,
    num_channels=[16, 32, 32],
    attention_levels=[False, False, True],
    num_head_channels=[0, 0, 8],
    num_res_blocks=1,
    norm_num_groups=8,
)
_TINY_CONTROL = dict(conditioning_embedding_in_channels=8, conditioning_embedding_num_channels=[8, 16, 16])
_SMALL_VAE = dict(MAISI_VAE, num_channels=[32, 64, 64], num_res_blocks=[1, 1, 1], norm_num_groups=16)
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


_MAISI_RFLOW = _family(_MAISI_TRUNK, _MAISI_CONTROL, "rflow")  # CT v2; the MR UNets are the same networks

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "maisi-ct-ddpm",
            "Released MAISI CT v1 (DDPM, body-region conditioning)",
            autoencoder=MAISI_VAE,
            **_family(_MAISI_TRUNK, _MAISI_CONTROL, "ddpm"),
            schedule=NoiseSchedule("ddpm"),
            limits=_MAISI_LIMITS,
            default_num_splits=8,
        ),
        Preset(
            "maisi-ct-rflow",
            "Released MAISI CT v2 (rectified flow, modality conditioning)",
            autoencoder=MAISI_VAE,
            **_MAISI_RFLOW,
            schedule=NoiseSchedule("rflow"),
            limits=_MAISI_LIMITS,
            default_num_splits=4,
        ),
        Preset(
            "maisi-mr-rflow",
            "Released MAISI MR v2 (NV-Generate-MR rflow-mr: autoencoder_v2, image-only)",
            autoencoder=MAISI_VAE,
            diffusion_unet=_MAISI_RFLOW["diffusion_unet"],
            controlnet=None,
            schedule=NoiseSchedule("rflow"),
            limits=_MR_LIMITS,
            default_num_splits=4,
            modality_family="mr",
        ),
        Preset(
            "maisi-mr-brain-rflow",
            "Released MAISI MR brain (NV-Generate-MR-Brain rflow-mr-brain: autoencoder_v1, image-only)",
            autoencoder=MAISI_VAE,
            diffusion_unet=_MAISI_RFLOW["diffusion_unet"],
            controlnet=None,
            schedule=NoiseSchedule("rflow"),
            limits=_MR_BRAIN_LIMITS,
            default_num_splits=4,
            modality_family="mr",
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
            "tiny-mr-rflow",
            "Tiny MR networks for CPU tests (rectified flow, image-only like the released MR presets)",
            autoencoder=_TINY_VAE,
            diffusion_unet=_family(_TINY_TRUNK, _TINY_CONTROL, "rflow")["diffusion_unet"],
            controlnet=None,
            schedule=NoiseSchedule("rflow"),
            modality_family="mr",
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


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``; an unknown name raises InputError with the closest known name and all of them.

    ``what`` names the kind of entry in the message, e.g. "preset" or "mask preset".
    """
    try:
        return registry[name]
    except KeyError:
        hint = difflib.get_close_matches(name, registry, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise InputError(
            f"unknown {what} '{name}'.{suggestion} Known {what}s: {', '.join(registry)}"
        ) from None


def get_preset(name: str) -> Preset:
    """Look a preset up by name; an unknown name raises InputError with the closest known names."""
    return lookup(PRESETS, name, "preset")


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
    elif sampler == "ddpm" and num_steps != schedule.num_train_timesteps:
        problems.append(ddpm_steps_problem(num_steps, schedule.num_train_timesteps))
    return problems


def ddpm_steps_problem(num_steps: int, num_train_timesteps: int) -> str:
    """Why DDPM cannot take fewer steps than it was trained with (MONAI's scheduler, as of MONAI 1.6)."""
    # MONAI's DDPMScheduler.step takes alphas_cumprod[t - 1] as the previous noise level whatever the stride,
    # so with fewer steps every step removes one timestep's worth of noise and the loop ends on a latent
    # that is still mostly noise (diffusers fixed the same code in its PR 2076). DDIM strides correctly.
    return (
        f"sampler 'ddpm' must run all {num_train_timesteps} training timesteps, got {num_steps}: MONAI's "
        "DDPMScheduler steps from t to t - 1 whatever the stride, so fewer steps end on a latent that is "
        "still noise; use 'ddim' (same trained UNet, any number of steps) for fewer"
    )
