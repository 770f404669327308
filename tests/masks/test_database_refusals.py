"""What ``maisi.masks`` refuses in masks and databases: blank masks, masks still in TotalSegmentator ids,
databases that are not JSON text, and spacings that are not finite positive numbers (issue 26)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from maisi.data.io import read_mask, write_volume
from maisi.masks.__main__ import main

DATA = Path(__file__).resolve().parents[1] / "data"


def _index(masks_copy: Path, *extra: str) -> int:
    db = masks_copy / "db.json"
    return main(["index", "--masks", str(masks_copy / "masks"), "--output", str(db), *extra])


def _query(db: Path, *args: str, spacing: tuple[str, str, str] = ("3", "3", "3")) -> list[str]:
    return ["query", "--database", str(db), "--output-size", "128", "128", "32", "--spacing", *spacing, *args]


def _blank(masks_copy: Path, name: str = "blank.nii.gz") -> Path:
    ts = read_mask(masks_copy / "masks" / "ts.nii.gz")
    return write_volume(masks_copy / "masks" / name, ts.with_array(np.zeros_like(ts.array)))


# ------------------------------------------------------------------------------------------- blank masks


def test_index_refuses_a_blank_mask_naming_it_and_writes_nothing(masks_copy, capsys):
    blank = _blank(masks_copy)
    assert _index(masks_copy) == 2
    err = capsys.readouterr().err
    assert f"{blank}: holds no label (every voxel is 0, background)" in err and "Traceback" not in err
    assert not (masks_copy / "db.json").exists()
    assert _index(masks_copy, "--skip-bad") == 0
    assert "1 bad skipped" in capsys.readouterr().out
    paths = [e["pseudo_label_filename"] for e in json.loads((masks_copy / "db.json").read_text())]
    assert "masks/blank.nii.gz" not in paths and len(paths) == 3


def test_a_blank_entry_of_an_older_database_is_skipped_with_a_warning_naming_it(masks_copy, capsys, caplog):
    assert _index(masks_copy) == 0
    db = masks_copy / "db.json"
    records = json.loads(db.read_text())
    _blank(masks_copy)
    records.append({"pseudo_label_filename": "masks/blank.nii.gz", "label_list": [], "dim": [122, 101, 30]})
    records[-1]["spacing"] = records[0]["spacing"]
    db.write_text(json.dumps(records))
    capsys.readouterr()
    assert main(["show", "--database", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{db} $[3]" in m and "masks/blank.nii.gz" in m and "holds no label" in m for m in warned)
    assert main(_query(db, "--num", "5", "--json")) == 0
    picks = json.loads(capsys.readouterr().out)["picks"]
    assert "masks/blank.nii.gz" not in {p["path"] for p in picks}


# ---------------------------------------------------------------------------- TotalSegmentator-id masks


def test_index_refuses_a_mask_still_in_totalsegmentator_ids_unless_allowed(masks_copy, capsys):
    raw = masks_copy / "masks" / "raw_ts.nii.gz"
    raw.write_bytes((DATA / "totalseg_example_seg.nii.gz").read_bytes())
    assert _index(masks_copy) == 2
    err = capsys.readouterr().err
    assert str(raw) in err and "no body label 200" in err and "Traceback" not in err
    assert "'dummy1' (2)" in err and "python -m maisi.labels remap" in err
    assert not (masks_copy / "db.json").exists()
    # the remapped TotalSegmentator mask of the fixture (no body either, but no dummy slot) is indexed
    assert "ts.nii.gz" not in err.replace("raw_ts.nii.gz", "")
    assert _index(masks_copy, "--allow-no-body") == 0
    paths = [e["pseudo_label_filename"] for e in json.loads((masks_copy / "db.json").read_text())]
    assert "masks/raw_ts.nii.gz" in paths


# ------------------------------------------------------------------------------ databases that are not JSON


@pytest.mark.parametrize("kind", ["gzip", "binary"])
def test_a_database_that_is_not_json_text_exits_2_naming_it(masks_copy, capsys, kind):
    assert _index(masks_copy) == 0
    text = (masks_copy / "db.json").read_bytes()
    bad = masks_copy / "db.json.gz"
    bad.write_bytes(gzip.compress(text) if kind == "gzip" else bytes(range(256)) * 4)
    before = bad.read_bytes()
    capsys.readouterr()
    for argv in (
        ["show", "--database", str(bad)],
        _query(bad, "--anatomy", "liver"),
        ["index", "--masks", str(masks_copy / "masks"), "--output", str(bad)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"invalid mask database {bad}" in err and "not UTF-8 text" in err, err
        assert "Traceback" not in err
    assert bad.read_bytes() == before


# ------------------------------------------------------------------------------------------------ spacing


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e999"])
def test_a_non_finite_spacing_in_an_entry_exits_2_naming_entry_and_file(masks_copy, capsys, value):
    assert _index(masks_copy) == 0
    db = masks_copy / "db.json"
    records = json.loads(db.read_text())
    records[1]["spacing"] = "<here>"
    db.write_text(json.dumps(records).replace('"<here>"', f"[{value}, 3.0, 3.0]"))
    capsys.readouterr()
    assert main(_query(db, "--anatomy", "liver")) == 2
    err = capsys.readouterr().err
    assert f"invalid mask database {db}" in err and "$[1].spacing[0]" in err and value in err, err
    assert "score nan" not in err and "Traceback" not in err


@pytest.mark.parametrize("spacing", [[float("nan"), 3.0, 3.0], [float("inf"), 3.0, 3.0], [0.0, 3.0, 3.0]])
def test_records_with_a_bad_spacing_are_refused_naming_the_entry(tmp_path, spacing):
    from maisi.masks.database import DatabaseError, parse_database

    records = [{"pseudo_label_filename": "a.nii.gz", "label_list": [1, 200], "dim": [8, 8, 8]}]
    records[0]["spacing"] = spacing
    with pytest.raises(DatabaseError) as err:
        parse_database(records, tmp_path / "db.json")
    assert f"{tmp_path / 'db.json'}" in str(err.value) and "$[0].spacing" in str(err.value)


@pytest.mark.parametrize("value", ["inf", "1e999", "nan", "0", "-2"])  # inf, 1e999: exit 0 before
def test_query_refuses_a_spacing_that_is_not_finite_and_positive(masks_copy, capsys, value):
    assert _index(masks_copy) == 0
    capsys.readouterr()
    assert main(_query(masks_copy / "db.json", "--anatomy", "liver", spacing=(value, "3", "3"))) == 2
    err = capsys.readouterr().err
    assert f"--spacing {float(value):g}" in err and "Traceback" not in err and "sample 0" not in err, err
