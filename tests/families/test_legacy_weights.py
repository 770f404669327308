"""Strict conversion of old GenerativeModels state dicts: counts of the released files' layout, a synthetic
old-format round trip with equal outputs, refusals naming the key, and (opt-in) the real released files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from maisi.errors import CheckpointError, InputError
from maisi.families.ldm import LDM_PRESETS, build_ldm_network, build_ldm_networks, get_ldm_preset
from maisi.families.legacy_weights import (
    convert_legacy_state_dict,
    dead_legacy_keys,
    legacy_key_map,
    load_legacy_state_dict,
    read_legacy_weights,
)

REPO = Path(__file__).resolve().parents[2]
SEED_WEIGHTS_ENV = "MAISI_SEED_WEIGHTS"

# (preset, part) -> (parameters, keys) of the released files (old layout), from seed_ldms.md section 2
OLD_COUNTS = {
    ("brats-2d-ldm", "autoencoder"): (12_283_080, 182),
    ("brats-2d-ldm", "diffusion_unet"): (15_890_753, 432),
    ("brats-3d-ldm", "autoencoder"): (21_000_353, 130),
    ("brats-3d-ldm", "diffusion_unet"): (191_230_472, 318),
    ("cxr-text-ldm", "autoencoder"): (4_607_848, 162),
    ("cxr-text-ldm", "diffusion_unet"): (263_636_995, 496),
}


def to_old_layout(network: torch.nn.Module, proj_attn: bool = True) -> dict[str, torch.Tensor]:
    """``network``'s state dict in the GenerativeModels layout, with the dead ``proj_attn`` of every
    self-attention block (random values: the old code never applied them)."""
    new = network.state_dict()
    old = {legacy_key_map(new)[k]: v for k, v in new.items()}
    if proj_attn:
        for key in dead_legacy_keys(new):
            block = key.rsplit(".", 2)[0]
            c = new[f"{block}.norm.weight"].shape[0]
            shape = (c, c) if key.endswith("weight") else (c,)
            old[key] = torch.randn(shape, device=new[f"{block}.norm.weight"].device)
    return old


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # MONAI zero-initialises output layers: give every weight a value of its own
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize(("name", "part"), list(OLD_COUNTS))
def test_old_layout_of_the_released_networks_has_the_published_counts(name, part):
    old = to_old_layout(build_ldm_network(get_ldm_preset(name), part, device="meta"))
    params, keys = OLD_COUNTS[name, part]
    assert (sum(t.numel() for t in old.values()), len(old)) == (params, keys)


def test_old_names_are_the_generative_models_ones():
    ae, unet = build_ldm_networks(get_ldm_preset("brats-2d-ldm"), device="meta")
    old_ae, old_unet = to_old_layout(ae), to_old_layout(unet)
    for key in (
        "encoder.blocks.10.to_q.weight",
        "encoder.blocks.10.proj_attn.bias",
        "decoder.blocks.2.to_v.bias",
    ):
        assert key in old_ae
    assert "decoder.blocks.6.conv.conv.weight" in old_ae  # upsample conv, postconv in MONAI 1.6
    for key in (
        "middle_block.attention.to_k.weight",
        "middle_block.attention.proj_attn.weight",
        "up_blocks.0.upsampler.conv.conv.weight",
    ):
        assert key in old_unet
    assert not [k for k in (*old_ae, *old_unet) if ".attn." in k or "postconv" in k or "out_proj" in k]
    old_cxr = to_old_layout(
        build_ldm_network(get_ldm_preset("cxr-text-ldm"), "diffusion_unet", device="meta")
    )
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight" in old_cxr
    assert not dead_legacy_keys(old_cxr)  # cross-attention transformers only: nothing is dropped


@pytest.mark.parametrize("name", ["tiny-ldm-2d", "tiny-ldm-3d", "tiny-text-ldm-2d"])
@pytest.mark.parametrize("ddp", [False, True])
def test_synthetic_old_weights_convert_strictly_and_give_the_same_outputs(name, ddp):
    preset = get_ldm_preset(name)
    torch.manual_seed(0)
    ae, unet = (randomised(n) for n in build_ldm_networks(preset))
    torch.manual_seed(1)
    ae2, unet2 = (n.eval() for n in build_ldm_networks(preset))  # other random weights
    image = torch.rand(1, 1, *preset.output_shape)
    z = torch.randn(1, *preset.latent_shape)
    inputs = {"context": torch.randn(1, 4, preset.context_width)} if preset.takes_prompts else {}
    for src, dst in ((ae, ae2), (unet, unet2)):
        old = to_old_layout(src)
        if ddp:
            old = {f"module.{k}": v for k, v in old.items()}
        load_legacy_state_dict(dst, old, source="synthetic.pt")
    with torch.no_grad():
        assert torch.allclose(ae.reconstruct(image), ae2.reconstruct(image))
        t = torch.tensor([321])
        assert torch.allclose(unet(x=z, timesteps=t, **inputs), unet2(x=z, timesteps=t, **inputs))


def test_conversion_agrees_with_monais_loader_where_that_one_is_exact():
    """MONAI's lenient load_old_state_dict, with include_fc=False, drops proj_attn too: same weights."""
    preset = get_ldm_preset("tiny-ldm-2d")
    torch.manual_seed(0)
    sources = [randomised(n) for n in build_ldm_networks(preset)]
    for src, ours, monais in zip(sources, build_ldm_networks(preset), build_ldm_networks(preset)):
        load_legacy_state_dict(ours, to_old_layout(src))
        monais.load_old_state_dict(to_old_layout(src))
        theirs = monais.state_dict()
        assert list(ours.state_dict()) == list(theirs)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, theirs[k]) and torch.equal(v, src.state_dict()[k]), k


def test_network_with_include_fc_is_refused_with_the_reason():
    preset = get_ldm_preset("tiny-ldm-2d")
    kwargs = dict(preset.diffusion_unet, include_fc=True)
    from monai.networks.nets import DiffusionModelUNet

    old = to_old_layout(build_ldm_network(preset, "diffusion_unet", device="meta"))
    with pytest.raises(
        CheckpointError, match=r"no old counterpart: '.*attn\.out_proj\.weight'.*include_fc=False"
    ):
        convert_legacy_state_dict(old, DiffusionModelUNet(**kwargs), source="old.pt")


def _old_tiny_unet() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    net = build_ldm_network(get_ldm_preset("tiny-ldm-2d"), "diffusion_unet")
    return net, to_old_layout(net)


def test_missing_key_is_refused_naming_it():
    net, old = _old_tiny_unet()
    del old["up_blocks.0.upsampler.conv.conv.weight"]
    with pytest.raises(
        InputError,
        match=r"old\.pt does not fit the network: 1 key\(s\) missing from the file: "
        r"'up_blocks\.0\.upsampler\.conv\.conv\.weight "
        r"\(for up_blocks\.0\.upsampler\.postconv\.conv\.weight\)'",
    ):
        load_legacy_state_dict(net, old, source="old.pt")


def test_extra_key_is_refused_naming_it_and_proj_attn_is_dropped_only_in_attention_blocks():
    net, old = _old_tiny_unet()
    old["time_embed.0.proj_attn.weight"] = torch.zeros(3)  # a proj_attn outside an attention block
    old["conv_out.extra"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"2 key\(s\) of the file that the network does not have: 'time_embed\.0\.proj_attn\.weight', "
        r"'conv_out\.extra'",
    ):
        convert_legacy_state_dict(old, net, source="old.pt")


def test_shape_mismatch_names_key_and_both_shapes():
    net, old = _old_tiny_unet()
    old["conv_in.conv.weight"] = torch.zeros(8, 2, 3, 3)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch\(es\): 'conv_in\.conv\.weight' has shape \(8, 2, 3, 3\), "
        r"the network's 'conv_in\.conv\.weight' \(8, 1, 3, 3\)",
    ):
        convert_legacy_state_dict(old, net)


def test_weights_files_are_read_without_unpickling_code(tmp_path):
    net, old = _old_tiny_unet()
    torch.save(old, tmp_path / "model.pt")
    load_legacy_state_dict(net, read_legacy_weights(tmp_path / "model.pt"))
    torch.save({"state_dict": old, "epoch": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match="not a plain state dict of tensors"):
        read_legacy_weights(tmp_path / "wrapped.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(CheckpointError, match="not a readable torch weights file"):
        read_legacy_weights(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_legacy_weights(tmp_path / "absent.pt")


def _released_files() -> list[tuple[str, str, str, str | None]]:
    """(preset, part, local file, md5 or None) of every released file, from the download manifest."""
    manifest = json.loads((REPO / "maisi" / "resources" / "released_weights.json").read_text())
    md5s = manifest.get("published_md5", {})
    out = []
    for name, preset in LDM_PRESETS.items():
        if preset.released_variant is None:
            continue
        files = manifest["variants"][preset.released_variant]["files"]
        for part, f in zip(("autoencoder", "diffusion_unet"), files):
            md5 = md5s.get(f"{f['repo']}/{f['path']}", {}).get("md5")
            out.append((name, part, f.get("save_as") or Path(f["path"]).name, md5))
    return out


@pytest.mark.released
@pytest.mark.parametrize(("name", "part", "local", "md5"), _released_files())
def test_released_file_loads_strictly_and_steps(name, part, local, md5):
    """Opt-in (-m released): MAISI_SEED_WEIGHTS=<the --dest of python -m maisi.download>."""
    folder = os.environ.get(SEED_WEIGHTS_ENV)
    if not folder:
        pytest.skip(f"set {SEED_WEIGHTS_ENV} to the folder python -m maisi.download --variant wrote into")
    path = Path(folder) / local
    if not path.is_file():
        pytest.skip(f"{path} is not there (python -m maisi.download --dest {folder} fetches it)")
    if md5 is not None:
        assert hashlib.md5(path.read_bytes()).hexdigest() == md5
    preset = get_ldm_preset(name)
    state = read_legacy_weights(path)
    assert (sum(t.numel() for t in state.values()), len(state)) == OLD_COUNTS[name, part]
    net = build_ldm_network(preset, part)
    load_legacy_state_dict(net, state, source=str(path))
    torch.manual_seed(0)
    with torch.no_grad():
        if part == "autoencoder":
            if preset.spatial_dims == 3:
                pytest.skip("a 3D autoencoder pass is GPU work (seed_ldms.md: 431 s on CPU)")
            out = net.reconstruct(torch.rand(1, 1, *preset.output_shape))
        else:
            inputs = {}
            if preset.takes_prompts:
                inputs["context"] = torch.randn(1, preset.text_context_length, preset.context_width)
            out = net(x=torch.randn(1, *preset.latent_shape), timesteps=torch.tensor([500]), **inputs)
    assert torch.isfinite(out).all()
