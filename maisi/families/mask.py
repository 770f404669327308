"""Mask-generation presets as plain data: MAISI's mask VAE and mask diffusion UNet (Path A).

A mask preset fixes everything that shapes the weights of the two mask-generation networks plus the noise
schedule, the latent shape and the grid of the generated mask. Like :mod:`maisi.families.ct` this module
imports neither torch nor MONAI; :mod:`maisi.masks.networks` builds the networks from it.

Runtime-only constructor arguments (``use_checkpointing``, ``norm_float16``, ``use_flash_attention``,
``num_splits``, ``dim_split``) are not part of a preset: they are chosen at build time and never change a
weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from maisi.families.ct import MAISI_VAE, NoiseSchedule, lookup

MaskPart = Literal["autoencoder", "diffusion_unet"]
MASK_PARTS: tuple[MaskPart, ...] = ("autoencoder", "diffusion_unet")

# Size-vector slots of MAISI's mask UNet (cross-attention context of length 10).
NUM_SIZE_SLOTS = 10


@dataclass(frozen=True)
class MaskPreset:
    """A named pair of mask networks (VAE: 8 bit channels -> latent -> class logits; UNet on the latent).

    Attributes:
        name: registry name.
        description: one line for humans.
        autoencoder: weight-determining kwargs of MONAI ``AutoencoderKlMaisi``.
        diffusion_unet: weight-determining kwargs of ``monai.networks.nets.DiffusionModelUNet``.
        schedule: the noise schedule the UNet was trained with.
        latent_shape: (C, X, Y, Z) of the latent the UNet denoises.
        spacing_mm: isotropic spacing of the decoded mask.
        num_classes: output channels of the VAE decoder (channel index -> MAISI id via
            ``maisi/resources/maisi_label_dict_124_to_132.json``).
        default_num_splits: VAE tensor splits (memory only).
    """

    name: str
    description: str
    autoencoder: dict[str, Any]
    diffusion_unet: dict[str, Any]
    schedule: NoiseSchedule
    latent_shape: tuple[int, int, int, int]
    spacing_mm: float
    num_classes: int = 125
    default_num_splits: int = 1

    def network_kwargs(self, part: MaskPart) -> dict[str, Any]:
        """Constructor arguments that determine the weights of ``part`` (a copy)."""
        return dict(getattr(self, part))

    @property
    def vae_factor(self) -> int:
        """Down-sampling factor of the mask VAE per axis (4 for MAISI)."""
        return 2 ** (len(self.autoencoder["num_channels"]) - 1)

    @property
    def mask_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the decoded mask (256^3 for the released preset)."""
        return tuple(s * self.vae_factor for s in self.latent_shape[1:])  # type: ignore[return-value]


# Source of every value below: NV-Generate-CTMR configs/config_network_ddpm.json and
# configs/config_network_rflow.json (identical for the mask generator), keys mask_generation_autoencoder_def,
# mask_generation_diffusion_def, mask_generation_noise_scheduler, mask_generation_latent_shape; spatial_dims 3
# and latent_channels 4 from the same files. Their runtime-only keys (use_checkpointing true, norm_float16
# true, num_splits 8, dim_split 1, use_flash_attention false/true) are left to build time; use_convtranspose
# stays here because it decides the decoder's weights. The mask VAE is MAISI's CT VAE network with these
# channels; its other arguments (norm groups and eps, no attention) are the CT VAE's.
_MAISI_MASK_VAE = dict(
    MAISI_VAE,
    in_channels=8,
    out_channels=125,
    num_channels=[32, 64, 128],
    num_res_blocks=[1, 2, 2],
    use_convtranspose=True,
)
_MAISI_MASK_UNET = dict(
    spatial_dims=3,
    in_channels=4,
    out_channels=4,
    channels=[64, 128, 256, 512],
    attention_levels=[False, False, True, True],
    num_head_channels=[0, 0, 32, 32],
    num_res_blocks=2,
    with_conditioning=True,
    upcast_attention=True,
    cross_attention_dim=NUM_SIZE_SLOTS,
)
# DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, schedule="scaled_linear_beta",
# clip_sample=False): the defaults of NoiseSchedule("ddpm"); maisi.sampling always turns clip_sample off.
_MASK_SCHEDULE = NoiseSchedule("ddpm", 1000, "scaled_linear_beta", 0.0015, 0.0195)

# Same structure (3 VAE levels with transposed-convolution upsampling, 8 in / 125 out, 4 latent channels,
# size-conditioned UNet), fewer channels: small for CPU demos, tiny for tests in seconds.
_SMALL_MASK_VAE = dict(
    _MAISI_MASK_VAE, num_channels=[16, 32, 64], num_res_blocks=[1, 1, 1], norm_num_groups=16
)
_SMALL_MASK_UNET = dict(
    _MAISI_MASK_UNET,
    channels=[32, 64, 128],
    attention_levels=[False, False, True],
    num_head_channels=[0, 0, 32],
    num_res_blocks=1,
    norm_num_groups=16,
)
_TINY_MASK_VAE = dict(_MAISI_MASK_VAE, num_channels=[8, 16, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4)
_TINY_MASK_UNET = dict(
    _MAISI_MASK_UNET,
    channels=[8, 16],
    attention_levels=[False, True],
    num_head_channels=[0, 8],
    num_res_blocks=1,
    norm_num_groups=8,
)

# The demo weights' UNet: the tiny one (132k parameters) could not fit even 32 training latents in 600 steps
# (it sampled scrambled label maps), so the demo gets 3.2 M parameters at about 2 steps/s on one CPU thread.
_DEMO_MASK_UNET = dict(
    _MAISI_MASK_UNET,
    channels=[32, 64, 64],
    attention_levels=[False, False, True],
    num_head_channels=[0, 0, 32],
    num_res_blocks=1,
    norm_num_groups=16,
)

MASK_PRESETS: dict[str, MaskPreset] = {
    p.name: p
    for p in (
        MaskPreset(
            "maisi-mask-ddpm",
            "Released MAISI mask generator (DDPM, 10-slot organ/tumour size conditioning, 256^3 at 1.5 mm)",
            autoencoder=_MAISI_MASK_VAE,
            diffusion_unet=_MAISI_MASK_UNET,
            schedule=_MASK_SCHEDULE,
            latent_shape=(4, 64, 64, 64),
            spacing_mm=1.5,
            default_num_splits=8,
        ),
        MaskPreset(
            "small-mask-ddpm",
            "Small mask generator for CPU demos (128^3 at 3 mm, same field of view as MAISI's)",
            autoencoder=_SMALL_MASK_VAE,
            diffusion_unet=_SMALL_MASK_UNET,
            schedule=_MASK_SCHEDULE,
            latent_shape=(4, 32, 32, 32),
            spacing_mm=3.0,
        ),
        MaskPreset(
            "tiny-mask-ddpm",
            "Tiny mask generator for CPU tests (64^3 at 6 mm, same field of view as MAISI's)",
            autoencoder=_TINY_MASK_VAE,
            diffusion_unet=_TINY_MASK_UNET,
            schedule=_MASK_SCHEDULE,
            latent_shape=(4, 16, 16, 16),
            spacing_mm=6.0,
        ),
        MaskPreset(
            "demo-mask-ddpm",
            "Demo mask generator shipped in models/demo (64^3 at 6 mm; the tiny VAE, a 3.2 M-parameter UNet)",
            autoencoder=_TINY_MASK_VAE,
            diffusion_unet=_DEMO_MASK_UNET,
            schedule=_MASK_SCHEDULE,
            latent_shape=(4, 16, 16, 16),
            spacing_mm=6.0,
        ),
    )
}


def get_mask_preset(name: str) -> MaskPreset:
    """Look a mask preset up by name; an unknown name raises InputError with the closest known names."""
    return lookup(MASK_PRESETS, name, "mask preset")
