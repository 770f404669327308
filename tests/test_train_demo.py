"""tools/train_demo.py: its defaults are the recipe the shipped demo weights record, and its options parse."""

import json
from pathlib import Path

import pytest

from tools.train_demo import build_parser, recipe_steps

REPO = Path(__file__).resolve().parents[1]


def test_the_defaults_are_the_recipe_of_the_shipped_weights():
    manifest = json.loads((REPO / "models" / "demo" / "manifest.json").read_text())
    args = build_parser().parse_args([])
    assert recipe_steps(args) == manifest["steps"]
    assert [args.ae_batch, args.ae_patch] == [manifest["autoencoder_batch"], manifest["autoencoder_patch"]]


def test_emphasis_rounds_are_steps_and_weight_pairs():
    args = build_parser().parse_args(["--controlnet-emphasis", "200:3", "100:7.5"])
    assert recipe_steps(args)["controlnet_emphasis"] == [{"steps": 200, "weighted_loss": 3.0},
                                                         {"steps": 100, "weighted_loss": 7.5}]  # fmt: skip
    assert build_parser().parse_args(["--controlnet-emphasis"]).controlnet_emphasis == []  # no emphasis round


@pytest.mark.parametrize("bad", ["400", "400:", "x:5", "0:5", "400:0.5"])
def test_a_malformed_emphasis_round_exits_2_naming_it(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--controlnet-emphasis", bad])
    assert stop.value.code == 2
    assert repr(bad) in capsys.readouterr().err
