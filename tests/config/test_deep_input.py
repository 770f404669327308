"""Input nested or chained deeper than Python's recursion: exit 2 naming the file (and the key), never a
RecursionError traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maisi import infer
from maisi.config.__main__ import main as config_main
from maisi.config.loader import MAX_DEPTH, read_json
from maisi.errors import InputError


def deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [200_000, 2_000])  # past the parser's limit; past the checks' recursion
def test_a_config_nested_deeper_than_any_config_exits_2_naming_the_file(tmp_path, capsys, depth):
    config = tmp_path / "deep.json"
    config.write_text('{"preset": "tiny-rflow", "spacing": ' + deep_array(depth) + "}")
    assert infer.main(["--config", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and f"nested more than {MAX_DEPTH} levels deep" in err
    assert "Traceback" not in err and "RecursionError" not in err
    assert not (tmp_path / "out").exists()


def test_nesting_up_to_the_limit_is_read(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(deep_array(MAX_DEPTH))
    assert read_json(path) is not None
    path.write_text(deep_array(MAX_DEPTH + 1))
    with pytest.raises(InputError, match=f"{path}.*nested more than {MAX_DEPTH} levels deep"):
        read_json(path)


def test_a_5000_long_reference_chain_exits_2_naming_the_file_and_the_key(tmp_path, capsys):
    source = tmp_path / "maisi" / "config_infer.json"
    source.parent.mkdir()
    chain = {f"k{i}": f"@k{i + 1}" for i in range(5000)}
    source.write_text(
        json.dumps({**chain, "k5000": [256, 256, 128], "output_size": "@k0", "num_output_samples": 1})
    )
    output = tmp_path / "ours" / "infer.json"
    assert config_main(["import-maisi", str(source), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert str(source) in err and "$.output_size" in err and "chain of more than" in err
    assert "Traceback" not in err and "RecursionError" not in err
    assert not output.exists() and not Path(output.parent).exists()
