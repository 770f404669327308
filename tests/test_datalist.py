"""Datalists: build from a folder, validate everything at once, fold semantics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from maisi.data.datalist import find_cases, read_datalist, split_by_fold, split_folds, validate_datalist
from maisi.data.io import Volume, read_volume, write_volume
from maisi.datalist import main
from maisi.errors import ConfigError, InputError
from maisi.labels import load_label_dict


def _build(root, out, *extra):
    return main(
        [
            "build",
            "--root",
            str(root),
            "--images",
            "*/imaging.nii.gz",
            "--labels",
            "*/segmentation.nii.gz",
            "--output",
            str(out),
            *extra,
        ]
    )


def test_build_then_validate_round_trips_on_real_ct(real_cases, tmp_path, capsys):
    out = real_cases / "datalist.json"
    assert _build(real_cases, out, "--num-folds", "3", "--seed", "1") == 0
    data = read_datalist(out)
    assert [e["image"] for e in data["training"]] == [f"case{i}/imaging.nii.gz" for i in range(3)]
    first = data["training"][0]
    assert first["dim"] == [122, 101, 30] and first["spacing"] == [3.0, 3.0, 3.0]
    # lower lung lobes and abdominal organs in these 30 slices: chest to abdomen
    assert first["top_region_index"] == [0, 1, 0, 0] and first["bottom_region_index"] == [0, 0, 1, 0]
    assert first["modality"] == "ct"
    assert sorted(e["fold"] for e in data["training"]) == [0, 1, 2]
    assert main(["validate", "--datalist", str(out), "--num-folds", "3"]) == 0
    # a datalist elsewhere keeps working: paths are relative to it
    other = tmp_path / "lists" / "dl.json"
    assert _build(real_cases, other) == 0
    assert json.loads(other.read_text())["training"][0]["image"].startswith("../")
    assert main(["validate", "--datalist", str(other)]) == 0


def test_validate_lists_every_problem(real_cases, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(real_cases, root)
    assert _build(root, root / "dl.json", "--num-folds", "3") == 0
    data = json.loads((root / "dl.json").read_text())
    data["training"][0]["spacing"] = [1.0, 1.0, 1.0]
    data["training"][1]["dim"] = [1, 2, 3]
    (root / "case2" / "imaging.nii.gz").unlink()
    bad_label = read_volume(root / "case1" / "segmentation.nii.gz")
    arr = bad_label.array.copy()
    arr[0, 0, 0] = 250
    write_volume(root / "case1" / "segmentation.nii.gz", bad_label.with_array(arr))
    data["training"].append(
        {"image": "case0/imaging.nii.gz", "label": "case0/segmentation.nii.gz", "fold": 7}
    )
    (root / "dl.json").write_text(json.dumps(data))
    assert main(["validate", "--datalist", str(root / "dl.json"), "--num-folds", "3"]) == 2
    err = capsys.readouterr().err
    for fragment in (
        "$.training[0].spacing: [1.0, 1.0, 1.0] but the header says [3.0, 3.0, 3.0]",
        "$.training[1].dim: [1, 2, 3] but the header says [122, 101, 30]",
        "$.training[1]: ",
        "labels not in the label dictionary: [250]",
        "$.training[2]: file not found",
        "$.training[3].image: 'case0/imaging.nii.gz' is also case 0",
        "fold 7 is outside 0..2",
    ):
        assert fragment in err, err


def test_label_on_another_grid_is_a_problem(real_cases, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(real_cases, root)
    write_volume(root / "case0" / "segmentation.nii.gz", Volume(np.zeros((10, 10, 10), np.uint8), np.eye(4)))
    with pytest.raises(InputError, match="differs from its image"):
        from maisi.data.datalist import build_datalist

        build_datalist(root, "*/imaging.nii.gz", "*/segmentation.nii.gz", root / "dl.json", load_label_dict())


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{", "not valid JSON"),
        ('{"training": [{"label": "x"}]}', "$.training[0]: 'image' is a required property"),
        ('{"training": [{"image": "a", "colour": 1}]}', "unknown key 'colour'"),
    ],
)
def test_unreadable_datalists_exit_2(tmp_path, capsys, text, fragment):
    path = tmp_path / "dl.json"
    path.write_text(text)
    assert main(["validate", "--datalist", str(path)]) == 2
    assert fragment in capsys.readouterr().err
    with pytest.raises(ConfigError):
        read_datalist(path)


def test_pairing_by_glob_wildcards_nnunet_style(tmp_path):
    for name in ("a", "b"):
        for folder, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / f"{name}{suffix}.nii.gz").write_bytes(b"")
    (tmp_path / "imagesTr" / "c_0000.nii.gz").write_bytes(b"")
    pairs, problems = find_cases(tmp_path, "imagesTr/*_0000.nii.gz", "labelsTr/*.nii.gz")
    assert [(image.name, label.name) for image, label in pairs] == [
        ("a_0000.nii.gz", "a.nii.gz"),
        ("b_0000.nii.gz", "b.nii.gz"),
    ]
    assert len(problems) == 1 and "c_0000.nii.gz: no label matches" in problems[0]


def test_folds_are_seeded_and_balanced():
    folds = split_folds(11, 5, seed=3)
    assert folds == split_folds(11, 5, seed=3) and folds != split_folds(11, 5, seed=4)
    assert sorted(np.bincount(folds).tolist()) == [2, 2, 2, 2, 3]


def test_configured_fold_is_the_validation_set():
    data = {"training": [{"image": f"{i}", "fold": i % 3} for i in range(6)]}
    train, val = split_by_fold(data, 1)
    assert [(i, e["image"]) for i, e in val] == [(1, "1"), (4, "4")] and len(train) == 4
    assert split_by_fold(data, None) == (list(enumerate(data["training"])), [])
    with pytest.raises(InputError, match="no case has fold 5"):
        split_by_fold(data, 5)
    with pytest.raises(InputError, match="training set would be empty"):
        split_by_fold({"training": [{"image": "a", "fold": 0}]}, 0)


def test_validate_flags_a_single_fold(real_cases):
    data = {"training": [{"image": f"case{i}/imaging.nii.gz", "fold": 0} for i in range(3)]}
    problems = validate_datalist(data, real_cases, load_label_dict())
    assert any("every case is in fold 0" in p for p in problems)


def test_validate_reports_duplicates_and_cases_whose_latents_would_collide(real_cases, tmp_path, capsys):
    """Issue 18: c3/ct.nii.gz and c3/ct.nrrd encode to one c3/ct_emb.nii.gz, and validate passed."""
    root = tmp_path / "data"
    shutil.copytree(real_cases, root)
    write_volume(root / "case0" / "imaging.nrrd", read_volume(root / "case0" / "imaging.nii.gz"))
    entries = [
        {"image": "case0/imaging.nii.gz"},
        {"image": "case1/imaging.nii.gz"},
        {"image": "./case1/imaging.nii.gz"},
        {"image": "case0/imaging.nrrd"},
    ]
    (root / "dl.json").write_text(json.dumps({"training": entries}))
    assert main(["validate", "--datalist", str(root / "dl.json")]) == 2
    err = capsys.readouterr().err
    assert "$.training[2].image: './case1/imaging.nii.gz' is also case 1" in err, err
    assert (
        "$.training[3].image: 'case0/imaging.nrrd' and case 0 ('case0/imaging.nii.gz') would both be "
        "encoded to <output_dir>/case0/imaging_emb.nii.gz"
    ) in err, err
    assert "2 problem(s)" in err
