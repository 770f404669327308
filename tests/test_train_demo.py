"""tools/train_demo.py: its defaults are the recipe the shipped demo weights record, and its options parse."""

import json
from pathlib import Path

import pytest

from maisi.data.io import read_mask, read_volume, write_volume
from tools.train_demo import TRAIN_CASES, build_parser, main, recipe_steps

REPO = Path(__file__).resolve().parents[1]


def test_the_defaults_are_the_recipe_of_the_shipped_weights():
    manifest = json.loads((REPO / "models" / "demo" / "manifest.json").read_text())
    args = build_parser().parse_args([])
    assert recipe_steps(args) == manifest["steps"]
    assert [args.ae_batch, args.ae_patch] == [manifest["autoencoder_batch"], manifest["autoencoder_patch"]]


def test_emphasis_rounds_are_steps_and_weight_pairs():
    args = build_parser().parse_args(["--controlnet-emphasis", "200:3", "100:7.5"])
    assert recipe_steps(args)["controlnet_emphasis"] == [
        {"steps": 200, "weighted_loss": 3.0},
        {"steps": 100, "weighted_loss": 7.5},
    ]
    assert build_parser().parse_args(["--controlnet-emphasis"]).controlnet_emphasis == []  # no emphasis round


@pytest.mark.parametrize("bad", ["400", "400:", "x:5", "0:5", "400:0.5"])
def test_a_malformed_emphasis_round_exits_2_naming_it(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--controlnet-emphasis", bad])
    assert stop.value.code == 2
    assert repr(bad) in capsys.readouterr().err


def test_autoencoder_only_trains_the_vae_with_fine_copies_and_leaves_the_weights_alone(
    real_cases, tmp_path, capsys
):
    cases = tmp_path / "cases"  # the three training cases, all cut from the real TotalSegmentator example
    ct, label = (
        read_volume(real_cases / "case0" / "imaging.nii.gz"),
        read_mask(real_cases / "case0" / "segmentation.nii.gz"),
    )
    for name in TRAIN_CASES:
        write_volume(cases / name / "ct.nii.gz", ct)
        write_volume(cases / name / "label.nii.gz", label)
    work, dest = tmp_path / "work", tmp_path / "dest"
    args = [
        "--cases",
        str(cases),
        "--work",
        str(work),
        "--dest",
        str(dest),
        "--device",
        "cpu",
        "--ae-steps",
        "2",
        "--ae-patch",
        "16",
        "16",
        "16",
        "--autoencoder-only",
        "--ae-fine-copies",
    ]
    assert main(args) == 0
    assert (work / "autoencoder" / "autoencoder.pt").is_file() and (
        work / "autoencoder" / "state" / "last.pt"
    ).is_file()
    assert not dest.exists() and not (work / "latents").exists()  # stopped before encoding; no weights copied
    steps = [s["step"] for s in json.loads((work / "recipe_log.json").read_text())["steps"]]
    assert steps == ["datalist", "datalist (autoencoder)", "autoencoder"]
    assert "run again without --autoencoder-only" in capsys.readouterr().out
    # the fine copies feed the VAE only: 9 coarse + 2 fine copies there, the 9 coarse ones in the shared
    # datalist
    vae_list = json.loads((work / "datalist_autoencoder.json").read_text())["training"]
    assert (
        len(json.loads((work / "prepared" / "datalist.json").read_text())["training"]) == 9
        and len(vae_list) == 11
    )
    fine = sorted(e["spacing"] for e in vae_list if e["image"].startswith("prepared_fine/"))
    assert fine == [[0.7, 0.7, 2.5], [0.7, 0.7, 5.0]]
    config = json.loads((work / "autoencoder" / "train_config.json").read_text())["config"]
    assert config["datalist"] == str(work / "datalist_autoencoder.json")
