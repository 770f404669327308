"""``maisi.train mask_autoencoder|mask_diffusion`` and ``maisi.encode`` kind "mask" on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi.checkpoints import read_weights
from maisi.config import load_config
from maisi.data.io import Volume, write_volume
from maisi.distributed import Ranks
from maisi.encode import main as encode_main
from maisi.families.mask import get_mask_preset
from maisi.masks.networks import build_mask_network
from maisi.train import main
from maisi.training.loop import train
from maisi.training.mask_autoencoder import channel_ids, dice_and_accuracy, to_channels, unknown_ids
from maisi.training.mask_diffusion import size_vector_problems
from maisi.training.run import build_stage
from tests.conftest import phantom_mask, write_config

REPO = Path(__file__).resolve().parents[2]
PRESET = "tiny-mask-ddpm"
SIZES = [[0.5, 0.2, -1, -1, -1, -1, -1, -1, -1, -1], [0.1, 0.9, -1, 0.3, -1, -1, -1, -1, -1, -1]]
AFFINE = np.diag([6.0, 6.0, 6.0, 1.0])


def _write_cases(folder: Path, count: int = 3, shape=(32, 32, 24)) -> Path:
    """``count`` shifted phantom masks (body 200, liver 1, lung lobe 28) with folds and size vectors."""
    entries = []
    for i in range(count):
        mask = np.roll(phantom_mask(shape), 2 * i, axis=0)
        write_volume(folder / f"c{i}" / "label.nii.gz", Volume(mask, AFFINE))
        write_volume(folder / f"c{i}" / "ct.nii.gz", Volume(np.full(shape, -1000, np.int16), AFFINE))
        entries.append(
            {
                "image": f"c{i}/ct.nii.gz",
                "label": f"c{i}/label.nii.gz",
                "fold": i,
                "anatomy_size": SIZES[i % 2],
            }
        )
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return path


@pytest.fixture(scope="module")
def mask_cases(tmp_path_factory) -> Path:
    return _write_cases(tmp_path_factory.mktemp("mask_cases"))


def _train_config(path: Path, datalist: Path, output_dir: Path, **changes) -> Path:
    data = {
        "preset": PRESET,
        "datalist": str(datalist),
        "output_dir": str(output_dir),
        "steps": 3,
        "fold": 0,
        "checkpoint_every": 2,
        "validate_every": 2,
        "device": "cpu",
        "mask_autoencoder": {"patch_size": [16, 16, 16], "val_roi_size": [16, 16, 16]},
    }
    data.update(changes)
    return write_config(path, data)


@pytest.fixture(scope="module")
def mask_vae(mask_cases, tmp_path_factory) -> Path:
    """A mask VAE trained for 3 steps by ``maisi.train mask_autoencoder`` (the stage's own export)."""
    folder = tmp_path_factory.mktemp("mask_vae")
    config = _train_config(folder / "train.json", mask_cases, folder / "run")
    assert main(["mask_autoencoder", "--config", str(config)]) == 0
    return folder / "run" / "mask_autoencoder.pt"


def _encode_config(folder: Path, datalist: Path, vae: Path, **changes) -> Path:
    data = {
        "kind": "mask",
        "preset": PRESET,
        "autoencoder": str(vae),
        "datalist": str(datalist),
        "output_dir": str(folder / "emb"),
        "device": "cpu",
    }
    data.update(changes)
    return write_config(folder / "encode.json", data)


@pytest.fixture(scope="module")
def mask_latents(mask_cases, mask_vae, tmp_path_factory) -> Path:
    """The phantom masks encoded with kind "mask": returns the latent datalist."""
    folder = tmp_path_factory.mktemp("mask_latents")
    assert encode_main(["--config", str(_encode_config(folder, mask_cases, mask_vae))]) == 0
    return folder / "emb" / "datalist.json"


def _state_dicts_equal(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a, weights_only=True)["state_dict"], torch.load(b, weights_only=True)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ pure pieces


def test_channel_table_maps_maisi_ids_to_the_125_channels_and_names_the_others():
    ids = channel_ids()
    assert len(ids) == 125 and ids[0] == 0 and ids[1] == 1 and ids[2] == 3 and ids[124] == 200
    mask = np.array([[[0, 1, 3, 200, 132]]], dtype=np.uint8)
    assert to_channels(mask).tolist() == [[[0, 1, 2, 124, 123]]]
    assert channel_ids()[to_channels(mask)].tolist() == mask.tolist()  # and back
    assert unknown_ids(np.array([0, 1, 2, 250, 300, -1])) == [-1, 2, 250, 300]  # 2: MAISI's dummy slot
    assert unknown_ids(mask) == []


def test_dice_and_accuracy_count_each_foreground_class_of_the_reference():
    target = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 2, 0, 0])
    scores = dice_and_accuracy(target, predicted, classes=125)
    # class 1: 2 * 2 / (2 + 3); class 2: 2 * 2 / (4 + 2); background is not a class here
    assert scores["dice"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert scores["accuracy"] == pytest.approx(5 / 8)


def test_size_vectors_are_ten_sizes_in_0_1_or_minus_1():
    assert size_vector_problems(SIZES[0], "$.x") == []
    assert size_vector_problems([0.5] * 9, "$.x") == [
        "$.x: [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5] is not a list of 10 sizes"
    ]
    bad = [0.5, 1.2, -0.5, "a", -1, 0, 1, 0, 0, float("nan")]
    assert size_vector_problems(bad, "$.x") == [
        "$.x[1]: 1.2 is neither a size in [0, 1] nor -1 (absent)",
        "$.x[2]: -0.5 is neither a size in [0, 1] nor -1 (absent)",
        "$.x[3]: 'a' is neither a size in [0, 1] nor -1 (absent)",
        "$.x[9]: nan is neither a size in [0, 1] nor -1 (absent)",
    ]


# ------------------------------------------------------------------------------------- mask_autoencoder


def test_mask_autoencoder_writes_a_checkpoint_that_loads_strictly(mask_vae, caplog):
    run = mask_vae.parent
    weights = read_weights(mask_vae, "mask_autoencoder")
    preset = get_mask_preset(PRESET)
    assert weights.preset == PRESET and weights.architecture["out_channels"] == 125
    network = build_mask_network(preset, "autoencoder")
    network.load_state_dict(weights.state_dict, strict=True)
    logits = network.reconstruct(torch.zeros(1, 8, 16, 16, 16))
    assert logits.shape == (1, 125, 16, 16, 16) and torch.isfinite(logits).all()
    assert (run / "state" / "last.pt").is_file() and any((run / "tensorboard").iterdir())
    assert json.loads((run / "train_config.json").read_text())["stage"] == "mask_autoencoder"


def test_mask_autoencoder_logs_validation_dice_and_accuracy(mask_cases, tmp_path, caplog):
    config = _train_config(tmp_path / "t.json", mask_cases, tmp_path / "run", steps=2, tensorboard=False)
    assert main(["mask_autoencoder", "--config", str(config)]) == 0
    assert "step 2 validation: dice" in caplog.text and "accuracy" in caplog.text


def test_mask_autoencoder_resumed_run_equals_the_uninterrupted_one(mask_cases, tmp_path):
    common = {"steps": 4, "tensorboard": False}
    straight = _train_config(tmp_path / "a.json", mask_cases, tmp_path / "a", **common)
    assert main(["mask_autoencoder", "--config", str(straight)]) == 0
    first = _train_config(tmp_path / "b.json", mask_cases, tmp_path / "b", **dict(common, steps=2))
    assert main(["mask_autoencoder", "--config", str(first)]) == 0
    state = torch.load(tmp_path / "b" / "state" / "last.pt", weights_only=True)
    assert state["step"] == 2
    more = _train_config(tmp_path / "b.json", mask_cases, tmp_path / "b", **common)
    assert main(["mask_autoencoder", "--config", str(more), "--resume"]) == 0
    assert torch.load(tmp_path / "b" / "state" / "last.pt", weights_only=True)["step"] == 4
    assert _state_dicts_equal(tmp_path / "a" / "mask_autoencoder.pt", tmp_path / "b" / "mask_autoencoder.pt")


def test_mask_autoencoder_learns_one_mask(mask_cases, tmp_path):
    data = json.loads(mask_cases.read_text())
    one = {"training": [dict(data["training"][0], fold=0), dict(data["training"][0], fold=1)]}
    datalist = mask_cases.parent / "one.json"
    datalist.write_text(json.dumps(one))
    path = _train_config(
        tmp_path / "one.json",
        datalist,
        tmp_path / "run",
        steps=12,
        tensorboard=False,
        checkpoint_every=100,
        validate_every=100,
        optimizer={"lr": 0.003},
        mask_autoencoder={"patch_size": [16, 16, 16], "val_roi_size": [32, 32, 24]},
    )
    config = load_config(path, "train")
    stage = build_stage("mask_autoencoder", config, Ranks(), torch.device("cpu"))
    before = stage.validate(stage.model)[0]
    train(stage, config, Ranks(), torch.device("cpu"), "test", None)
    after = stage.validate(stage.model)[0]
    assert after["accuracy"] > before["accuracy"] + 0.2 and after["dice"] > before["dice"] + 0.05


def test_mask_autoencoder_resamples_the_masks_to_the_configured_spacing(mask_cases, tmp_path):
    changes = {"patch_size": [16, 16, 16], "val_roi_size": [16, 16, 16], "spacing": [12.0, 12.0, 12.0]}
    path = _train_config(tmp_path / "t.json", mask_cases, tmp_path / "run", mask_autoencoder=changes)
    stage = build_stage("mask_autoencoder", load_config(path, "train"), Ranks(), torch.device("cpu"))
    held = stage.val_volumes[0]  # 32 x 32 x 24 at 6 mm -> 16 x 16 x 12 at 12 mm, ids kept
    assert held.shape == (1, 16, 16, 12) and held.dtype == torch.uint8
    assert sorted(channel_ids()[held.unique().numpy()].tolist()) == [0, 1, 28, 200]
    assert stage.volumes[0].shape == (1, 16, 16, 16)  # training masks padded to the patch


def test_two_process_torchrun_mask_autoencoder_writes_one_checkpoint(mask_cases, tmp_path):
    config = _train_config(tmp_path / "t.json", mask_cases, tmp_path / "run", steps=2, tensorboard=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547"]
    cmd += ["-m", "maisi.train", "mask_autoencoder", "--config", str(config)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # each process draws from its own share of the 2 training masks; rank 0 alone validates and writes
    assert done.stderr.count("1 training and 1 validation masks") == 2
    assert done.stderr.count("step 2 validation: dice") == 1
    weights = read_weights(tmp_path / "run" / "mask_autoencoder.pt", "mask_autoencoder")
    build_mask_network(get_mask_preset(PRESET), "autoencoder").load_state_dict(
        weights.state_dict, strict=True
    )


# ------------------------------------------------------------------------------------------ mask_diffusion


def test_mask_diffusion_trains_on_mask_latents_and_saves_its_scale_factor(mask_latents, tmp_path, caplog):
    config = _train_config(tmp_path / "d.json", mask_latents, tmp_path / "run")
    assert main(["mask_diffusion", "--config", str(config)]) == 0
    run = tmp_path / "run"
    weights = read_weights(run / "mask_diffusion_unet.pt", "mask_diffusion_unet")
    assert weights.scale_factor is not None and weights.scale_factor > 0
    assert "scale_factor = 1 / std of the training mask latents" in caplog.text
    assert "step 2 validation: loss" in caplog.text
    unet = build_mask_network(get_mask_preset(PRESET), "diffusion_unet")
    unet.load_state_dict(weights.state_dict, strict=True)
    out = unet(torch.zeros(1, 4, 8, 8, 6), torch.tensor([10]), context=torch.tensor([[SIZES[0]]]))
    assert out.shape == (1, 4, 8, 8, 6)
    assert (run / "state" / "last.pt").is_file() and any((run / "tensorboard").iterdir())


def test_mask_diffusion_resumed_run_equals_the_uninterrupted_one(mask_latents, tmp_path):
    common = {"steps": 4, "tensorboard": False}
    straight = _train_config(tmp_path / "a.json", mask_latents, tmp_path / "a", **common)
    assert main(["mask_diffusion", "--config", str(straight)]) == 0
    first = _train_config(tmp_path / "b.json", mask_latents, tmp_path / "b", **dict(common, steps=2))
    assert main(["mask_diffusion", "--config", str(first)]) == 0
    more = _train_config(tmp_path / "b.json", mask_latents, tmp_path / "b", **common)
    assert main(["mask_diffusion", "--config", str(more), "--resume"]) == 0
    a, b = tmp_path / "a" / "mask_diffusion_unet.pt", tmp_path / "b" / "mask_diffusion_unet.pt"
    assert _state_dicts_equal(a, b)
    assert (
        read_weights(a, "mask_diffusion_unet").scale_factor
        == read_weights(b, "mask_diffusion_unet").scale_factor
    )


def test_mask_diffusion_finetunes_from_its_checkpoint_keeping_the_scale_factor(mask_latents, tmp_path):
    first = _train_config(tmp_path / "a.json", mask_latents, tmp_path / "a", steps=2, tensorboard=False)
    assert main(["mask_diffusion", "--config", str(first)]) == 0
    trained = tmp_path / "a" / "mask_diffusion_unet.pt"
    init = {"mask_diffusion_unet": str(trained)}
    again = _train_config(tmp_path / "b.json", mask_latents, tmp_path / "b", steps=2, init=init)
    assert main(["mask_diffusion", "--config", str(again)]) == 0
    finetuned = tmp_path / "b" / "mask_diffusion_unet.pt"
    assert (
        read_weights(finetuned, "mask_diffusion_unet").scale_factor
        == read_weights(trained, "mask_diffusion_unet").scale_factor
    )
    assert not _state_dicts_equal(trained, finetuned)


# ------------------------------------------------------------------------------------------ encode kind mask


def test_encode_kind_mask_writes_quarter_size_latents_and_sidecars_with_sizes(mask_latents, mask_cases):
    entries = json.loads(mask_latents.read_text())["training"]
    assert [e["anatomy_size"] for e in entries] == [SIZES[0], SIZES[1], SIZES[0]]
    assert [e["fold"] for e in entries] == [0, 1, 2]
    from maisi.data.latents import read_latent, read_sidecar

    for entry in entries:
        latent = mask_latents.parent / entry["image"]
        data, affine = read_latent(latent)
        assert data.shape == (4, 32 // 4, 32 // 4, 24 // 4) and np.isfinite(data).all()
        assert np.allclose(np.diag(affine)[:3], [24.0, 24.0, 24.0])  # 4 mask voxels of 6 mm
        sidecar = read_sidecar(latent)
        assert sidecar["kind"] == "mask" and sidecar["latent_shape"] == [4, 8, 8, 6]
        assert sidecar["anatomy_size"] == entry["anatomy_size"] and sidecar["label_ids"] == [0, 1, 28, 200]
        assert entry["label"] is None  # nothing but the latent is written


def test_encode_kind_mask_rerun_skips_finished_cases_and_redoes_changed_sizes(
    mask_cases, mask_vae, tmp_path, caplog
):
    config = _encode_config(tmp_path, mask_cases, mask_vae)
    assert encode_main(["--config", str(config)]) == 0
    assert encode_main(["--config", str(config)]) == 0
    assert "0 encoded, 3 skipped" in caplog.text
    data = json.loads(mask_cases.read_text())
    data["training"][1]["anatomy_size"] = SIZES[0]
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(data))
    # the datalist moved: its paths are read relative to the original folder
    config = _encode_config(tmp_path, changed, mask_vae, data_root=str(mask_cases.parent))
    assert encode_main(["--config", str(config)]) == 0
    assert "1 encoded, 2 skipped" in caplog.text
    entries = json.loads((tmp_path / "emb" / "datalist.json").read_text())["training"]
    assert entries[1]["anatomy_size"] == SIZES[0]


# ------------------------------------------------------------------------------------------ bad input


def _bad_mask_datalist(folder: Path, mask_cases: Path, change: str) -> Path:
    data = json.loads(mask_cases.read_text())
    entry = data["training"][1]
    if change == "no label":
        entry.pop("label")
    elif change == "unknown id":
        mask = phantom_mask((32, 32, 24))
        mask[10:12, 10:12, 10:12] = 250
        write_volume(folder / "bad" / "label.nii.gz", Volume(mask, AFFINE))
        entry["label"] = str(folder / "bad" / "label.nii.gz")
    path = folder / "bad.json"
    path.write_text(json.dumps(data))
    return path


def _bad_latent_datalist(folder: Path, mask_latents: Path, change: str) -> Path:
    from maisi.data.latents import read_sidecar, write_sidecar

    data = json.loads(mask_latents.read_text())
    entry = data["training"][1]
    entry.pop("anatomy_size")
    if change == "bad size in sidecar":  # the datalist schema refuses it in the entry itself
        latent = mask_latents.parent / entry["image"]
        copy = folder / "copy_emb.nii.gz"
        copy.write_bytes(latent.read_bytes())
        sidecar = dict(read_sidecar(latent), anatomy_size=[0.5, 2.0] + [-1] * 8)
        write_sidecar(copy, sidecar)
        entry["image"] = str(copy)
    elif change == "no size":
        latent = mask_latents.parent / entry["image"]
        copy = folder / "copy_emb.nii.gz"
        copy.write_bytes(latent.read_bytes())
        sidecar = read_sidecar(latent)
        sidecar.pop("anatomy_size")
        write_sidecar(copy, sidecar)
        entry["image"] = str(copy)
    for e in data["training"]:
        e["image"] = str(mask_latents.parent / e["image"])
    path = folder / "bad.json"
    path.write_text(json.dumps(data))
    return path


BAD_INPUTS = [
    ("mask_autoencoder", "no label", "$.training[1].label (training): missing"),
    ("mask_autoencoder", "unknown id", "holds label id(s) [250] that the mask VAE has no channel for"),
    ("mask_autoencoder", "CT preset", "$.preset: 'tiny-ddpm' is a CT preset; the mask_autoencoder stage"),
    ("mask_diffusion", "no size", "$.training[1].anatomy_size: missing in the entry and the sidecar"),
    ("mask_diffusion", "bad size in sidecar", "$.training[1].anatomy_size[1]: 2.0 is neither a size"),
    ("mask_diffusion", "CT latents", "is not a mask latent (its sidecar says kind 'image')"),
    ("diffusion", "mask preset", "$.preset: 'tiny-mask-ddpm' is a mask preset; the diffusion stage"),
]


@pytest.mark.parametrize("stage, change, message", BAD_INPUTS, ids=[f"{s}-{c}" for s, c, _ in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_case_and_writes_nothing(
    stage, change, message, mask_cases, mask_latents, encoded_cases, tmp_path, capsys
):
    changes: dict = {}
    if change == "CT preset":
        datalist, changes["preset"] = mask_cases, "tiny-ddpm"
    elif change == "mask preset":
        datalist = encoded_cases
    elif change == "CT latents":
        datalist = encoded_cases
    elif stage == "mask_autoencoder":
        datalist = _bad_mask_datalist(tmp_path, mask_cases, change)
        changes["data_root"] = str(mask_cases.parent)
    else:
        datalist = _bad_latent_datalist(tmp_path, mask_latents, change)
    config = _train_config(tmp_path / "bad_config.json", datalist, tmp_path / "run", **changes)
    assert main([stage, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
