"""Presets build MONAI's MAISI classes with the released arguments; runtime options never touch weights."""

from __future__ import annotations

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

from maisi.errors import InputError
from maisi.families.ct import PARTS, PRESETS, get_preset
from maisi.families.networks import RuntimeOptions, build_network, count_parameters

# Parameter counts of the released MAISI CT networks (MONAI 1.5/1.6 classes with the released arguments).
# The MR variants build from the same config_network_rflow.json (no ControlNet was released for them).
RELEASED_COUNTS = {
    "maisi-ct-ddpm": {"autoencoder": 20_944_897, "diffusion_unet": 169_370_884, "controlnet": 68_644_944},
    "maisi-ct-rflow": {"autoencoder": 20_944_897, "diffusion_unet": 180_500_868, "controlnet": 72_037_072},
    "maisi-mr-rflow": {"autoencoder": 20_944_897, "diffusion_unet": 180_500_868},
    "maisi-mr-brain-rflow": {"autoencoder": 20_944_897, "diffusion_unet": 180_500_868},
}


@pytest.mark.parametrize("name", sorted(RELEASED_COUNTS))
def test_released_presets_have_the_released_parameter_counts(name):
    preset = get_preset(name)
    assert preset.parts == tuple(RELEASED_COUNTS[name])
    for part in preset.parts:
        assert count_parameters(build_network(preset, part)) == RELEASED_COUNTS[name][part], part


def test_mr_presets_are_the_rflow_networks_without_a_controlnet():
    """NV-Generate-CTMR builds every variant from configs/config_network_rflow.json: autoencoder_v2 has the
    architecture of autoencoder_v1, the MR UNets that of the CT rflow UNet."""
    ct = get_preset("maisi-ct-rflow")
    for name in ("maisi-mr-rflow", "maisi-mr-brain-rflow", "tiny-mr-rflow"):
        mr = get_preset(name)
        assert mr.modality_family == "mr" and not mr.has_controlnet and mr.controlnet is None
        assert mr.uses_modality and mr.uses_spacing and not mr.uses_body_region
        if name.startswith("maisi"):
            assert mr.autoencoder == ct.autoencoder and mr.diffusion_unet == ct.diffusion_unet
            assert mr.default_num_splits == ct.default_num_splits == 4
        with pytest.raises(InputError, match=f"preset '{name}' has no controlnet"):
            build_network(mr, "controlnet")
    assert {p.modality_family for p in PRESETS.values() if p.has_controlnet} == {"ct"}


def test_released_arguments_match_maisi():
    ddpm, rflow = get_preset("maisi-ct-ddpm"), get_preset("maisi-ct-rflow")
    vae = ddpm.autoencoder
    assert (vae["latent_channels"], vae["num_channels"], vae["num_res_blocks"], vae["norm_num_groups"]) == (
        4,
        [64, 128, 256],
        [2, 2, 2],
        32,
    )
    assert (
        ddpm.diffusion_unet["include_top_region_index_input"]
        and "num_class_embeds" not in ddpm.diffusion_unet
    )
    assert rflow.diffusion_unet["num_class_embeds"] == 128 and rflow.diffusion_unet["resblock_updown"]
    assert not rflow.uses_body_region and rflow.uses_modality and rflow.uses_spacing
    for preset in (ddpm, rflow):
        assert preset.controlnet["conditioning_embedding_num_channels"] == [8, 32, 64]
        assert preset.diffusion_unet["num_head_channels"] == [0, 0, 32, 32]
        assert preset.vae_factor == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_the_monai_classes(name):
    preset = get_preset(name)
    classes = dict(zip(PARTS, (AutoencoderKlMaisi, DiffusionModelUNetMaisi, ControlNetMaisi)))
    assert preset.parts[:2] == ("autoencoder", "diffusion_unet")
    for part in preset.parts:
        assert isinstance(build_network(preset, part), classes[part])


@pytest.mark.parametrize("name", ["maisi-ct-rflow", "tiny-ddpm", "tiny-mr-rflow"])
def test_runtime_options_do_not_change_the_weights(name, monkeypatch):
    monkeypatch.setattr(
        torch.cuda, "is_available", lambda: True
    )  # MONAI refuses flash attention without CUDA
    preset = get_preset(name)
    gpu_like = RuntimeOptions(use_flash_attention=True, norm_float16=True, use_checkpointing=True)
    for part in preset.parts:
        cpu_sd = build_network(preset, part).state_dict()
        gpu_sd = build_network(preset, part, gpu_like).state_dict()
        assert {k: tuple(v.shape) for k, v in cpu_sd.items()} == {
            k: tuple(v.shape) for k, v in gpu_sd.items()
        }


def test_flash_attention_and_half_norm_only_on_cuda():
    assert RuntimeOptions.for_device(torch.device("cpu")) == RuntimeOptions()
    cuda = RuntimeOptions.for_device(torch.device("cuda"))
    assert cuda.use_flash_attention and cuda.norm_float16


def test_tiny_networks_run_forward_with_maisi_conditioning():
    preset = get_preset("tiny-rflow")
    unet, controlnet = build_network(preset, "diffusion_unet"), build_network(preset, "controlnet")
    x = torch.randn(2, 4, 8, 8, 4)
    t = torch.tensor([10.0, 500.0])
    labels = torch.tensor([1, 1])
    down, mid = controlnet(
        x=x, timesteps=t, controlnet_cond=torch.rand(2, 8, 32, 32, 16), class_labels=labels
    )
    out = unet(
        x=x,
        timesteps=t,
        class_labels=labels,
        spacing_tensor=torch.full((2, 3), 150.0),
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    )
    assert out.shape == x.shape


def test_unknown_preset_names_the_closest():
    with pytest.raises(InputError, match="Did you mean 'tiny-rflow'"):
        get_preset("tiny_rflow")
