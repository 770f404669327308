"""Mask-generation presets, networks and their checkpoints (released layouts and ours)."""

from __future__ import annotations

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.networks.nets import DiffusionModelUNet

from maisi.checkpoints import save_checkpoint
from maisi.errors import CheckpointError, InputError
from maisi.families.ct import get_preset
from maisi.families.mask import MASK_PRESETS, get_mask_preset
from maisi.families.networks import build_network
from maisi.masks.networks import build_mask_network, load_mask_network, load_mask_networks

# NV-Generate-CTMR configs/config_network_ddpm.json (= config_network_rflow.json), keys mask_generation_*,
# without the runtime-only keys (use_checkpointing, norm_float16, num_splits, dim_split, use_flash_attention).
RELEASED_VAE = {
    "spatial_dims": 3,
    "in_channels": 8,
    "out_channels": 125,
    "latent_channels": 4,
    "num_channels": [32, 64, 128],
    "num_res_blocks": [1, 2, 2],
    "norm_num_groups": 32,
    "norm_eps": 1e-06,
    "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "use_convtranspose": True,
}
RELEASED_UNET = {
    "spatial_dims": 3,
    "in_channels": 4,
    "out_channels": 4,
    "channels": [64, 128, 256, 512],
    "attention_levels": [False, False, True, True],
    "num_head_channels": [0, 0, 32, 32],
    "num_res_blocks": 2,
    "with_conditioning": True,
    "upcast_attention": True,
    "cross_attention_dim": 10,
}
TINY = get_mask_preset("tiny-mask-ddpm")


def test_released_preset_has_maisis_arguments():
    preset = get_mask_preset("maisi-mask-ddpm")
    assert preset.autoencoder == RELEASED_VAE
    assert preset.diffusion_unet == RELEASED_UNET
    assert preset.latent_shape == (4, 64, 64, 64) and preset.mask_shape == (256, 256, 256)
    assert preset.spacing_mm == 1.5 and preset.num_classes == 125
    s = preset.schedule
    assert (s.kind, s.num_train_timesteps, s.beta_schedule, s.beta_start, s.beta_end) == (
        "ddpm",
        1000,
        "scaled_linear_beta",
        0.0015,
        0.0195,
    )


@pytest.mark.parametrize("name", sorted(MASK_PRESETS))
def test_every_mask_preset_has_the_released_shape_and_runs(name):
    """Same interface as MAISI's generator: 8 bit channels in, 125 logits out, 4-channel latent, UNet
    conditioned on a (N, 1, 10) size vector; the field of view is MAISI's 384 mm."""
    preset = MASK_PRESETS[name]
    vae, unet = preset.autoencoder, preset.diffusion_unet
    assert (vae["in_channels"], vae["out_channels"], vae["latent_channels"]) == (8, 125, 4)
    assert vae["use_convtranspose"] and preset.vae_factor == 4
    assert unet["with_conditioning"] and unet["cross_attention_dim"] == 10 and unet["upcast_attention"]
    assert preset.latent_shape[0] == unet["in_channels"] == unet["out_channels"] == 4
    assert preset.mask_shape[0] * preset.spacing_mm == 384.0
    if name == "tiny-mask-ddpm":  # the others are large; their construction is covered by the loads below
        x = torch.randn(1, *preset.latent_shape)
        with torch.no_grad():
            out = build_mask_network(preset, "diffusion_unet")(
                x, timesteps=torch.tensor([3]), context=torch.rand(1, 1, 10)
            )
            logits = build_mask_network(preset, "autoencoder").decode(x)
        assert out.shape == x.shape
        assert logits.shape == (1, 125, *preset.mask_shape)


def test_unknown_mask_preset_suggests_the_closest():
    with pytest.raises(
        InputError, match="unknown mask preset 'tiny-mask-dpm'. Did you mean 'tiny-mask-ddpm'"
    ):
        get_mask_preset("tiny-mask-dpm")


def test_build_uses_monai_classes_and_runtime_options_change_no_weight():
    vae = build_mask_network(TINY, "autoencoder")
    unet = build_mask_network(TINY, "diffusion_unet")
    assert type(vae) is AutoencoderKlMaisi and type(unet) is DiffusionModelUNet
    with pytest.raises(ValueError, match="part must be"):
        build_mask_network(TINY, "controlnet")  # type: ignore[arg-type]


def _released_files(tmp_path, preset=TINY, scale_factor: float | None = 1.0055984258651733):
    """Tiny files saved the way MAISI's are: the VAE a plain state dict, the UNet a dict with its scale."""
    torch.manual_seed(0)
    vae = AutoencoderKlMaisi(**preset.autoencoder, num_splits=1, dim_split=1)
    unet = DiffusionModelUNet(**preset.diffusion_unet)
    torch.save(vae.state_dict(), tmp_path / "mask_generation_autoencoder.pt")
    payload = {"unet_state_dict": unet.state_dict()}
    if scale_factor is not None:
        payload["scale_factor"] = torch.tensor(scale_factor)
    torch.save(payload, tmp_path / "mask_generation_diffusion_unet.pt")
    return (
        vae,
        unet,
        tmp_path / "mask_generation_autoencoder.pt",
        tmp_path / "mask_generation_diffusion_unet.pt",
    )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_released_layouts_load_strictly(tmp_path):
    vae, unet, vae_path, unet_path = _released_files(tmp_path)
    nets = load_mask_networks(TINY, vae_path, unet_path, "cpu")
    assert _same_weights(nets.autoencoder, vae) and _same_weights(nets.diffusion_unet, unet)
    assert nets.scale_factor == pytest.approx(1.0055984258651733)
    assert not nets.autoencoder.training and not nets.diffusion_unet.training


def test_our_checkpoints_load_and_record_the_architecture(tmp_path):
    torch.manual_seed(1)
    vae, unet = build_mask_network(TINY, "autoencoder"), build_mask_network(TINY, "diffusion_unet")
    save_checkpoint(tmp_path / "vae.pt", vae, TINY, "mask_autoencoder")
    save_checkpoint(tmp_path / "unet.pt", unet, TINY, "mask_diffusion_unet", scale_factor=0.75)
    stored = torch.load(tmp_path / "vae.pt", weights_only=True)
    assert stored["part"] == "mask_autoencoder" and stored["preset"] == "tiny-mask-ddpm"
    assert stored["architecture"]["out_channels"] == 125 and "num_splits" not in stored["architecture"]
    nets = load_mask_networks(TINY, tmp_path / "vae.pt", tmp_path / "unet.pt")
    assert _same_weights(nets.autoencoder, vae) and _same_weights(nets.diffusion_unet, unet)
    assert nets.scale_factor == 0.75


def test_checkpoint_of_another_shape_is_refused_naming_file_and_keys(tmp_path):
    small = get_mask_preset("small-mask-ddpm")
    _, _, vae_path, unet_path = _released_files(tmp_path, preset=small)
    with pytest.raises(CheckpointError) as info:
        load_mask_network(TINY, "autoencoder", vae_path)
    message = str(info.value)
    assert (
        str(vae_path) in message
        and "weights do not fit the mask_autoencoder of preset 'tiny-mask-ddpm'" in message
    )
    assert (
        "shape conflicts: encoder.blocks.0.conv.conv.weight: file (16, 8, 3, 3, 3) vs network (8, 8, 3, 3, 3)"
        in (message)
    )
    with pytest.raises(CheckpointError, match="missing in file|unexpected in file|shape conflicts") as info:
        load_mask_networks(TINY, vae_path, unet_path)
    assert str(unet_path) in str(info.value)


def test_our_checkpoint_of_another_preset_is_refused_by_its_architecture(tmp_path):
    small = get_mask_preset("small-mask-ddpm")
    save_checkpoint(tmp_path / "vae.pt", build_mask_network(small, "autoencoder"), small, "mask_autoencoder")
    with pytest.raises(
        CheckpointError,
        match="made for preset 'small-mask-ddpm'(.|\n)*  num_channels: checkpoint \\[16, 32, 64\\] vs preset",
    ):
        load_mask_network(TINY, "autoencoder", tmp_path / "vae.pt")


def test_ct_network_checkpoint_is_not_taken_for_a_mask_network(tmp_path):
    ct = get_preset("tiny-ddpm")
    save_checkpoint(tmp_path / "ct_vae.pt", build_network(ct, "autoencoder"), ct, "autoencoder")
    with pytest.raises(CheckpointError, match="holds a autoencoder checkpoint, expected a mask_autoencoder"):
        load_mask_network(TINY, "autoencoder", tmp_path / "ct_vae.pt")
    torch.save({"controlnet_state_dict": {"w": torch.zeros(1)}}, tmp_path / "controlnet.pt")
    with pytest.raises(CheckpointError, match="released MAISI controlnet checkpoint"):
        load_mask_network(TINY, "diffusion_unet", tmp_path / "controlnet.pt")


def test_unet_file_without_scale_factor_is_refused(tmp_path):
    _, _, vae_path, unet_path = _released_files(tmp_path, scale_factor=None)
    with pytest.raises(
        CheckpointError, match=f"{unet_path}: mask diffusion UNet checkpoint has no scale_factor"
    ):
        load_mask_networks(TINY, vae_path, unet_path)


class _Call:
    """Pickles as a call of ``func(*args)``, as a malicious checkpoint would call ``os.system``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def test_file_holding_code_is_refused_not_run(tmp_path, capsys):
    _, _, vae_path, _ = _released_files(tmp_path)
    evil = tmp_path / "mask_generation_diffusion_unet.pt"
    torch.save({"unet_state_dict": _Call(print, "this would run"), "scale_factor": 1.0}, evil)
    with pytest.raises(CheckpointError, match=f"{evil}: refused: it holds code \\(print\\)"):
        load_mask_networks(TINY, vae_path, evil)
    assert "this would run" not in capsys.readouterr().out
