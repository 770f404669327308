"""A path that is a symlink loop (a -> b -> a), wherever a checkpoint, config or mask path is given: exit 2
naming the path, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maisi import infer
from maisi.config.__main__ import main as config_main
from tests.conftest import write_config


@pytest.fixture
def loop(tmp_path) -> Path:
    a, b = tmp_path / "loop_a.pt", tmp_path / "loop_b.pt"
    os.symlink(b, a)
    os.symlink(a, b)
    return a


def assert_refused(code: int, err: str, path: Path) -> None:
    assert code == 2, err
    assert str(path) in err and "symlink loop" in err
    assert "Traceback" not in err and "RuntimeError" not in err


@pytest.mark.parametrize("part", ["autoencoder", "diffusion_unet", "controlnet"])
def test_a_checkpoint_that_is_a_symlink_loop_exits_2_naming_it(infer_config, loop, part, tmp_path, capsys):
    config = infer_config()
    data = __import__("json").loads(config.read_text())
    data["checkpoints"][part] = str(loop)
    write_config(config, data)
    assert_refused(infer.main(["--config", str(config)]), capsys.readouterr().err, loop)
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_a_symlink_loop_exits_2_naming_it(loop, capsys):
    assert_refused(infer.main(["--config", str(loop)]), capsys.readouterr().err, loop)


def test_an_import_maisi_source_that_is_a_symlink_loop_exits_2_naming_it(loop, tmp_path, capsys):
    code = config_main(["import-maisi", str(loop), "--output", str(tmp_path / "ours" / "infer.json")])
    assert_refused(code, capsys.readouterr().err, loop)
    assert not (tmp_path / "ours").exists()


def test_a_mask_that_is_a_symlink_loop_exits_2_naming_it(infer_config, loop, tmp_path, capsys):
    assert_refused(infer.main(["--config", str(infer_config(mask=str(loop)))]), capsys.readouterr().err, loop)
    assert not (tmp_path / "out").exists()
