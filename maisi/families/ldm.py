"""Plain latent diffusion presets (2D or 3D, unconditional or text-conditioned) and their network builders.

A preset fixes what shapes the weights of the two networks (MONAI ``AutoencoderKL`` and
``DiffusionModelUNet``), the noise schedule and prediction type the UNet was trained with, and the
sampling defaults that reproduce the seed it comes from:

- ``brats-2d-ldm``: MONAI model-zoo bundle ``brats_mri_axial_slices_generative_diffusion``
  (``configs/train_autoencoder.json``, ``train_diffusion.json``, ``inference.json``);
- ``brats-3d-ldm``: bundle ``brats_mri_generative_diffusion`` and the MONAI tutorial ``generation/3d_ldm``;
- ``cxr-text-ldm``: Warvito/generative_chestxray v0 (``configs/stage1/aekl_v0.yaml``,
  ``configs/ldm/ldm_v0.yaml``), released as bundle ``cxr_image_synthesis_latent_diffusion_model``.

The released files of all three are state dicts of the old GenerativeModels networks
(``weights_format="generative-0.x"``); :mod:`maisi.families.legacy_weights` converts them strictly.
GenerativeModels >= 0.2 never applied the ``proj_attn`` layer of its self-attention blocks, hence
``include_fc=False`` for the BraTS networks (their attention blocks then have no output projection, as
trained); the CXR UNet has cross-attention transformers only, whose output projection was live, hence
``include_fc=True``.

Importing this module needs neither torch nor MONAI (configs and ``--help`` may use it); the builders import
them when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from maisi.errors import InputError
from maisi.families.ct import NoiseSchedule, check_sampler, lookup
from maisi.options import Sampler, TimestepSpacing

if TYPE_CHECKING:
    import torch

FAMILY = "ldm"
LDMPart = Literal["autoencoder", "diffusion_unet"]
LDM_PARTS: tuple[LDMPart, ...] = ("autoencoder", "diffusion_unet")
PredictionType = Literal["epsilon", "v_prediction"]
WeightsFormat = Literal["generative-0.x", "maisi-checkpoint"]  # old GenerativeModels state dict, or ours
Condition = Literal["mask", "body_region", "spacing", "modality", "prompts"]

# The tokenizer length of the CLIP text encoders the text presets use (SD-2.1's and the demo's).
TEXT_CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class LDMPreset:
    """A named autoencoder + diffusion UNet pair with its schedule and sampling defaults.

    Attributes:
        name: registry name.
        description: one line for humans (which seed it reproduces).
        spatial_dims: 2 (slices, X-rays) or 3 (volumes).
        autoencoder: weight-determining kwargs of ``monai.networks.nets.AutoencoderKL``.
        diffusion_unet: weight-determining kwargs of ``monai.networks.nets.DiffusionModelUNet``.
        schedule: the DDPM noise schedule the UNet was trained with.
        prediction_type: what the UNet predicts: the noise (``epsilon``) or the velocity (``v_prediction``).
        latent_shape: (C, *spatial) of the latent the UNet denoises.
        spacing_mm: pixel/voxel spacing of the decoded image per axis, or None when the seed has none
            (chest X-rays resized to 512 px).
        scale_factor: latents are multiplied by it before diffusion and divided by it before decoding; the
            default when a checkpoint stores none.
        scale_factor_source: where :attr:`scale_factor` comes from.
        sampler: default sampler.
        num_steps: default number of inference steps.
        timestep_spacing: DDIM timestep spacing; ``leading`` reproduces the seeds' samplers.
        guidance_scale: default classifier-free guidance scale (0: none).
        text_context_length: tokens per prompt for text presets (their UNet has cross-attention), else None.
        weights_format: the layout of the preset's weights files.
        released_variant: the ``python -m maisi.download --variant`` that fetches released weights, if any.
    """

    name: str
    description: str
    spatial_dims: Literal[2, 3]
    autoencoder: dict[str, Any]
    diffusion_unet: dict[str, Any]
    schedule: NoiseSchedule
    prediction_type: PredictionType
    latent_shape: tuple[int, ...]
    spacing_mm: tuple[float, ...] | None
    scale_factor: float
    scale_factor_source: str
    sampler: Sampler = "ddim"
    num_steps: int = 50
    timestep_spacing: TimestepSpacing = "linspace"
    guidance_scale: float = 0.0
    text_context_length: int | None = None
    weights_format: WeightsFormat = "maisi-checkpoint"
    released_variant: str | None = None

    def __post_init__(self) -> None:
        problems = preset_problems(self)
        if problems:  # a packaging bug, not the user's
            raise ValueError(f"LDM preset '{self.name}': " + "; ".join(problems))

    @property
    def family(self) -> str:
        """The model family (``ldm``; text presets are LDM presets that take prompts)."""
        return FAMILY

    @property
    def parts(self) -> tuple[LDMPart, ...]:
        return LDM_PARTS

    @property
    def takes_prompts(self) -> bool:
        """Whether the UNet has cross-attention on a text context."""
        return bool(self.diffusion_unet.get("with_conditioning", False))

    @property
    def conditions(self) -> frozenset[Condition]:
        """The conditions the preset takes: ``prompts`` for text presets, none otherwise."""
        return frozenset({"prompts"}) if self.takes_prompts else frozenset()

    @property
    def context_width(self) -> int | None:
        """Width D of the text context (N, L, D) the UNet cross-attends to, or None."""
        return self.diffusion_unet.get("cross_attention_dim") if self.takes_prompts else None

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder["latent_channels"])

    @property
    def vae_factor(self) -> int:
        """Down-sampling factor of the autoencoder per axis."""
        return 2 ** (len(self.autoencoder["channels"]) - 1)

    @property
    def unet_multiple(self) -> int:
        """Latent sizes must be multiples of this (the UNet's own down-sampling)."""
        return 2 ** (len(self.diffusion_unet["channels"]) - 1)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Spatial shape of a decoded sample: the latent's times the autoencoder factor."""
        return tuple(s * self.vae_factor for s in self.latent_shape[1:])

    def network_kwargs(self, part: LDMPart) -> dict[str, Any]:
        """Constructor arguments that determine the weights of ``part`` (a copy).

        Raises:
            InputError: ``part`` is not ``autoencoder`` or ``diffusion_unet``.
        """
        if part not in LDM_PARTS:
            raise InputError(
                f"LDM preset '{self.name}' has no part '{part}'; its parts are {list(LDM_PARTS)}"
            )
        return dict(getattr(self, part))


def preset_problems(preset: LDMPreset) -> list[str]:
    """Why the parts of ``preset`` do not fit together (empty when they do)."""
    ae, unet, dims = preset.autoencoder, preset.diffusion_unet, preset.spatial_dims
    out = []
    if ae["spatial_dims"] != dims or unet["spatial_dims"] != dims:
        out.append(f"networks' spatial_dims {ae['spatial_dims']}/{unet['spatial_dims']} are not {dims}")
    if len(preset.latent_shape) != dims + 1:
        out.append(f"latent_shape {preset.latent_shape} is not (C, *{dims} sizes)")
    elif any(s % preset.unet_multiple for s in preset.latent_shape[1:]):
        out.append(f"latent sizes {preset.latent_shape[1:]} are not multiples of {preset.unet_multiple}")
    channels = {preset.latent_shape[0], ae["latent_channels"], unet["in_channels"], unet["out_channels"]}
    if len(channels) != 1:
        out.append(f"latent channels disagree: {sorted(channels)}")
    if preset.spacing_mm is not None and len(preset.spacing_mm) != dims:
        out.append(f"spacing_mm {preset.spacing_mm} has not {dims} values")
    if preset.takes_prompts != (preset.text_context_length is not None):
        out.append("text_context_length must be given exactly when the UNet has cross-attention")
    if preset.schedule.kind != "ddpm":
        out.append(f"schedule '{preset.schedule.kind}' is not ddpm")
    if preset.prediction_type != preset.schedule.prediction_type:
        # the schedulers read the schedule's: a preset saying otherwise would sample with the wrong target
        out.append(
            f"prediction_type {preset.prediction_type!r} differs from its schedule's "
            f"{preset.schedule.prediction_type!r}"
        )
    out += check_sampler(preset.schedule, preset.sampler, preset.num_steps)
    return out


def _autoencoder(dims: int, channels: list[int], latent: int, groups: int, attn: bool, res: int = 2) -> dict:
    """AutoencoderKL kwargs in the seeds' form: 1 channel in and out, no attention inside the levels,
    optional non-local attention at the bottom of encoder and decoder (whose unused output projection the old
    code had, hence ``include_fc=False``)."""
    return dict(
        spatial_dims=dims,
        in_channels=1,
        out_channels=1,
        latent_channels=latent,
        channels=list(channels),
        num_res_blocks=res,
        norm_num_groups=groups,
        norm_eps=1e-6,
        attention_levels=[False] * len(channels),
        with_encoder_nonlocal_attn=attn,
        with_decoder_nonlocal_attn=attn,
        include_fc=False,
    )


def _unet(
    dims: int,
    latent: int,
    channels: list[int],
    heads: list[int],
    groups: int,
    res: int = 2,
    context: int | None = None,
) -> dict:
    """DiffusionModelUNet kwargs: attention where ``heads`` is non-zero; with a ``context`` width, those
    levels are cross-attention transformers (live output projection: ``include_fc=True``), else
    self-attention blocks without output projection, as the old code ran them (``include_fc=False``)."""
    kwargs = dict(
        spatial_dims=dims,
        in_channels=latent,
        out_channels=latent,
        channels=list(channels),
        attention_levels=[h > 0 for h in heads],
        num_head_channels=list(heads),
        num_res_blocks=res,
        norm_num_groups=groups,
        norm_eps=1e-6,
        resblock_updown=False,
        include_fc=context is not None,
        use_combined_linear=False,
    )
    if context is not None:
        kwargs.update(with_conditioning=True, cross_attention_dim=context, transformer_num_layers=1)
    return kwargs


# Source: brats_mri_*_generative_diffusion configs (scaled_linear_beta, 1000 steps, 0.0015-0.0195), and
# Warvito's ldm_v0.yaml (same with beta_end 0.0205).
_BRATS_SCHEDULE = NoiseSchedule("ddpm", 1000, "scaled_linear_beta", 0.0015, 0.0195)
_CXR_SCHEDULE = NoiseSchedule("ddpm", 1000, "scaled_linear_beta", 0.0015, 0.0205, "v_prediction")
_BUNDLE_SCALE = (
    "the bundle's sampler decodes the raw latent (its training 1/std is never saved), so its samples "
    "are made with 1.0"
)
_TRAINED_SCALE = "1.0 until trained: maisi.train stores 1/std of the training latents in the checkpoint"

LDM_PRESETS: dict[str, LDMPreset] = {
    p.name: p
    for p in (
        LDMPreset(
            "brats-2d-ldm",
            "Released BraTS FLAIR axial-slice LDM (bundle brats_mri_axial_slices_generative_diffusion), "
            "256^2",
            spatial_dims=2,
            autoencoder=_autoencoder(2, [64, 128, 256], latent=1, groups=32, attn=True),
            diffusion_unet=_unet(2, 1, [32, 64, 128, 256], [0, 32, 32, 32], groups=32),
            schedule=_BRATS_SCHEDULE,
            prediction_type="epsilon",
            latent_shape=(1, 64, 64),
            spacing_mm=(1.0, 1.0),  # not resampled; the BraTS volumes are 1 mm isotropic
            scale_factor=1.0,
            scale_factor_source=_BUNDLE_SCALE,
            timestep_spacing="leading",
            weights_format="generative-0.x",
            released_variant="brats-2d",
        ),
        LDMPreset(
            "brats-3d-ldm",
            "Released BraTS FLAIR volume LDM (bundle brats_mri_generative_diffusion v1.0.1), 144x176x112 "
            "at 1.1 mm",
            spatial_dims=3,
            autoencoder=_autoencoder(3, [64, 128, 256], latent=8, groups=32, attn=False),
            diffusion_unet=_unet(3, 8, [256, 256, 512], [0, 64, 64], groups=32),
            schedule=_BRATS_SCHEDULE,
            prediction_type="epsilon",
            latent_shape=(8, 36, 44, 28),
            spacing_mm=(1.1, 1.1, 1.1),
            scale_factor=1.0,
            scale_factor_source=_BUNDLE_SCALE,
            timestep_spacing="leading",
            weights_format="generative-0.x",
            released_variant="brats-3d",
        ),
        LDMPreset(
            "cxr-text-ldm",
            "Released chest X-ray text-to-image LDM (Warvito/generative_chestxray v0, bundle "
            "cxr_image_synthesis_latent_diffusion_model), 512^2, v-prediction, SD-2.1 CLIP text context",
            spatial_dims=2,
            autoencoder=_autoencoder(2, [64, 128, 128, 128], latent=3, groups=32, attn=False),
            diffusion_unet=_unet(2, 3, [256, 512, 768], [0, 512, 768], groups=32, context=1024),
            schedule=_CXR_SCHEDULE,
            prediction_type="v_prediction",
            latent_shape=(3, 64, 64),
            spacing_mm=None,  # MIMIC-CXR JPGs resized to 512 px: no spacing
            scale_factor=0.3,
            scale_factor_source="Warvito/generative_chestxray ldm.sh scale_factor=0.3 (1/std printed by "
            "eda_ldm_scaling_factor.py), also fixed in the bundle's sampler",
            timestep_spacing="leading",
            guidance_scale=7.0,
            text_context_length=TEXT_CONTEXT_LENGTH,
            weights_format="generative-0.x",
            released_variant="cxr",
        ),
        # Tiny networks: CPU tests in seconds. The 2D ones keep the seeds' attention (non-local attention in
        # the autoencoder, self-attention or cross-attention in the UNet) so conversions are exercised.
        LDMPreset(
            "tiny-ldm-2d",
            "Tiny unconditional 2D LDM for CPU tests (16^2)",
            spatial_dims=2,
            autoencoder=_autoencoder(2, [8, 16], latent=1, groups=4, attn=True, res=1),
            diffusion_unet=_unet(2, 1, [8, 16], [0, 8], groups=4, res=1),
            schedule=_BRATS_SCHEDULE,
            prediction_type="epsilon",
            latent_shape=(1, 8, 8),
            spacing_mm=(1.0, 1.0),
            scale_factor=1.0,
            scale_factor_source=_TRAINED_SCALE,
        ),
        LDMPreset(
            "tiny-ldm-3d",
            "Tiny unconditional 3D LDM for CPU tests (16^3 at 6 mm)",
            spatial_dims=3,
            autoencoder=_autoencoder(3, [8, 16], latent=2, groups=4, attn=False, res=1),
            diffusion_unet=_unet(3, 2, [8, 16], [0, 8], groups=4, res=1),
            schedule=_BRATS_SCHEDULE,
            prediction_type="epsilon",
            latent_shape=(2, 8, 8, 8),
            spacing_mm=(6.0, 6.0, 6.0),
            scale_factor=1.0,
            scale_factor_source=_TRAINED_SCALE,
        ),
        LDMPreset(
            "tiny-text-ldm-2d",
            "Tiny text-conditioned 2D LDM for CPU tests (16^2, v-prediction, context width 16)",
            spatial_dims=2,
            autoencoder=_autoencoder(2, [8, 16], latent=2, groups=4, attn=False, res=1),
            diffusion_unet=_unet(2, 2, [8, 16], [0, 8], groups=4, res=1, context=16),
            schedule=_CXR_SCHEDULE,
            prediction_type="v_prediction",
            latent_shape=(2, 8, 8),
            spacing_mm=None,
            scale_factor=1.0,
            scale_factor_source=_TRAINED_SCALE,
            guidance_scale=3.0,
            text_context_length=TEXT_CONTEXT_LENGTH,
        ),
        LDMPreset(
            "tiny-text-ldm-3d",
            "Tiny text-conditioned 3D LDM for CPU tests (16^3 at 6 mm, v-prediction, context width 16)",
            spatial_dims=3,
            autoencoder=_autoencoder(3, [8, 16], latent=2, groups=4, attn=False, res=1),
            diffusion_unet=_unet(3, 2, [8, 16], [0, 8], groups=4, res=1, context=16),
            schedule=_CXR_SCHEDULE,
            prediction_type="v_prediction",
            latent_shape=(2, 8, 8, 8),
            spacing_mm=(6.0, 6.0, 6.0),
            scale_factor=1.0,
            scale_factor_source=_TRAINED_SCALE,
            guidance_scale=3.0,
            text_context_length=TEXT_CONTEXT_LENGTH,
        ),
        # Demo networks: the seeds' structure scaled down to train on 2 CPU cores and sample in seconds.
        LDMPreset(
            "demo-brain-2d",
            "Demo 2D brain-slice LDM (brats-2d-ldm scaled down: 128^2 T1 slices at 2 mm)",
            spatial_dims=2,
            autoencoder=_autoencoder(2, [32, 64, 64], latent=1, groups=16, attn=True, res=1),
            diffusion_unet=_unet(2, 1, [32, 64, 128], [0, 32, 32], groups=16, res=1),
            schedule=_BRATS_SCHEDULE,
            prediction_type="epsilon",
            latent_shape=(1, 32, 32),
            spacing_mm=(2.0, 2.0),
            scale_factor=1.0,
            scale_factor_source=_TRAINED_SCALE,
        ),
        LDMPreset(
            "demo-brain-3d",
            "Demo 3D brain LDM (brats-3d-ldm scaled down: 64x80x64 T1 volumes at 3 mm)",
            spatial_dims=3,
            autoencoder=_autoencoder(3, [16, 32, 32], latent=4, groups=8, attn=False, res=1),
            diffusion_unet=_unet(3, 4, [32, 64, 64], [0, 0, 32], groups=8, res=1),
            schedule=_BRATS_SCHEDULE,
            prediction_type="epsilon",
            latent_shape=(4, 16, 20, 16),
            spacing_mm=(3.0, 3.0, 3.0),
            scale_factor=1.0,
            scale_factor_source=_TRAINED_SCALE,
        ),
        LDMPreset(
            "demo-drr-text",
            "Demo text-to-radiograph LDM (cxr-text-ldm scaled down: 128^2 DRRs of chest CTs, context "
            "width 64)",
            spatial_dims=2,
            autoencoder=_autoencoder(2, [32, 64, 64, 64], latent=3, groups=16, attn=False, res=1),
            diffusion_unet=_unet(2, 3, [32, 64, 128], [0, 32, 32], groups=16, res=1, context=64),
            schedule=_CXR_SCHEDULE,
            prediction_type="v_prediction",
            latent_shape=(3, 16, 16),
            spacing_mm=None,  # parallel projections; the pixel spacing is the renderer's choice
            scale_factor=1.0,
            scale_factor_source=_TRAINED_SCALE,
            guidance_scale=4.0,
            text_context_length=TEXT_CONTEXT_LENGTH,
        ),
    )
}


def get_ldm_preset(name: str) -> LDMPreset:
    """Look an LDM preset up by name; an unknown name raises InputError with the closest known names."""
    return lookup(LDM_PRESETS, name, "LDM preset")


def build_ldm_network(
    preset: LDMPreset,
    part: LDMPart,
    *,
    device: str | torch.device | None = None,
    use_flash_attention: bool = False,
) -> torch.nn.Module:
    """Build one network of an LDM preset from MONAI's classes.

    Args:
        preset: the preset.
        part: ``"autoencoder"`` (``AutoencoderKL``: (N, 1, *S) <-> (N, C, *S/f)) or ``"diffusion_unet"``
            (``DiffusionModelUNet``: (N, C, *s), timesteps (N,)[, context (N, L, D)] -> (N, C, *s)).
        device: where the parameters are created; ``"meta"`` builds without memory (shapes only).
        use_flash_attention: a speed option (CUDA); it never changes a weight.
    """
    import torch
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    kwargs = preset.network_kwargs(part)
    cls = AutoencoderKL if part == "autoencoder" else DiffusionModelUNet
    with torch.device(device if device is not None else "cpu"):
        return cls(**kwargs, use_flash_attention=use_flash_attention)


def build_ldm_networks(
    preset: LDMPreset, *, device: str | torch.device | None = None, use_flash_attention: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The preset's (autoencoder, diffusion UNet), see :func:`build_ldm_network`."""
    return tuple(  # type: ignore[return-value]
        build_ldm_network(preset, part, device=device, use_flash_attention=use_flash_attention)
        for part in LDM_PARTS
    )
