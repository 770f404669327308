"""Resuming a diffusion run keeps the modality dropout it started with (issue 21's leftover).

A run saved before ``$.diffusion.modality_dropout`` existed trained without dropout; the key's default (null:
MAISI's 0.1 on presets with modality input) would otherwise change its training mid-run without a word.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from maisi.config import load_config, to_jsonable
from maisi.train import main
from maisi.training.resume import config_differences

OFF = {"modality_dropout": {"parent_rate": 0, "unconditional_rate": 0}}
QUICK = {"fold": None, "tensorboard": False}  # no validation, no event files


@pytest.fixture
def train_config(latent_train_config):
    return partial(latent_train_config, steps=2, checkpoint_every=1, **QUICK)


def _write_the_old_way(run: Path, keep_config_in_state: bool) -> None:
    """Rewrite a run's state and record as a version before $.diffusion.modality_dropout wrote them: no such
    key in the recorded config (kept in the state, or only in train_config.json for older states), and a
    hash of that config, so not today's."""
    old_hash = "0" * 64
    record = json.loads((run / "train_config.json").read_text())
    del record["config"]["diffusion"]["modality_dropout"]
    record["config_sha256"] = old_hash
    (run / "train_config.json").write_text(json.dumps(record))
    state_file = run / "state" / "last.pt"
    state = torch.load(state_file, weights_only=True)
    state["config_sha256"] = old_hash
    if keep_config_in_state:
        del state["config"]["diffusion"]["modality_dropout"]
        assert "modality_dropout" not in state["config"]["diffusion"]
    else:
        state.pop("config")
    torch.save(state, state_file)


def _files(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("keep_config_in_state", [True, False], ids=["config in state", "config in record"])
def test_an_old_run_resumes_without_dropout_and_refuses_the_new_default(
    keep_config_in_state, train_config, tmp_path, capsys, caplog
):
    run = tmp_path / "run"
    assert main(["diffusion", "--config", str(train_config(diffusion=OFF))]) == 0  # trains as before the key
    _write_the_old_way(run, keep_config_in_state)
    before = _files(run)

    # the config the run started with, unchanged: the key at its default asks for MAISI's 0.1
    capsys.readouterr()
    assert main(["diffusion", "--config", str(train_config(steps=3)), "--resume"]) == 2
    err = capsys.readouterr().err
    for rate in ("parent_rate", "unconditional_rate"):
        assert (
            f"$.diffusion.modality_dropout.{rate}: 0 (its config predates the key: no modality dropout) in "
            "the run, 0.1 (null: MAISI's rate) now; set it to 0 to train on as the run started"
        ) in err, err
    assert "Traceback" not in err
    assert _files(run) == before  # nothing written

    # one rate asked for: only that one is named
    parent_only = {"modality_dropout": {"parent_rate": 0.2, "unconditional_rate": 0}}
    assert main(["diffusion", "--config", str(train_config(steps=3, diffusion=parent_only)), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "$.diffusion.modality_dropout.parent_rate: 0 (its config predates" in err and "0.2 now" in err
    assert "unconditional_rate" not in err
    assert _files(run) == before

    # dropout off, as the run started: it continues, without drawing any dropout
    caplog.clear()
    assert main(["diffusion", "--config", str(train_config(steps=3, diffusion=OFF)), "--resume"]) == 0
    assert "modality dropout:" not in caplog.text
    state = torch.load(run / "state" / "last.pt", weights_only=True)
    assert state["step"] == 3
    assert state["config"]["diffusion"]["modality_dropout"] == OFF["modality_dropout"]  # now on record
    # ... and the next resume finds the rates on record: the default is refused, naming the run's 0
    assert main(["diffusion", "--config", str(train_config(steps=4)), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "parent_rate: 0 in the run, 0.1 (null: MAISI's rate) now; set it to 0" in err, err
    assert main(["diffusion", "--config", str(train_config(steps=4, diffusion=OFF)), "--resume"]) == 0


def _resolved(train_config, name: str, **changes) -> dict:
    return to_jsonable(load_config(train_config(name, **changes), "train"))


def test_dropout_is_compared_by_the_rates_it_trains_with(train_config):
    def old(config: dict) -> dict:
        """As a version before the key recorded it."""
        diffusion = {k: v for k, v in config["diffusion"].items() if k != "modality_dropout"}
        return {**config, "diffusion": diffusion}

    default = _resolved(train_config, "default.json")
    off = _resolved(train_config, "off.json", diffusion=OFF)
    maisi_rates = _resolved(
        train_config,
        "maisi.json",
        diffusion={"modality_dropout": {"parent_rate": 0.1, "unconditional_rate": 0.1}},
    )
    # null and 0.1 train alike on a preset with modality input; null and 0 do not
    assert config_differences(default, maisi_rates, "diffusion") == []
    assert config_differences(old(default), off, "diffusion") == []
    assert config_differences(default, off, "diffusion") == [
        f"$.diffusion.modality_dropout.{rate}: 0.1 (null: MAISI's rate) in the run, 0 now; set it to 0.1 to "
        "train on as the run started"
        for rate in ("parent_rate", "unconditional_rate")
    ]
    # a preset without modality input (DDPM) never had dropout: an old run resumes with the default
    ddpm = _resolved(train_config, "ddpm.json", preset="tiny-ddpm", init={})
    assert config_differences(old(ddpm), ddpm, "diffusion") == []
    # the ControlNet stage does not use the key: its old runs resume with the default as before
    assert config_differences(old(default), default, "controlnet") == []
    # other keys are still compared alongside
    lr = _resolved(train_config, "lr.json", diffusion=OFF, optimizer={"lr": 0.5})
    assert config_differences(old(default), lr, "diffusion") == ["$.optimizer.lr: 0.0001 in the run, 0.5 now"]
