"""``python -m maisi.labels``: add, remap and envelope on real CT, and their bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maisi.data.io import Volume, read_mask, read_volume, write_volume
from maisi.labels import BODY_LABEL, load_label_dict
from maisi.labels.__main__ import main
from maisi.labels.envelope import body_envelope
from maisi.labels.mapping import load_mapping, remap

DATA = Path(__file__).parent / "data"
TS_CT, TS_SEG = DATA / "totalseg_example_ct_sm.nii.gz", DATA / "totalseg_example_seg.nii.gz"
CHEST_CT, CHEST_SEG = DATA / "slicerio_CTChest4.nrrd", DATA / "slicerio_Segmentation.seg.nrrd"


def test_add_takes_the_first_dummy_slot_and_prints_its_id(tmp_path, capsys):
    out = tmp_path / "labels.json"
    assert main(["add", "--name", "kidney tumor", "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "16"  # dummy2: dummy1 (id 2) was a body-region marker
    extended = json.loads(out.read_text())
    assert extended["kidney tumor"] == 16 and "dummy2" not in extended and len(extended) == 133
    assert main(["add", "--name", "lung nodule", "--label-dict", str(out)]) == 0  # in place, next slot
    assert capsys.readouterr().out.strip() == "18"
    assert json.loads(out.read_text())["lung nodule"] == 18
    assert main(["add", "--name", "cyst x", "--id", "150", "--label-dict", str(out)]) == 0
    assert json.loads(out.read_text())["cyst x"] == 150


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--name", "liver", "--output", "{out}"], "class 'liver' is already in the dictionary with id 1"),
        (["--name", "new", "--id", "1", "--output", "{out}"], "cannot give id 1 to 'new': it is taken by 'liver'"),
        (["--name", "new", "--id", "200", "--output", "{out}"], "cannot give id 200 to 'new': it is taken by 'body'"),
        (["--name", "new", "--id", "300", "--output", "{out}"], "must lie in 1..255"),
        (["--name", "new"], "--output is required"),
    ],
)
def test_add_refuses_collisions_and_writes_nothing(tmp_path, capsys, args, fragment):
    out = tmp_path / "labels.json"
    assert main(["add", *[a.format(out=out) for a in args]]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_remap_totalsegmentator_keeps_every_mapped_voxel(tmp_path, capsys):
    out = tmp_path / "maisi.nii.gz"
    assert main(["remap", "--mask", str(TS_SEG), "--mapping", "totalsegmentator", "--output", str(out)]) == 0
    source, result = read_mask(TS_SEG), read_mask(out)
    mapping = load_mapping("totalsegmentator", load_label_dict())
    for sid in np.unique(source.array):
        if sid:
            assert np.all(result.array[source.array == sid] == mapping.targets[int(sid)])
    assert np.array_equal(result.array == 0, source.array == 0)
    np.testing.assert_allclose(result.affine, source.affine)
    assert "liver -> liver" in capsys.readouterr().out
    maisi_ids = set(load_label_dict().values())
    assert set(np.unique(result.array).tolist()) - {0} <= maisi_ids


def test_remap_lists_unmapped_classes_and_strict_refuses(tmp_path, capsys):
    out = tmp_path / "maisi.nii.gz"
    args = ["remap", "--mask", str(CHEST_SEG), "--mapping", "slicerio_chest_sample", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in ("ribs", "right lung", "left lung", "thoracic vertebral column"):
        assert f"UNMAPPED {name} (id" in printed
    assert set(np.unique(read_mask(out).array).tolist()) == {0, BODY_LABEL}
    out.unlink()
    assert main([*args, "--strict"]) == 2
    assert "have no MAISI target" in capsys.readouterr().err and not out.exists()


def test_remap_reports_ids_missing_from_the_mapping():
    mapping = load_mapping("totalsegmentator", load_label_dict())
    remapped, report = remap(np.array([[[0, 5, 250]]], dtype=np.uint8), mapping)
    assert report.unknown_ids == {250: 1} and remapped.tolist() == [[[0, 1, 0]]] and not report.complete


def test_mapping_naming_unknown_classes_is_refused(tmp_path, capsys):
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"mapping": [{"source_id": 1, "source_name": "a", "target": "livre"},
                                           {"source_id": 1, "source_name": "b", "target": "liver"}]}))  # fmt: skip
    args = ["remap", "--mask", str(TS_SEG), "--mapping", str(bad), "--output", str(tmp_path / "o.nii.gz")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "$.mapping[0]: target 'livre' is not a class" in err and "$.mapping[1]: source_id 1 appears more" in err


@pytest.mark.parametrize("ct_path, seg_path", [(TS_CT, TS_SEG), (CHEST_CT, CHEST_SEG)], ids=["abdomen", "chest"])
def test_envelope_adds_200_inside_the_body_only_and_keeps_organs(tmp_path, capsys, ct_path, seg_path):
    out = tmp_path / "with_body.nii.gz"
    assert main(["envelope", "--image", str(ct_path), "--mask", str(seg_path), "--output", str(out)]) == 0
    ct, source, result = read_volume(ct_path), read_mask(seg_path), read_mask(out)
    organs = source.array > 0
    assert np.array_equal(result.array[organs], source.array[organs])  # no organ voxel changed
    added = result.array != source.array
    assert np.all(result.array[added] == BODY_LABEL) and np.all(source.array[added] == 0)
    # outside air stays background: the corners of every axial slice are air in these scans
    corners = np.zeros(ct.shape, dtype=bool)
    corners[:4, :4, :] = corners[-4:, -4:, :] = corners[:4, -4:, :] = corners[-4:, :4, :] = True
    assert np.all(ct.array[corners] < -800) and not np.any(result.array[corners] == BODY_LABEL)
    # labelled body (organs + 200) is a plausible share of the scan; new 200 voxels are mostly tissue
    assert 0.2 < (result.array > 0).mean() < 0.9
    assert added.sum() > 1000 and np.mean(ct.array[added] > -800) > 0.5
    assert "added body label" in capsys.readouterr().out


def test_envelope_drops_a_separate_table():
    ct = np.full((40, 40, 6), -1000, dtype=np.int16)
    ct[10:30, 8:28, :] = 40  # body
    ct[5:35, 31:33, :] = 200  # table below it (posterior), not touching
    ct[17:23, 15:21, :] = -900  # air inside the body (bowel gas) must be filled
    envelope = body_envelope(Volume(ct, np.eye(4)))
    assert envelope[20, 20, 3] and envelope[18, 16, 2] and not envelope[20, 32, 3]


def test_envelope_on_different_grids_is_refused(tmp_path, capsys):
    other = write_volume(tmp_path / "small.nii.gz", Volume(np.zeros((10, 10, 10), np.uint8), np.eye(4)))
    assert main(["envelope", "--image", str(TS_CT), "--mask", str(other), "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "CT and mask grids differ" in capsys.readouterr().err and not (tmp_path / "o.nii.gz").exists()


def test_non_integer_mask_is_refused(tmp_path, capsys):
    soft = write_volume(tmp_path / "soft.nii.gz", Volume(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)))
    assert main(["remap", "--mask", str(soft), "--mapping", "totalsegmentator", "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "must hold integer labels" in capsys.readouterr().err


def test_crop_centres_a_box_on_the_labels_and_keeps_world_positions(tmp_path, capsys):
    ct_out, mask_out = tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"
    mask = read_mask(TS_SEG)
    spleen = int(mask.array[mask.array > 0].min())  # any class present serves as the "lesion"
    assert main(["crop", "--image", str(TS_CT), "--mask", str(TS_SEG), "--around", str(spleen), "--size-mm",
                 "60", "45", "30", "--output-image", str(ct_out), "--output-mask", str(mask_out)]) == 0  # fmt: skip
    assert "cropped to" in capsys.readouterr().out
    ct, cut, cut_ct = read_volume(TS_CT), read_mask(mask_out), read_volume(ct_out)
    expected = tuple(min(n, round(mm / s)) for n, mm, s in zip(mask.shape, (60, 45, 30), mask.spacing))
    assert cut.shape == cut_ct.shape == expected
    # every voxel keeps its world position: map the crop's voxel 0 back into the source grid
    corner = np.rint(np.linalg.solve(mask.affine, cut.affine @ [0, 0, 0, 1])[:3]).astype(int)
    box = tuple(slice(c, c + n) for c, n in zip(corner, cut.shape))
    assert np.array_equal(cut.array, mask.array[box]) and np.array_equal(cut_ct.array, ct.array[box])
    # the labels' bounding box is centred in the crop on every axis where the box was not pushed off an edge
    inside = np.argwhere(cut.array == spleen)
    centre = (inside.min(0) + inside.max(0)) / 2
    for axis, (c, n, start) in enumerate(zip(centre, cut.shape, corner)):
        if 0 < start < mask.shape[axis] - n:
            assert abs(c - (n - 1) / 2) <= 1, axis


def test_crop_of_an_absent_label_names_the_mask_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    assert main(["crop", "--image", str(TS_CT), "--mask", str(TS_SEG), "--around", "250", "--size-mm", "50", "50",
                 "50", "--output-image", str(out), "--output-mask", str(tmp_path / "m.nii.gz")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert str(TS_SEG) in err and "labels [250] are not in the mask" in err
    assert not list(tmp_path.iterdir())


def test_crop_of_a_mask_on_another_grid_is_refused(tmp_path, capsys):
    assert main(["crop", "--image", str(TS_CT), "--mask", str(CHEST_SEG), "--around", "5", "--size-mm", "50", "50",
                 "50", "--output-image", str(tmp_path / "c.nii.gz"), "--output-mask", str(tmp_path / "m.nii.gz")]) == 2  # fmt: skip
    assert "CT and mask grids differ" in capsys.readouterr().err and not list(tmp_path.iterdir())
