"""Issue 27, item 2: ``--dry-run`` runs every check of the real run, in every config-driven CLI. A missing
input file: exit 2 in the dry run as in the real run; a good config: exit 0, nothing written."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from maisi.data.io import Volume, write_volume
from tests.conftest import phantom_mask, write_config


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cases(ws: Path) -> Path:
    for case in ("a", "b"):
        write_volume(ws / "cases" / case / "ct.nii.gz", Volume(np.zeros((32, 32, 16), np.float32), np.eye(4)))
        write_volume(ws / "cases" / case / "label.nii.gz", Volume(phantom_mask(), np.eye(4)))
    entries = [{"image": f"{c}/ct.nii.gz", "label": f"{c}/label.nii.gz"} for c in "ab"]
    return write_config(ws / "cases" / "dl.json", {"training": entries})


def infer(ws: Path, ckpt: dict, encoded: Path, unet: Path) -> tuple[str, list[str], dict]:
    mask = write_volume(ws / "in" / "mask.nii.gz", Volume(phantom_mask(), np.diag([2.0, 2.0, 3.0, 1.0])))
    data = {
        "preset": "tiny-rflow",
        "checkpoints": {part: str(p) for part, p in ckpt.items()},
        "mask": str(mask),
        "output": {"dir": str(ws / "out")},
        "device": "cpu",
    }
    return "maisi.infer", [], data


def encode(ws: Path, ckpt: dict, encoded: Path, unet: Path) -> tuple[str, list[str], dict]:
    data = {
        "preset": "tiny-rflow",
        "autoencoder": str(ckpt["autoencoder"]),
        "datalist": str(_cases(ws)),
        "output_dir": str(ws / "emb"),
        "device": "cpu",
    }
    return "maisi.encode", [], data


def train(ws: Path, ckpt: dict, encoded: Path, unet: Path) -> tuple[str, list[str], dict]:
    data = {
        "preset": "tiny-rflow",
        "datalist": str(encoded),
        "output_dir": str(ws / "run"),
        "init": {"diffusion_unet": str(unet)},
        "steps": 1,
        "device": "cpu",
    }
    return "maisi.train", ["diffusion"], data


def evaluate(ws: Path, ckpt: dict, encoded: Path, unet: Path) -> tuple[str, list[str], dict]:
    datalist = _cases(ws)
    data = {
        "real_datalist": str(datalist),
        "synthetic": [str(datalist.parent / c / "ct.nii.gz") for c in "ab"],
        "reconstruction": {"enabled": True, "preset": "tiny-rflow", "autoencoder": str(ckpt["autoencoder"])},
        "diversity": {"enabled": False},
        "output": {"report": str(ws / "out" / "report.json")},
        "device": "cpu",
    }
    return "maisi.evaluate", [], data


MISSING = {  # (CLI, the config key pointed at a file that does not exist)
    "infer $.mask": (infer, ("mask",)),
    "infer $.checkpoints.autoencoder": (infer, ("checkpoints", "autoencoder")),
    "encode $.datalist": (encode, ("datalist",)),
    "encode $.autoencoder": (encode, ("autoencoder",)),
    "train $.datalist": (train, ("datalist",)),
    "train $.init.diffusion_unet": (train, ("init", "diffusion_unet")),
    "evaluate $.real_datalist": (evaluate, ("real_datalist",)),
    "evaluate $.reconstruction.autoencoder": (evaluate, ("reconstruction", "autoencoder")),
}


def _run(module: str, argv: list[str]) -> int:
    main: Callable[[list[str]], int] = importlib.import_module(module).main
    return main(argv)


@pytest.fixture
def inputs(tmp_path, tiny_checkpoints, encoded_cases, active_unet):
    return lambda make: make(tmp_path / "ws", tiny_checkpoints["tiny-rflow"], encoded_cases, active_unet)


@pytest.mark.parametrize("make", [infer, encode, train, evaluate], ids=lambda m: m.__name__)
def test_a_good_config_dry_runs_with_exit_0_writing_nothing(inputs, tmp_path, make):
    module, extra, data = inputs(make)
    config = write_config(tmp_path / "config.json", data)
    before = digests(tmp_path)
    assert _run(module, [*extra, "--config", str(config), "--dry-run"]) == 0
    assert digests(tmp_path) == before


@pytest.mark.parametrize("make, key", MISSING.values(), ids=MISSING.keys())
def test_a_missing_input_fails_the_dry_run_as_the_real_run(inputs, tmp_path, capsys, make, key):
    module, extra, data = inputs(make)
    node = data
    for part in key[:-1]:
        node = node[part]
    missing = tmp_path / "nowhere" / "missing.json"
    node[key[-1]] = str(missing)
    config = write_config(tmp_path / "config.json", data)
    before = digests(tmp_path)
    capsys.readouterr()
    assert _run(module, [*extra, "--config", str(config), "--dry-run"]) == 2
    dry = capsys.readouterr().err
    assert str(missing) in dry and "Traceback" not in dry, dry
    assert _run(module, [*extra, "--config", str(config)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert digests(tmp_path) == before
