"""``python -m maisi.masks``: index -> show -> query on real masks; bad inputs exit 2 with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maisi.data.io import Volume, read_mask, write_volume
from maisi.masks.__main__ import main


def _index(masks_copy, *extra) -> int:
    return main(
        ["index", "--masks", str(masks_copy / "masks"), "--output", str(masks_copy / "db.json"), *extra]
    )


def _query(db, *args) -> list[str]:
    return [
        "query",
        "--database",
        str(db),
        "--output-size",
        "128",
        "128",
        "32",
        "--spacing",
        "3",
        "3",
        "3",
        *args,
    ]


def test_index_show_query_round_trip_on_real_masks(masks_copy, capsys):
    assert _index(masks_copy) == 0
    out = capsys.readouterr().out
    assert "3 entries (3 indexed, 0 unchanged kept, 0 gone dropped, 0 bad skipped)" in out
    db = masks_copy / "db.json"

    assert main(["show", "--database", str(db)]) == 0
    show = capsys.readouterr().out
    assert "entries   3" in show and "chest-abdomen: 2, chest: 1" in show
    assert any(line.split()[:3] == ["1", "liver", "2"] for line in show.splitlines())
    assert any(line.split()[:4] == ["23", "lung", "tumor", "1"] for line in show.splitlines())

    assert main(_query(db, "--anatomy", "liver", "--region", "abdomen", "--num", "2")) == 0
    query = capsys.readouterr().out
    assert "1 of 3 entries pass the filter" in query  # ts_tumour holds a lung tumour nobody asked for
    samples = [line for line in query.splitlines() if line.startswith("sample")]
    assert len(samples) == 2 and all(str(masks_copy / "masks" / "ts.nii.gz") in line for line in samples)
    assert "FOV [366.0, 303.0, 90.0] mm" in samples[0] and "score " in samples[0]

    assert main(_query(db, "--anatomy", "lung tumor", "--region", "chest", "--json")) == 0
    picks = json.loads(capsys.readouterr().out)["picks"]
    assert [p["path"] for p in picks] == ["masks/ts_tumour.nii.gz"]


def test_same_seed_same_picks_from_the_cli(masks_copy, capsys):
    assert _index(masks_copy) == 0
    capsys.readouterr()
    db = masks_copy / "db.json"
    runs = []
    for _ in range(2):
        assert main(_query(db, "--region", "chest", "--num", "3", "--seed", "5", "--json")) == 0
        runs.append(json.loads(capsys.readouterr().out)["picks"])
    assert runs[0] == runs[1]
    paths = [p["path"] for p in runs[0]]  # two chest masks without a tumour: distinct, then wrapped
    assert set(paths) == {"masks/chest.nrrd", "masks/ts.nii.gz"} and paths[2] == paths[0] != paths[1]


def test_bad_masks_exit_2_naming_them_and_skip_bad_lists_them(masks_copy, capsys):
    fractional = np.full((6, 6, 6), 0.5, dtype=np.float32)
    write_volume(masks_copy / "masks" / "half.nii.gz", Volume(fractional, np.eye(4)))
    assert _index(masks_copy) == 2
    err = capsys.readouterr().err
    assert "half.nii.gz: a mask must hold integer labels, found 0.5" in err and "Traceback" not in err
    assert not (masks_copy / "db.json").exists()
    assert _index(masks_copy, "--skip-bad") == 0
    captured = capsys.readouterr()
    assert "1 bad skipped" in captured.out and "skipped: " in captured.err and "half.nii.gz" in captured.err
    assert len(json.loads((masks_copy / "db.json").read_text())) == 3


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--anatomy", "livr"], "unknown anatomy 'livr'; did you mean 'liver'?"),
        (["--region", "abdomn"], "unknown body region 'abdomn'; did you mean 'abdomen'"),
        (
            ["--anatomy", "colon cancer primaries"],
            "no entry of {db} (3 entries) holds 'colon cancer primaries'",
        ),
        (
            ["--anatomy", "liver", "--region", "head"],
            "no entry of {db} (3 entries) covers body region 'head'",
        ),
        (["--num", "0"], "number of samples 0: expected at least 1"),
    ],
)
def test_query_bad_input_exits_2_with_one_message(masks_copy, capsys, args, fragment):
    assert _index(masks_copy) == 0
    capsys.readouterr()
    db = masks_copy / "db.json"
    assert main(_query(db, *args)) == 2
    err = capsys.readouterr().err
    assert fragment.format(db=db) in err and "Traceback" not in err


def test_database_problems_exit_2_and_name_the_file(masks_copy, capsys, tmp_path):
    assert _index(masks_copy) == 0
    db = masks_copy / "db.json"
    (masks_copy / "masks" / "chest.nrrd").unlink()
    (masks_copy / "masks" / "ts.nii.gz").unlink()
    assert main(["show", "--database", str(db)]) == 2
    err = capsys.readouterr().err
    assert "$[0].pseudo_label_filename: mask file not found" in err and "chest.nrrd" in err
    assert "$[1].pseudo_label_filename: mask file not found" in err and "ts.nii.gz" in err

    broken = tmp_path / "broken.json"
    broken.write_text('[{"pseudo_label_filename": "a.nii.gz",')
    assert main(_query(broken, "--anatomy", "liver")) == 2
    assert f"invalid mask database {broken}" in capsys.readouterr().err
    assert main(["index", "--masks", str(masks_copy / "masks"), "--output", str(broken), "--skip-bad"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert (
        broken.read_text() == '[{"pseudo_label_filename": "a.nii.gz",'
    )  # an invalid database is not overwritten


def test_index_options_are_checked_before_any_work(masks_copy, capsys, tmp_path):
    assert _index(masks_copy, "--workers", "0") == 2
    assert "--workers 0: expected at least 1" in capsys.readouterr().err
    assert (
        main(["index", "--masks", str(tmp_path / "none*.nii.gz"), "--output", str(tmp_path / "db.json")]) == 2
    )
    assert "no mask file" in capsys.readouterr().err
    assert _index(masks_copy, "--mask-root", str(tmp_path / "nowhere")) == 2
    assert "--mask-root" in capsys.readouterr().err
    assert not (masks_copy / "db.json").exists()


# ------------------------------------------------------------------------------------------------ sizes


def _sizes_datalist(masks_copy, labels=("ts.nii.gz", "chest.nrrd", "ts_tumour.nii.gz")) -> Path:
    cases = [{"image": f"masks/{name}", "label": f"masks/{name}" if name else None} for name in labels]
    path = masks_copy / "datalist.json"
    path.write_text(json.dumps({"training": cases}))
    return path


def test_sizes_builds_a_reference_and_adds_anatomy_size(masks_copy, capsys):
    datalist = _sizes_datalist(masks_copy)
    out, ref = masks_copy / "out" / "sized.json", masks_copy / "reference.json"
    assert (
        main(["sizes", "--datalist", str(datalist), "--output", str(out), "--build-reference", str(ref)]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    cases = json.loads(out.read_text())["training"]
    sizes = {Path(c["label"]).name: c["anatomy_size"] for c in cases}
    ts = read_mask(masks_copy / "masks" / "ts.nii.gz")
    liver_ml = np.count_nonzero(ts.array == 1) * np.prod(ts.spacing) / 1000
    reference = json.loads(ref.read_text())["size_reference"]
    assert reference["liver"] == pytest.approx([liver_ml, liver_ml], rel=1e-4)  # ts and ts_tumour
    tumour = read_mask(masks_copy / "masks" / "ts_tumour.nii.gz").array == 23
    assert reference["lung tumor"] == [pytest.approx(tumour.sum() * np.prod(ts.spacing) / 1000, rel=1e-3)]
    assert sizes["ts.nii.gz"][1] == 0.5 and sizes["ts_tumour.nii.gz"][1] == 0.5  # a tie: the mean rank
    assert (
        sizes["chest.nrrd"][1] == -1 and sizes["ts.nii.gz"][5] == -1 and sizes["ts_tumour.nii.gz"][5] == 0.5
    )
    # the output lives in another folder: its paths are rewritten to stay right
    assert (out.parent / cases[0]["label"]).resolve() == (masks_copy / "masks" / "ts.nii.gz").resolve()

    again = masks_copy / "again.json"
    assert main(["sizes", "--datalist", str(datalist), "--output", str(again), "--reference", str(ref)]) == 0
    assert [c["anatomy_size"] for c in json.loads(again.read_text())["training"]] == [
        c["anatomy_size"] for c in cases
    ]


def test_sizes_bad_inputs_exit_2_naming_them_and_write_nothing(masks_copy, capsys):
    out, ref = masks_copy / "sized.json", masks_copy / "reference.json"
    datalist = _sizes_datalist(masks_copy, ("ts.nii.gz", None, "gone.nii.gz"))
    assert (
        main(["sizes", "--datalist", str(datalist), "--output", str(out), "--build-reference", str(ref)]) == 2
    )
    err = capsys.readouterr().err
    assert "$.training[1].label: the case has no label" in err and "Traceback" not in err
    assert "$.training[2].label: file not found" in err and "gone.nii.gz" in err
    assert not out.exists() and not ref.exists()

    # a reference without lung tumours cannot rank the tumour of ts_tumour
    no_tumour = _sizes_datalist(masks_copy, ("ts.nii.gz",))
    assert (
        main(["sizes", "--datalist", str(no_tumour), "--output", str(out), "--build-reference", str(ref)])
        == 0
    )
    out.unlink()
    datalist = _sizes_datalist(masks_copy, ("ts.nii.gz", "ts_tumour.nii.gz"))
    assert main(["sizes", "--datalist", str(datalist), "--output", str(out), "--reference", str(ref)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{ref}: case $.training[1] (masks/ts_tumour.nii.gz)" in err and "no volumes of 'lung tumor'" in err
    )
    assert not out.exists()

    assert (
        main(["sizes", "--datalist", str(datalist), "--output", str(out), "--build-reference", str(out)]) == 2
    )
    assert "are one file: both would write it" in capsys.readouterr().err
    bad_ref = masks_copy / "bad_ref.json"
    bad_ref.write_text(json.dumps({"size_reference": {"liver": [1.0]}}))
    assert (
        main(["sizes", "--datalist", str(datalist), "--output", str(out), "--reference", str(bad_ref)]) == 2
    )
    assert "bad_ref.json: $.size_reference must name each of the 10 size slots" in capsys.readouterr().err
    assert not out.exists()
