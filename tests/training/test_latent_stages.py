"""``maisi.train diffusion|controlnet`` on tiny networks and real-CT latents."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi.checkpoints import load_network, read_weights
from maisi.config import load_config
from maisi.distributed import Ranks
from maisi.families.ct import get_preset
from maisi.train import main
from maisi.training.controlnet import lesion_weights
from maisi.training.loop import train
from maisi.training.run import build_stage
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def train_config(latent_train_config):
    return partial(latent_train_config, steps=4, fold=0, checkpoint_every=2, validate_every=2)


def _state_dicts_equal(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a, weights_only=True)["state_dict"], torch.load(b, weights_only=True)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diffusion_from_scratch_writes_a_checkpoint_infer_loads(
    train_config, tmp_path, tiny_checkpoints, caplog
):
    config = train_config(init={}, steps=3)
    assert main(["diffusion", "--config", str(config)]) == 0
    run = tmp_path / "run"
    weights = read_weights(run / "diffusion_unet.pt", "diffusion_unet")
    assert weights.scale_factor is not None and weights.scale_factor > 0  # 1 / std of the training latents
    assert "scale_factor = 1 / std" in caplog.text and "step 3 validation: loss" in caplog.text
    assert (run / "state" / "last.pt").is_file() and any((run / "tensorboard").iterdir())
    assert json.loads((run / "train_config.json").read_text())["stage"] == "diffusion"
    infer_cfg = write_config(
        tmp_path / "infer.json",
        {
            "preset": "tiny-rflow",
            "output_size": [32, 32, 16],
            "spacing": [3.0, 3.0, 3.0],
            "device": "cpu",
            "checkpoints": {
                "autoencoder": str(tiny_checkpoints["tiny-rflow"]["autoencoder"]),
                "diffusion_unet": str(run / "diffusion_unet.pt"),
            },
            "sampling": {"num_inference_steps": 2},
            "output": {"dir": str(tmp_path / "gen")},
        },
    )
    from maisi.infer import main as infer_main

    assert infer_main(["--config", str(infer_cfg)]) == 0
    meta = json.loads((tmp_path / "gen" / "sample_seed0.json").read_text())
    assert meta["scale_factor"] == pytest.approx(weights.scale_factor)


def _bar_lines(text: str) -> list[str]:
    return [
        line
        for line in text.replace("\r", "\n").splitlines()
        if any(m in line for m in ("%|", "it/s", "s/it"))
    ]


def test_no_progress_silences_the_training_bar(train_config, tmp_path, capfd):
    shown = train_config("shown.json", output_dir=str(tmp_path / "shown"), steps=1, tensorboard=False)
    assert main(["diffusion", "--config", str(shown)]) == 0
    assert any("diffusion" in line for line in _bar_lines(capfd.readouterr().err))
    quiet = train_config("quiet.json", output_dir=str(tmp_path / "quiet"), steps=1, tensorboard=False)
    assert main(["diffusion", "--config", str(quiet), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert _bar_lines(err) == [], err
    assert (tmp_path / "quiet" / "diffusion_unet.pt").is_file()


@pytest.mark.parametrize("stage", ["diffusion", "controlnet"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(stage, train_config, tmp_path):
    extra = (
        {"controlnet": {"weighted_loss": 10.0, "weighted_loss_label": [1]}} if stage == "controlnet" else {}
    )
    straight = train_config("a.json", output_dir=str(tmp_path / "a"), steps=4, **extra)
    assert main([stage, "--config", str(straight)]) == 0
    first = train_config("b.json", output_dir=str(tmp_path / "b"), steps=2, **extra)
    assert main([stage, "--config", str(first)]) == 0
    # the resumed half reads its latents in two worker processes: the same batches, the same weights
    more = train_config("b.json", output_dir=str(tmp_path / "b"), steps=4, loader={"num_workers": 2}, **extra)
    assert main([stage, "--config", str(more), "--resume"]) == 0
    name = "diffusion_unet.pt" if stage == "diffusion" else "controlnet.pt"
    assert _state_dicts_equal(tmp_path / "a" / name, tmp_path / "b" / name)
    trained = torch.load(tmp_path / "a" / name, weights_only=True)["state_dict"]
    if stage == "diffusion":  # it trained: the weights moved away from the start
        start = torch.load(json.loads(straight.read_text())["init"]["diffusion_unet"], weights_only=True)[
            "state_dict"
        ]
    else:  # the ControlNet started as a copy of the UNet's trunk with zero output convolutions
        start = {k: torch.zeros_like(v) for k, v in trained.items() if k.startswith("controlnet_down_blocks")}
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def _validation_loss(stage) -> float:
    return stage.validate(stage.model)[0]["loss"]


@pytest.mark.parametrize("stage_name", ["diffusion", "controlnet"])
def test_loss_falls_when_overfitting_one_case(stage_name, train_config, tmp_path, encoded_cases, active_unet):
    data = json.loads(encoded_cases.read_text())
    one = {"training": [dict(data["training"][0], fold=0), dict(data["training"][0], fold=1)]}
    datalist = encoded_cases.parent / f"one_{stage_name}.json"
    datalist.write_text(json.dumps(one))
    config = load_config(
        train_config(
            datalist=str(datalist),
            steps=20,
            fold=1,
            checkpoint_every=1000,
            validate_every=1000,
            tensorboard=False,
            optimizer={"lr": 0.003, "grad_clip": None},
        ),
        "train",
    )
    stage = build_stage(stage_name, config, Ranks(), torch.device("cpu"))
    before = _validation_loss(stage)
    train(stage, config, Ranks(), torch.device("cpu"), "test", None)
    after = _validation_loss(stage)
    assert after < 0.9 * before, (before, after)  # fixed noise and timesteps: the same measurement twice


def test_a_one_voxel_lesion_survives_downsampling():
    labels = torch.zeros(1, 1, 16, 16, 8, dtype=torch.long)
    labels[0, 0, 9, 2, 5] = 129  # a single image voxel of the new class
    labels[0, 0, 0:8, 8:16, :] = 1  # liver, not weighted
    weights = lesion_weights(labels, (129,), 100.0, 4)
    assert weights.shape == (1, 1, 4, 4, 2)
    assert weights[0, 0, 2, 0, 1] == 100.0 and (weights == 100.0).sum() == 1 and weights.min() == 1.0


def test_two_process_torchrun_diffusion_writes_one_checkpoint(train_config, tmp_path):
    config = train_config(steps=2, checkpoint_every=1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29531",
        "-m",
        "maisi.train",
        "diffusion",
        "--config",
        str(config),
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "diffusion_unet.pt").is_file() and (run / "state" / "last.pt").is_file()
    assert done.stderr.count("step 2 validation") == 1  # rank 0 alone validates and writes
    load_network(get_preset("tiny-rflow"), "diffusion_unet", run / "diffusion_unet.pt")


def test_nan_loss_stops_with_the_step_and_term(train_config, monkeypatch, capsys):
    from maisi.training.diffusion import DiffusionStage

    monkeypatch.setattr(
        DiffusionStage,
        "train_loss",
        lambda self, model, n: {"loss": torch.tensor(float("nan"), requires_grad=True)},
    )
    assert main(["diffusion", "--config", str(train_config())]) == 1
    err = capsys.readouterr().err
    assert "step 1: loss term 'loss' is nan" in err and "Traceback" not in err


def _copy_latents(encoded_cases: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "emb"
    shutil.copytree(encoded_cases.parent, folder)
    return folder / "datalist.json"


@pytest.mark.parametrize(
    "case",
    [
        "latent missing",
        "sidecar disagrees",
        "label grid",
        "weighted id unknown",
        "no frozen unet",
        "other run",
        "resume other config",
        "resume nothing",
    ],
)
def test_bad_input_exits_2(case, train_config, encoded_cases, tmp_path, capsys):
    stage, flags, changes = "controlnet", [], {}
    datalist = _copy_latents(encoded_cases, tmp_path)
    changes["datalist"] = str(datalist)
    first = json.loads(datalist.read_text())["training"][1]
    if case == "latent missing":
        (datalist.parent / first["image"]).unlink()
        fragment = "latent not found"
    elif case == "sidecar disagrees":
        latent = datalist.parent / first["image"]
        data, affine = __import__("maisi.data.latents", fromlist=["read_latent"]).read_latent(latent)
        __import__("maisi.data.latents", fromlist=["write_latent"]).write_latent(latent, data + 1, affine)
        fragment = "does not match the checksum in its sidecar"
    elif case == "label grid":
        from maisi.data.io import Volume, write_volume

        write_volume(datalist.parent / first["label"], Volume(np.zeros((8, 8, 8), np.uint8), np.eye(4)))
        fragment = "is not 4x the latent grid"
    elif case == "weighted id unknown":
        changes["controlnet"] = {"weighted_loss": 100, "weighted_loss_label": [129]}  # dummy6, not a class
        fragment = "ids [129] are not classes of the label dictionary"
    elif case == "no frozen unet":
        changes["init"] = {}
        fragment = "needs the trained diffusion UNet"
    elif case == "other run":
        assert main(["controlnet", "--config", str(train_config(**changes, steps=1))]) == 0
        fragment = "holds controlnet run already; pass --resume"
    elif case == "resume other config":
        assert main(["controlnet", "--config", str(train_config(**changes, steps=1))]) == 0
        changes["optimizer"] = {"lr": 0.5}
        flags = ["--resume"]
        fragment = (
            "was trained with another config; only $.steps, $.checkpoint_every, $.validate_every, "
            "$.log_every, $.tensorboard, $.device, $.threads, $.output_dir, $.autoencoder.val_method, "
            "$.autoencoder.val_memory_budget_mb, $.autoencoder.val_roi_size, $.loader.num_workers, "
            "$.loader.prefetch_factor, $.loader.cache_rate may change. Changed: "
            "$.optimizer.lr: 0.0001 in the run, 0.5 now"
        )
    else:
        flags = ["--resume"]
        fragment = "holds no training state"
    capsys.readouterr()
    assert main([stage, "--config", str(train_config(**changes)), *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def _make_state_look_older(run: Path, drop: str | None) -> None:
    """Rewrite a run as an older version saved it: no config in the state, and ``drop`` (a key the schema
    gained later, as ``section.key``) absent from train_config.json; the hash then differs from today's."""
    state_file = run / "state" / "last.pt"
    state = torch.load(state_file, weights_only=True)
    state.pop("config")
    state["config_sha256"] = "0" * 64
    torch.save(state, state_file)
    record = json.loads((run / "train_config.json").read_text())
    if drop is None:
        (run / "train_config.json").unlink()
        return
    section, key = drop.split(".")
    del record["config"][section][key]
    record["config_sha256"] = "0" * 64
    (run / "train_config.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    "case", ["new key at its default", "new key set", "record gone", "finished, resumed twice"]
)
def test_resume_of_a_run_saved_before_a_schema_key_existed(case, train_config, tmp_path, capsys):
    assert main(["diffusion", "--config", str(train_config(steps=2))]) == 0
    _make_state_look_older(
        tmp_path / "run", None if case == "record gone" else "controlnet.conditioning_scale"
    )
    changes = {"controlnet": {"conditioning_scale": 2.0}} if case == "new key set" else {}
    capsys.readouterr()
    steps = 2 if case == "finished, resumed twice" else 3
    code = main(["diffusion", "--config", str(train_config(steps=steps, **changes)), "--resume"])
    err = capsys.readouterr().err
    if case == "new key at its default":  # the key's default keeps the old behaviour: the run continues
        assert code == 0, err
        assert torch.load(tmp_path / "run" / "state" / "last.pt", weights_only=True)["step"] == 3
    elif (
        case == "finished, resumed twice"
    ):  # nothing left to train: the state is re-recorded under today's config
        assert code == 0, err
        again = main(["diffusion", "--config", str(train_config(steps=2)), "--resume"])
        assert again == 0, capsys.readouterr().err
        state = torch.load(tmp_path / "run" / "state" / "last.pt", weights_only=True)
        marker = json.loads((tmp_path / "run" / "train_config.json").read_text())
        assert state["step"] == 2 and state["config_sha256"] == marker["config_sha256"] != "0" * 64
    elif case == "new key set":
        assert code == 2 and "Changed: $.controlnet.conditioning_scale: 1.0 in the run, 2.0 now" in err, err
    else:
        assert code == 2 and "its record of that config is gone" in err, err


def test_trained_controlnet_drives_generation_from_a_mask(
    train_config, tmp_path, active_unet, tiny_checkpoints, mask_file
):
    assert main(["controlnet", "--config", str(train_config(steps=1))]) == 0
    infer_cfg = write_config(
        tmp_path / "infer.json",
        {
            "preset": "tiny-rflow",
            "mask": str(mask_file),
            "device": "cpu",
            "sampling": {"num_inference_steps": 2},
            "checkpoints": {
                "autoencoder": str(tiny_checkpoints["tiny-rflow"]["autoencoder"]),
                "diffusion_unet": str(active_unet),
                "controlnet": str(tmp_path / "run" / "controlnet.pt"),
            },
            "output": {"dir": str(tmp_path / "gen")},
        },
    )
    from maisi.infer import main as infer_main

    assert infer_main(["--config", str(infer_cfg)]) == 0
    meta = json.loads((tmp_path / "gen" / "sample_seed0.json").read_text())
    assert meta["checkpoints"]["controlnet"]["format"] == "maisi"


QUICK = {"fold": None, "tensorboard": False}  # no validation, no event files: these runs only need to run


@pytest.mark.parametrize("case", ["output_dir is a file", "output_dir under a file", "run record unreadable"])
def test_unusable_output_dir_exits_2_before_any_work(case, train_config, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("keep me")
    output_dir = {
        "output_dir is a file": tmp_path / "a_file",
        "output_dir under a file": tmp_path / "a_file" / "run",
        "run record unreadable": tmp_path / "run",
    }[case]
    if case == "run record unreadable":
        output_dir.mkdir()
        (output_dir / "train_config.json").write_text("{")
    fragment = "train_config.json: unreadable"
    if "file" in case:
        fragment = f"{tmp_path / 'a_file'} is a file, not a folder"

    def no_work(*args, **kwargs):
        raise AssertionError("the stage was built before the output folder was checked")

    monkeypatch.setattr("maisi.training.run.build_stage", no_work)
    capsys.readouterr()
    assert main(["diffusion", "--config", str(train_config(output_dir=str(output_dir)))]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert (tmp_path / "a_file").read_text() == "keep me"


def _killed_before_first_checkpoint(config: Path, monkeypatch) -> None:
    """Run until train() starts, then stop as a kill would: train_config.json written, no state."""

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("maisi.training.run.train", killed)
        assert main(["diffusion", "--config", str(config)]) == 1
    run = Path(json.loads(config.read_text())["output_dir"])
    assert (run / "train_config.json").is_file() and not (run / "state").exists()


def test_a_run_killed_before_its_first_checkpoint_reruns_or_resumes_from_step_0(
    train_config, tmp_path, monkeypatch, caplog, capsys
):
    """Issue 18: such a folder could be neither rerun ('holds a run already') nor resumed ('holds no
    state')."""
    rerun = train_config("a.json", output_dir=str(tmp_path / "a"), steps=2, **QUICK)
    _killed_before_first_checkpoint(rerun, monkeypatch)
    assert main(["diffusion", "--config", str(rerun)]) == 0  # same config: starts over
    assert "holds no training state yet" in caplog.text and "starting diffusion from step 0" in caplog.text
    resumed = train_config("b.json", output_dir=str(tmp_path / "b"), steps=2, **QUICK)
    _killed_before_first_checkpoint(resumed, monkeypatch)
    caplog.clear()
    assert main(["diffusion", "--config", str(resumed), "--resume"]) == 0
    assert "starting diffusion from step 0" in caplog.text
    for run in ("a", "b"):
        assert torch.load(tmp_path / run / "state" / "last.pt", weights_only=True)["step"] == 2
    assert _state_dicts_equal(tmp_path / "a" / "diffusion_unet.pt", tmp_path / "b" / "diffusion_unet.pt")
    other = train_config("c.json", output_dir=str(tmp_path / "c"), steps=2, **QUICK)
    _killed_before_first_checkpoint(other, monkeypatch)
    capsys.readouterr()
    for flags in ([], ["--resume"]):  # another config is refused, naming the key, either way
        changed = train_config(
            "c.json", output_dir=str(tmp_path / "c"), steps=2, **QUICK, optimizer={"lr": 0.5}
        )
        assert main(["diffusion", "--config", str(changed), *flags]) == 2
        err = capsys.readouterr().err
        assert "stopped before its first checkpoint, with another config" in err, err
        assert "Changed: $.optimizer.lr: 0.0001 in the run, 0.5 now" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "state").exists()


@pytest.mark.parametrize("damage", ["top-level keys", "stage_state key", "model weight"])
def test_resume_from_a_state_missing_keys_exits_2_naming_them(damage, train_config, tmp_path, capsys):
    config = train_config(steps=1, **QUICK)
    assert main(["diffusion", "--config", str(config)]) == 0
    state_file = tmp_path / "run" / "state" / "last.pt"
    state = torch.load(state_file, weights_only=True)
    if damage == "top-level keys":  # e.g. hand-edited, or saved by a truncated script
        del state["optimizer"], state["stage_state"]
        fragment = "training state lacks optimizer, stage_state (truncated or edited?)"
    elif damage == "stage_state key":
        state["stage_state"] = {}
        fragment = "does not fit the diffusion networks: stage_state lacks scale_factor"
    else:
        dropped = sorted(state["model"])[0]
        del state["model"][dropped]
        fragment = f"model lacks weights: {dropped} (1)"
    torch.save(state, state_file)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["diffusion", "--config", str(train_config(steps=2, **QUICK)), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{state_file}: " in err and fragment in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_the_loader_keys_leave_the_config_hash_as_it_was(train_config):
    """A run saved before $.loader existed resumes on its hash; changing how batches are read keeps it."""
    from maisi.config import to_jsonable
    from maisi.training.resume import comparable
    from maisi.training.run import config_hash

    plain = load_config(train_config("a.json"), "train")
    tuned = load_config(train_config("b.json", loader={"num_workers": 3, "cache_rate": 0.0}), "train")
    assert config_hash(plain, "diffusion") == config_hash(tuned, "diffusion")
    before = {k: v for k, v in to_jsonable(plain).items() if k != "loader"}  # as an older version wrote it
    assert comparable(before) == comparable(to_jsonable(plain))


def test_latent_batches_are_read_in_workers_as_drawn_in_process(train_config):
    """A step's cases are the draw the global generator made before workers existed; what a worker reads
    equals what the stage reads itself."""
    from maisi.training.latent_data import CaseDraw
    from maisi.training.loop import StepBatches, step_batches, step_seed

    config = load_config(train_config(steps=3, batch_size=2, fold=None, loader={"num_workers": 2}), "train")
    stage = build_stage("controlnet", config, Ranks(), torch.device("cpu"))
    draw = stage.batch_draw()
    assert isinstance(draw, CaseDraw) and draw.batch_size == 2
    seen = []
    for step, batch, state in step_batches(draw, config, 0, start=1):
        seen.append(step)
        torch.manual_seed(step_seed(config.seed, step, 0))
        expected = stage.train.read(
            torch.randint(len(stage.train), (2,)).tolist()
        )  # the old, in-process draw
        assert torch.equal(state, torch.get_rng_state())
        assert torch.equal(batch["latents"], expected["latents"]) and torch.equal(
            batch["labels"], expected["labels"]
        )
        assert batch["unet_inputs"].keys() == expected["unet_inputs"].keys()
    assert seen == [1, 2] and StepBatches(draw, config.seed, 0, 3)[2][0] == 2


@pytest.mark.parametrize("stage", ["diffusion", "controlnet"])
def test_a_non_finite_latent_is_refused_by_name(stage, train_config, encoded_cases, tmp_path, capsys):
    """Issue 18: a NaN latent (encoded from a CT with a NaN voxel) trained on; refuse it when loaded."""
    from maisi.data.latents import read_latent, read_sidecar, write_latent, write_sidecar
    from maisi.files import file_sha256

    datalist = _copy_latents(encoded_cases, tmp_path)
    latent_path = datalist.parent / json.loads(datalist.read_text())["training"][2]["image"]
    latent, affine = read_latent(latent_path)
    latent[1, 3, 4, 5] = np.nan
    write_latent(latent_path, latent, affine)  # a checksum that matches: only the values give it away
    write_sidecar(latent_path, {**read_sidecar(latent_path), "latent_sha256": file_sha256(latent_path)})
    capsys.readouterr()
    assert main([stage, "--config", str(train_config(datalist=str(datalist)))]) == 2
    err = capsys.readouterr().err
    assert f"{latent_path}: latent holds 1 non-finite value(s) (NaN or inf)" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
