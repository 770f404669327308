"""Checkpoints: our format round-trips; the released MAISI layouts load; mismatches are explained briefly."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch

from maisi.checkpoints import (
    code_in_pickle_error,
    load_network,
    read_plain_state_dict,
    read_weights,
    save_checkpoint,
)
from maisi.errors import CheckpointError
from maisi.families.ct import get_preset
from maisi.families.networks import build_network


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_format_round_trips_strictly_with_its_metadata(tmp_path):
    preset = get_preset("tiny-rflow")
    torch.manual_seed(1)
    unet = build_network(preset, "diffusion_unet")
    path = save_checkpoint(
        tmp_path / "unet.pt", unet, preset, "diffusion_unet", scale_factor=0.87, config_sha256="ab"
    )
    loaded, weights = load_network(preset, "diffusion_unet", path)
    assert _same_weights(unet, loaded)
    assert weights.source_format == "maisi" and weights.scale_factor == pytest.approx(0.87)
    raw = torch.load(path, weights_only=True)
    assert raw["preset"] == "tiny-rflow" and raw["architecture"]["num_channels"] == [16, 32, 32]
    assert raw["provenance"]["config_sha256"] == "ab" and raw["provenance"]["torch_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["unet.pt"]  # no temporary file left


@pytest.mark.parametrize("preset_name", ["tiny-ddpm", "maisi-ct-rflow"])
def test_released_layouts_load(tmp_path, preset_name):
    """Files shaped like MAISI's releases (random weights): VAE state_dict, unet_state_dict,
    controlnet_state_dict."""
    preset = get_preset(preset_name)
    torch.manual_seed(2)
    vae = build_network(preset, "autoencoder")
    torch.save(vae.state_dict(), tmp_path / "autoencoder_v1.pt")
    loaded, w = load_network(preset, "autoencoder", tmp_path / "autoencoder_v1.pt")
    assert w.source_format == "released-vae" and _same_weights(vae, loaded)
    if preset_name.startswith("maisi"):
        return  # the big UNet/ControlNet layouts are exercised with the tiny preset
    unet = build_network(preset, "diffusion_unet")
    torch.save(
        {
            "unet_state_dict": unet.state_dict(),
            "scale_factor": torch.tensor(1.4123),
            "epoch": 3,
            "loss": 0.1,
            "num_train_timesteps": 1000,
        },
        tmp_path / "diff_unet.pt",
    )
    loaded, w = load_network(preset, "diffusion_unet", tmp_path / "diff_unet.pt")
    assert w.source_format == "released-unet" and w.scale_factor == pytest.approx(1.4123)
    assert _same_weights(unet, loaded)
    control = build_network(preset, "controlnet")
    torch.save({"controlnet_state_dict": control.state_dict(), "epoch": 1}, tmp_path / "controlnet.pt")
    loaded, w = load_network(preset, "controlnet", tmp_path / "controlnet.pt")
    assert w.source_format == "released-controlnet" and _same_weights(control, loaded)


def test_other_architecture_is_refused_with_a_short_message(tmp_path, tiny_checkpoints):
    with pytest.raises(CheckpointError) as info:
        load_network(
            get_preset("tiny-ddpm"), "diffusion_unet", tiny_checkpoints["tiny-rflow"]["diffusion_unet"]
        )
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


class _Call:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does with ``os.system``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


CALLS = [(print, ("this would run",), "print"), (os.getcwd, (), f"{os.getcwd.__module__}.getcwd")]


@pytest.mark.parametrize("func, args, named", CALLS, ids=["print", "getcwd"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_files_holding_code_are_refused_not_executed(tmp_path, capsys, func, args, named, writer):
    """os.getcwd stands in for os.system: torch refuses both as a GLOBAL of a blocked module ('posix'), a
    wording the refusal used to miss (it said "not a readable PyTorch checkpoint")."""
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"state_dict": _Call(func, *args)}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": _Call(func, *args)}, protocol=2))
    readers = [lambda: read_weights(path, "autoencoder"), lambda: read_plain_state_dict(path, "$.fid.w")]
    for read in readers:
        with pytest.raises(CheckpointError) as info:
            read()
        assert f"{path}: refused: it holds code ({named}), not only weights" in str(info.value)
    assert "this would run" not in capsys.readouterr().out


TORCH_WORDINGS = [
    (
        "Weights only load failed.\n\nTrying to load unsupported GLOBAL posix.system whose module posix is "
        "blocked.",
        "posix.system",
    ),
    (
        "WeightsUnpickler error: Unsupported global: GLOBAL builtins.eval was not an allowed global by "
        "default.",
        "builtins.eval",
    ),
    (
        "Trying to call reduce for unrecognized function <built-in function system> which belongs to "
        "<module 'posix'>",
        "<built-in function system>",
    ),
    (
        "Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got "
        "<class 'evil.Thing'>",
        "<class",
    ),
    ("Unsupported operand 149", None),
    ("Weights only load failed. String is too long", None),
]


@pytest.mark.parametrize("message, named", TORCH_WORDINGS)
def test_torch_refusal_wordings_are_recognised(message, named):
    """torch's wording varies between versions (2.4: 'Unsupported global', 2.6+: blocked modules)."""
    found = code_in_pickle_error(message)
    assert found == named if named is None else found.startswith(named)


_DELETE = object()


def _ours(tmp_path, **changes):
    """A tiny diffusion UNet checkpoint in our format with ``changes`` (``_DELETE``: drop the field)."""
    preset = get_preset("tiny-rflow")
    torch.manual_seed(0)
    unet = build_network(preset, "diffusion_unet")
    path = save_checkpoint(tmp_path / "unet.pt", unet, preset, "diffusion_unet", scale_factor=1.0)
    obj = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is _DELETE:
            del obj[key]
        else:
            obj[key] = value
    torch.save(obj, path)
    return path


POSITIVE = "expected a finite number > 0"
MALFORMED = [
    ("no state_dict", {"state_dict": _DELETE}, "field 'state_dict' is missing"),
    ("state_dict a list", {"state_dict": [1, 2]}, "field 'state_dict' has type list, expected a dict"),
    ("state_dict empty", {"state_dict": {}}, "field 'state_dict' is empty"),
    ("state_dict of numbers", {"state_dict": {"w": 1.0}}, "field 'state_dict' holds entries that are not"),
    ("scale_factor text", {"scale_factor": "0.9"}, "field 'scale_factor' is '0.9' (str), expected a number"),
    ("scale_factor bool", {"scale_factor": True}, "field 'scale_factor' is True (bool), expected a number"),
    ("scale_factor NaN", {"scale_factor": math.nan}, f"field 'scale_factor' is nan, {POSITIVE}"),
    ("scale_factor inf", {"scale_factor": torch.tensor(math.inf)}, f"'scale_factor' is inf, {POSITIVE}"),
    ("scale_factor zero", {"scale_factor": 0.0}, f"field 'scale_factor' is 0.0, {POSITIVE}"),
    ("scale_factor negative", {"scale_factor": -0.5}, f"field 'scale_factor' is -0.5, {POSITIVE}"),
    ("scale_factor vector", {"scale_factor": torch.ones(2)}, "'scale_factor' is a torch.float32 tensor"),
    ("architecture a list", {"architecture": [16, 32]}, "'architecture' has type list, expected a dict"),
    ("preset a number", {"preset": 3}, "field 'preset' has type int, expected a str or null"),
    ("no part", {"part": _DELETE}, "field 'part' is None, expected one of ['autoencoder', 'diffusion_unet'"),
    ("format_version text", {"format_version": "1"}, "field 'format_version' is '1', expected an integer"),
]


@pytest.mark.parametrize("changes, fragment", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_fields_of_our_format_are_named(tmp_path, changes, fragment):
    """These used to end in KeyError / ValueError / AttributeError tracebacks, or (NaN) a blank image."""
    path = _ours(tmp_path, **changes)
    with pytest.raises(CheckpointError) as info:
        load_network(get_preset("tiny-rflow"), "diffusion_unet", path)
    assert str(info.value).startswith(f"{path}: malformed maisi-checkpoint checkpoint: "), info.value
    assert fragment in str(info.value)


def test_newer_format_version_is_refused(tmp_path):
    path = _ours(tmp_path, format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99 is newer than this maisi"):
        read_weights(path, "diffusion_unet")


ONE = {"w": torch.zeros(1)}
RELEASED_MALFORMED = [
    ("unet", {"unet_state_dict": {"w": "x"}}, "field 'unet_state_dict' holds entries that are not named"),
    ("unet", {"unet_state_dict": None}, "field 'unet_state_dict' has type NoneType, expected a dict"),
    ("unet", {"unet_state_dict": ONE, "scale_factor": torch.tensor(math.nan)}, f"is nan, {POSITIVE}"),
    ("unet", {"unet_state_dict": ONE, "scale_factor": "abc"}, "'scale_factor' is 'abc' (str), expected a"),
    ("controlnet", {"controlnet_state_dict": {}, "epoch": 1}, "field 'controlnet_state_dict' is empty"),
]


@pytest.mark.parametrize("kind, obj, fragment", RELEASED_MALFORMED)
def test_malformed_fields_of_released_layouts_are_named(tmp_path, kind, obj, fragment):
    part = {"unet": "diffusion_unet", "controlnet": "controlnet"}[kind]
    path = tmp_path / f"{kind}.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as info:
        read_weights(path, part)
    assert str(info.value).startswith(f"{path}: malformed released MAISI {part} checkpoint: "), info.value
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "checkpoint not found"),
        (b"not a zip", "not a readable PyTorch checkpoint"),
        (pickle.dumps(0), "not a readable PyTorch checkpoint"),
    ],
)
def test_missing_or_garbage_files(tmp_path, content, fragment):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment):
        read_weights(path, "autoencoder")


def test_unrecognised_layout_lists_its_keys(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 1}, tmp_path / "x.pt")
    with pytest.raises(
        CheckpointError, match=r"unrecognised checkpoint layout \(dict with keys \['epoch', 'model'\]"
    ):
        read_weights(tmp_path / "x.pt", "autoencoder")


def test_sha256_of_files_and_folders(tmp_path):
    import hashlib

    from maisi.files import file_sha256

    (tmp_path / "a.bin").write_bytes(b"abc")
    assert file_sha256(tmp_path / "a.bin") == hashlib.sha256(b"abc").hexdigest()
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"one")
    before = file_sha256(series)
    (series / "1.dcm").write_bytes(b"two")
    assert file_sha256(series) != before  # a DICOM folder's content is part of its identity


def test_a_missing_released_file_points_to_the_download_command(tmp_path):
    from maisi.checkpoints import load_network
    from maisi.errors import CheckpointError
    from maisi.families.ct import get_preset

    with pytest.raises(CheckpointError) as info:
        load_network(get_preset("maisi-ct-rflow"), "controlnet", tmp_path / "controlnet_3d_rflow-ct.pt")
    assert f"python -m maisi.download --variant rflow-ct --dest {tmp_path}" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_network(get_preset("tiny-rflow"), "controlnet", tmp_path / "mine.pt")
    assert "maisi.download" not in str(info.value)
