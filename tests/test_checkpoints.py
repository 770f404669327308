"""Checkpoints: our format round-trips; the released MAISI layouts load; mismatches are explained briefly."""

from __future__ import annotations

import pickle

import pytest
import torch

from maisi.checkpoints import load_network, read_weights, save_checkpoint
from maisi.errors import CheckpointError
from maisi.networks import build_network, get_preset


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_format_round_trips_strictly_with_its_metadata(tmp_path):
    preset = get_preset("tiny-rflow")
    torch.manual_seed(1)
    unet = build_network(preset, "diffusion_unet")
    path = save_checkpoint(tmp_path / "unet.pt", unet, preset, "diffusion_unet", scale_factor=0.87, config_sha256="ab")
    loaded, weights = load_network(preset, "diffusion_unet", path)
    assert _same_weights(unet, loaded)
    assert weights.source_format == "maisi" and weights.scale_factor == pytest.approx(0.87)
    raw = torch.load(path, weights_only=True)
    assert raw["preset"] == "tiny-rflow" and raw["architecture"]["num_channels"] == [16, 32, 32]
    assert raw["provenance"]["config_sha256"] == "ab" and raw["provenance"]["torch_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["unet.pt"]  # no temporary file left


@pytest.mark.parametrize("preset_name", ["tiny-ddpm", "maisi-ct-rflow"])
def test_released_layouts_load(tmp_path, preset_name):
    """Files shaped like MAISI's releases (random weights): VAE state_dict, unet_state_dict, controlnet_state_dict."""
    preset = get_preset(preset_name)
    torch.manual_seed(2)
    vae = build_network(preset, "autoencoder")
    torch.save(vae.state_dict(), tmp_path / "autoencoder_v1.pt")
    loaded, w = load_network(preset, "autoencoder", tmp_path / "autoencoder_v1.pt")
    assert w.source_format == "released-vae" and _same_weights(vae, loaded)
    if preset_name.startswith("maisi"):
        return  # the big UNet/ControlNet layouts are exercised with the tiny preset
    unet = build_network(preset, "diffusion_unet")
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.4123), "epoch": 3,
                "loss": 0.1, "num_train_timesteps": 1000}, tmp_path / "diff_unet.pt")  # fmt: skip
    loaded, w = load_network(preset, "diffusion_unet", tmp_path / "diff_unet.pt")
    assert w.source_format == "released-unet" and w.scale_factor == pytest.approx(1.4123)
    assert _same_weights(unet, loaded)
    control = build_network(preset, "controlnet")
    torch.save({"controlnet_state_dict": control.state_dict(), "epoch": 1}, tmp_path / "controlnet.pt")
    loaded, w = load_network(preset, "controlnet", tmp_path / "controlnet.pt")
    assert w.source_format == "released-controlnet" and _same_weights(control, loaded)


def test_other_architecture_is_refused_with_a_short_message(tmp_path, tiny_checkpoints):
    with pytest.raises(CheckpointError) as info:
        load_network(get_preset("tiny-ddpm"), "diffusion_unet", tiny_checkpoints["tiny-rflow"]["diffusion_unet"])
    message = str(info.value)
    assert "made for preset 'tiny-rflow'" in message and "num_class_embeds" in message
    assert len(message.splitlines()) <= 10


def test_plain_state_dict_of_another_architecture_names_keys_and_shapes(tmp_path):
    torch.save(build_network(get_preset("small-rflow"), "autoencoder").state_dict(), tmp_path / "vae.pt")
    with pytest.raises(CheckpointError) as info:
        load_network(get_preset("tiny-rflow"), "autoencoder", tmp_path / "vae.pt")
    message = str(info.value)
    assert "shape conflicts" in message and "file (32, 1, 3, 3, 3) vs network (8, 1, 3, 3, 3)" in message
    assert len(message.splitlines()) <= 6


def test_checkpoint_of_another_part_is_named(tmp_path, tiny_checkpoints):
    with pytest.raises(CheckpointError, match="holds a controlnet checkpoint, expected a diffusion_unet"):
        read_weights(tiny_checkpoints["tiny-rflow"]["controlnet"], "diffusion_unet")
    torch.save({"unet_state_dict": {"w": torch.zeros(1)}}, tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match="released MAISI diffusion_unet checkpoint"):
        read_weights(tmp_path / "u.pt", "autoencoder")


class _Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_files_holding_code_are_refused_not_executed(tmp_path, capsys):
    torch.save({"state_dict": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        read_weights(tmp_path / "evil.pt", "autoencoder")
    assert "this would run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, fragment",
    [(None, "checkpoint not found"), (b"not a zip", "not a readable PyTorch checkpoint"),
     (pickle.dumps(0), "not a readable PyTorch checkpoint")],
)  # fmt: skip
def test_missing_or_garbage_files(tmp_path, content, fragment):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment):
        read_weights(path, "autoencoder")


def test_unrecognised_layout_lists_its_keys(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint layout \(dict with keys \['epoch', 'model'\]"):
        read_weights(tmp_path / "x.pt", "autoencoder")


def test_sha256_of_files_and_folders(tmp_path):
    import hashlib

    from maisi.checkpoints import file_sha256

    (tmp_path / "a.bin").write_bytes(b"abc")
    assert file_sha256(tmp_path / "a.bin") == hashlib.sha256(b"abc").hexdigest()
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"one")
    before = file_sha256(series)
    (series / "1.dcm").write_bytes(b"two")
    assert file_sha256(series) != before  # a DICOM folder's content is part of its identity
