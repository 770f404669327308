"""A checkpoint made for another preset (a CT UNet under an MR preset, the same architecture): refused at load
with exit 2 naming the checkpoint, its preset and modality and the config's, unless the config allows it;
what was compared is recorded in each sample's metadata."""

from __future__ import annotations

import json

from maisi import infer
from tests.conftest import mr_infer_config


def mixed(tiny_checkpoints, tiny_mr_checkpoints) -> dict:
    """The MR preset's VAE with the CT preset's UNet: the networks have the same shapes."""
    return {**tiny_mr_checkpoints, "diffusion_unet": tiny_checkpoints["tiny-rflow"]["diffusion_unet"]}


def test_a_ct_unet_under_an_mr_preset_exits_2_naming_both(
    tmp_path, tiny_checkpoints, tiny_mr_checkpoints, capsys
):
    config = mr_infer_config(tmp_path, mixed(tiny_checkpoints, tiny_mr_checkpoints))
    assert infer.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    unet = tiny_checkpoints["tiny-rflow"]["diffusion_unet"]
    assert f"{unet}: diffusion_unet checkpoint was made for preset 'tiny-rflow' (ct)" in err
    assert "the config's preset is 'tiny-mr-rflow' (mr)" in err and '"allow_preset_mismatch": true' in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_an_allowed_mismatch_runs_and_is_recorded(tmp_path, tiny_checkpoints, tiny_mr_checkpoints, caplog):
    checkpoints = mixed(tiny_checkpoints, tiny_mr_checkpoints)
    config = mr_infer_config(tmp_path, checkpoints, allow_preset_mismatch=True)
    assert infer.main(["--config", str(config)]) == 0
    meta = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())
    assert meta["config"]["allow_preset_mismatch"] is True
    assert meta["preset_check"] == {
        "autoencoder": "matches: made for preset 'tiny-mr-rflow' (mr)",
        "diffusion_unet": "mismatch allowed: made for preset 'tiny-rflow' (ct), run as 'tiny-mr-rflow' (mr)",
    }
    assert "made for preset 'tiny-rflow' (ct)" in caplog.text
