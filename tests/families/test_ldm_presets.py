"""LDM presets: the released networks exactly (meta-device counts of seed_ldms.md section 2), the seeds'
schedules and sampling defaults, tiny and demo presets that run."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from maisi.errors import InputError
from maisi.families.ldm import LDM_PRESETS, LDMPreset, build_ldm_network, build_ldm_networks, get_ldm_preset

# (preset, part) -> (parameters, state-dict keys) of MONAI 1.6's networks, from seed_ldms.md section 2
RELEASED_COUNTS = {
    ("brats-2d-ldm", "autoencoder"): (12_151_496, 178),
    ("brats-2d-ldm", "diffusion_unet"): (15_392_641, 400),
    ("brats-3d-ldm", "autoencoder"): (21_000_353, 130),
    ("brats-3d-ldm", "diffusion_unet"): (189_325_576, 296),
    ("cxr-text-ldm", "autoencoder"): (4_607_848, 162),
    ("cxr-text-ldm", "diffusion_unet"): (263_636_995, 496),
}


@pytest.mark.parametrize(("name", "part"), list(RELEASED_COUNTS))
def test_released_networks_have_the_published_counts_on_meta(name, part):
    net = build_ldm_network(get_ldm_preset(name), part, device="meta")
    assert all(p.is_meta for p in net.parameters())
    params, keys = RELEASED_COUNTS[name, part]
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(net.state_dict()) == keys


def test_released_presets_carry_the_seeds_schedules_and_sampling():
    brats2, brats3, cxr = (get_ldm_preset(n) for n in ("brats-2d-ldm", "brats-3d-ldm", "cxr-text-ldm"))
    for p in (brats2, brats3):
        assert (p.schedule.beta_schedule, p.schedule.beta_start, p.schedule.beta_end) == (
            "scaled_linear_beta",
            0.0015,
            0.0195,
        )
        assert p.prediction_type == "epsilon" and p.scale_factor == 1.0 and p.conditions == frozenset()
        assert p.autoencoder["include_fc"] is False and p.diffusion_unet["include_fc"] is False
    assert cxr.schedule.beta_end == 0.0205 and cxr.prediction_type == "v_prediction"
    # the schedulers take the schedule's prediction type: every preset's must be its own
    for p in LDM_PRESETS.values():
        assert p.schedule.prediction_type == p.prediction_type, p.name
    assert cxr.scale_factor == 0.3 and "0.3" in cxr.scale_factor_source and cxr.guidance_scale == 7.0
    assert cxr.diffusion_unet["include_fc"] is True and cxr.context_width == 1024
    assert cxr.conditions == frozenset({"prompts"}) and cxr.text_context_length == 77
    for p in (brats2, brats3, cxr):
        assert (p.sampler, p.num_steps, p.timestep_spacing) == ("ddim", 50, "leading")
        assert p.schedule.num_train_timesteps == 1000 and p.weights_format == "generative-0.x"
        assert p.family == "ldm"
    assert (brats2.latent_shape, brats2.output_shape) == ((1, 64, 64), (256, 256))
    assert (brats3.latent_shape, brats3.output_shape) == ((8, 36, 44, 28), (144, 176, 112))
    assert brats3.spacing_mm == (1.1, 1.1, 1.1)
    assert (cxr.latent_shape, cxr.output_shape, cxr.spacing_mm) == ((3, 64, 64), (512, 512), None)
    assert [p.released_variant for p in (brats2, brats3, cxr)] == ["brats-2d", "brats-3d", "cxr"]


@pytest.mark.parametrize("name", [n for n in LDM_PRESETS if n.startswith("tiny-")])
def test_tiny_presets_encode_denoise_and_decode(name):
    preset = get_ldm_preset(name)
    torch.manual_seed(0)
    ae, unet = build_ldm_networks(preset)
    with torch.no_grad():  # MONAI zero-initialises the UNet's output layers: every output would be 0
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image = torch.rand(2, 1, *preset.output_shape)
    with torch.no_grad():
        z = ae.encode_stage_2_inputs(image)
        assert tuple(z.shape) == (2, *preset.latent_shape)
        inputs = {}
        if preset.takes_prompts:
            inputs["context"] = torch.randn(2, preset.text_context_length, preset.context_width)
        out = unet(x=z, timesteps=torch.tensor([10, 500]), **inputs)
        assert out.shape == z.shape and torch.isfinite(out).all()
        if preset.takes_prompts:  # the context reaches the UNet
            inputs["context"] = torch.randn_like(inputs["context"])
            assert not torch.allclose(out, unet(x=z, timesteps=torch.tensor([10, 500]), **inputs))
        assert tuple(ae.decode_stage_2_outputs(z).shape) == tuple(image.shape)


def test_text_presets_are_the_ones_with_cross_attention_in_2d_and_3d():
    text = {n for n, p in LDM_PRESETS.items() if p.takes_prompts}
    assert text == {"cxr-text-ldm", "tiny-text-ldm-2d", "tiny-text-ldm-3d", "demo-drr-text"}
    assert {LDM_PRESETS[n].spatial_dims for n in text} == {2, 3}
    assert get_ldm_preset("demo-drr-text").context_width == 64


def test_demo_presets_are_small_and_of_the_demo_grids():
    brain2, brain3, drr = (get_ldm_preset(n) for n in ("demo-brain-2d", "demo-brain-3d", "demo-drr-text"))
    assert brain2.output_shape == (128, 128) and drr.output_shape == (128, 128)
    assert brain3.spacing_mm == (3.0, 3.0, 3.0) and brain3.spatial_dims == 3
    for p in (brain2, brain3, drr):
        ae, unet = build_ldm_networks(p, device="meta")
        assert sum(x.numel() for x in (*ae.parameters(), *unet.parameters())) < 6_000_000, p.name
        assert p.timestep_spacing == "linspace" and p.weights_format == "maisi-checkpoint"


def test_unknown_names_and_parts_are_refused_by_name():
    with pytest.raises(InputError, match="unknown LDM preset 'brats-2d'.*Did you mean 'brats-2d-ldm'"):
        get_ldm_preset("brats-2d")
    with pytest.raises(InputError, match="has no part 'controlnet'"):
        get_ldm_preset("tiny-ldm-2d").network_kwargs("controlnet")  # type: ignore[arg-type]


def test_inconsistent_preset_is_a_packaging_error():
    base = get_ldm_preset("tiny-ldm-2d")
    with pytest.raises(ValueError, match="latent channels disagree"):
        replace(base, latent_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="not multiples of 2"):
        replace(base, latent_shape=(1, 7, 8))
    with pytest.raises(ValueError, match="text_context_length"):
        replace(base, text_context_length=77)
    with pytest.raises(ValueError, match="sampler 'rflow' cannot sample"):
        replace(base, sampler="rflow")
    with pytest.raises(ValueError, match="differs from its schedule's 'epsilon'"):
        replace(base, prediction_type="v_prediction")
    assert isinstance(replace(base, name="copy"), LDMPreset)


def test_the_preset_module_imports_without_torch():
    code = "import sys, maisi.families.ldm; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
