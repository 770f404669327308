"""``python -m maisi.labels``: add, remap and envelope on real CT, and their bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
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
REMAP_TS = ["remap", "--mask", str(TS_SEG), "--mapping", "totalsegmentator"]


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
        (
            ["--name", "new", "--id", "1", "--output", "{out}"],
            "cannot give id 1 to 'new': it is taken by 'liver'",
        ),
        (
            ["--name", "new", "--id", "200", "--output", "{out}"],
            "cannot give id 200 to 'new': it is taken by 'body'",
        ),
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
    bad.write_text(
        json.dumps(
            {
                "mapping": [
                    {"source_id": 1, "source_name": "a", "target": "livre"},
                    {"source_id": 1, "source_name": "b", "target": "liver"},
                ]
            }
        )
    )
    args = ["remap", "--mask", str(TS_SEG), "--mapping", str(bad), "--output", str(tmp_path / "o.nii.gz")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "$.mapping[0]: target 'livre' is not a class" in err
        and "$.mapping[1]: source_id 1 appears more" in err
    )


@pytest.mark.parametrize(
    "ct_path, seg_path", [(TS_CT, TS_SEG), (CHEST_CT, CHEST_SEG)], ids=["abdomen", "chest"]
)
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
    assert (
        main(
            ["envelope", "--image", str(TS_CT), "--mask", str(other), "--output", str(tmp_path / "o.nii.gz")]
        )
        == 2
    )
    assert "CT and mask grids differ" in capsys.readouterr().err and not (tmp_path / "o.nii.gz").exists()


def test_non_integer_mask_is_refused(tmp_path, capsys):
    soft = write_volume(tmp_path / "soft.nii.gz", Volume(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)))
    assert (
        main(
            [
                "remap",
                "--mask",
                str(soft),
                "--mapping",
                "totalsegmentator",
                "--output",
                str(tmp_path / "o.nii.gz"),
            ]
        )
        == 2
    )
    assert "must hold integer labels" in capsys.readouterr().err


def test_crop_centres_a_box_on_the_labels_and_keeps_world_positions(tmp_path, capsys):
    ct_out, mask_out = tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"
    mask = read_mask(TS_SEG)
    spleen = int(mask.array[mask.array > 0].min())  # any class present serves as the "lesion"
    assert (
        main(
            [
                "crop",
                "--image",
                str(TS_CT),
                "--mask",
                str(TS_SEG),
                "--around",
                str(spleen),
                "--size-mm",
                "60",
                "45",
                "30",
                "--output-image",
                str(ct_out),
                "--output-mask",
                str(mask_out),
            ]
        )
        == 0
    )
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
    assert (
        main(
            [
                "crop",
                "--image",
                str(TS_CT),
                "--mask",
                str(TS_SEG),
                "--around",
                "250",
                "--size-mm",
                "50",
                "50",
                "50",
                "--output-image",
                str(out),
                "--output-mask",
                str(tmp_path / "m.nii.gz"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(TS_SEG) in err and "labels [250] are not in the mask" in err
    assert not list(tmp_path.iterdir())


def test_crop_of_a_mask_on_another_grid_is_refused(tmp_path, capsys):
    assert (
        main(
            [
                "crop",
                "--image",
                str(TS_CT),
                "--mask",
                str(CHEST_SEG),
                "--around",
                "5",
                "--size-mm",
                "50",
                "50",
                "50",
                "--output-image",
                str(tmp_path / "c.nii.gz"),
                "--output-mask",
                str(tmp_path / "m.nii.gz"),
            ]
        )
        == 2
    )
    assert "CT and mask grids differ" in capsys.readouterr().err and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- lungs in the envelope


@pytest.fixture(scope="module")
def chest_without_lungs(tmp_path_factory) -> Path:
    """slicerio's chest mask in MAISI ids: its lungs (and all but its 'tissue' class) have no target."""
    out = tmp_path_factory.mktemp("chest") / "no_lungs.nii.gz"
    args = ["remap", "--mask", str(CHEST_SEG), "--mapping", "slicerio_chest_sample", "--output", str(out)]
    assert main(args) == 0
    assert set(np.unique(read_mask(out).array).tolist()) == {0, BODY_LABEL}
    return out


def test_envelope_of_a_chest_mask_without_lungs_warns_with_the_numbers(
    tmp_path, capsys, caplog, chest_without_lungs
):
    out = tmp_path / "body.nii.gz"
    args = ["envelope", "--image", str(CHEST_CT), "--mask", str(chest_without_lungs), "--output", str(out)]
    assert main(args) == 0
    ct = read_volume(CHEST_CT)
    body = (read_mask(out).array == BODY_LABEL) & (read_mask(chest_without_lungs).array == 0)  # added
    below = int((ct.array[body] < -400).sum())
    assert below / body.sum() > 0.5  # this tight chest crop is mostly lung
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    share = f"{100 * below / body.sum():.1f}%"
    assert f"{below} of the {int(body.sum())} voxels labelled body ({share})" in warning
    assert "below -400 HU and the mask has no lung labels" in warning and "--lungs-from-hu" in warning
    assert f"{share} of them below -400 HU" in capsys.readouterr().out


def test_envelope_of_a_mask_with_lungs_does_not_warn(tmp_path, caplog):
    maisi_ids = tmp_path / "maisi.nii.gz"
    assert main([*REMAP_TS, "--output", str(maisi_ids)]) == 0
    assert np.isin(read_mask(maisi_ids).array, [28, 29, 30, 31, 32]).any()  # the lung bases are labelled
    caplog.clear()
    out = tmp_path / "body.nii.gz"
    assert main(["envelope", "--image", str(TS_CT), "--mask", str(maisi_ids), "--output", str(out)]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_lungs_from_hu_labels_the_lungs_of_a_real_chest(tmp_path, capsys, caplog, chest_without_lungs):
    out = tmp_path / "body_lungs.nii.gz"
    args = ["envelope", "--image", str(CHEST_CT), "--mask", str(chest_without_lungs), "--output", str(out)]
    assert main([*args, "--lungs-from-hu", "28"]) == 0
    result, ct = read_mask(out).array, read_volume(CHEST_CT).array
    lungs = np.isin(read_mask(CHEST_SEG).array, [5, 6])  # slicerio's right and left lung segments
    found = result == 28
    dice = 2 * (found & lungs).sum() / (found.sum() + lungs.sum())
    assert dice > 0.97, dice
    # bowel gas below the lungs (separate air components of 137 and 72 mL) stays body, the outside stays air
    gas = (ct < -400) & (result == BODY_LABEL)
    assert gas.sum() > 2000 and not (gas & lungs).sum() > 0.01 * lungs.sum()
    changed = result != read_mask(chest_without_lungs).array
    assert not np.any(changed & ~body_envelope(read_volume(CHEST_CT)))  # nothing outside the body
    assert set(np.unique(result).tolist()) == {0, 28, BODY_LABEL}
    printed = capsys.readouterr().out
    assert f"labelled {int(found.sum())} voxels" in printed and "as lung id 28" in printed
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # the mask now derives the chest region
    from maisi.conditioning import body_region_from_mask

    assert body_region_from_mask(result) == ("chest", "chest")


def test_lungs_from_hu_keeps_labelled_organs(tmp_path):
    """Voxels the mask labels already (here the right lung as some class 7) are never relabelled."""
    seg = read_mask(CHEST_SEG)
    partial = seg.with_array(np.where(seg.array == 5, 7, 0).astype(np.uint8))
    mask = write_volume(tmp_path / "right_lung_as_7.nii.gz", partial)
    out = tmp_path / "o.nii.gz"
    args = ["envelope", "--image", str(CHEST_CT), "--mask", str(mask), "--output", str(out)]
    assert main([*args, "--lungs-from-hu", "29"]) == 0
    result = read_mask(out).array
    assert np.array_equal(result[partial.array == 7], partial.array[partial.array == 7])
    left = seg.array == 6
    assert (result[left] == 29).mean() > 0.95  # the unlabelled left lung is found


# ----------------------------------------------------------------------------- bad input, nothing written


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _commands(work: Path) -> dict[str, list[str]]:
    """One valid call of every subcommand that writes, with {out} for the output.

    The inputs are copies in ``work``: a missing check must not overwrite the repository's test data.
    """
    ct, seg = work / "ct.nii.gz", work / "seg.nii.gz"
    for src, dst in ((TS_CT, ct), (TS_SEG, seg)):
        dst.write_bytes(src.read_bytes())
    crop = ["crop", "--image", str(ct), "--mask", str(seg), "--around", "5", "--size-mm", "30", "30", "30"]
    return {
        "add": ["add", "--name", "new class", "--output", "{out}"],
        "remap": ["remap", "--mask", str(seg), "--mapping", "totalsegmentator", "--output", "{out}"],
        "envelope": ["envelope", "--image", str(ct), "--mask", str(seg), "--output", "{out}"],
        "crop image": [*crop, "--output-image", "{out}", "--output-mask", str(work / "m.nii.gz")],
        "crop mask": [*crop, "--output-image", str(work / "c.nii.gz"), "--output-mask", "{out}"],
    }


OUTPUT_CASES = [
    (command, where)
    for command in ("add", "remap", "envelope", "crop image", "crop mask")
    for where in ("a folder", "under a file", "an input")
    if (command, where) != ("add", "an input")  # add writes in place without --output: documented
]


@pytest.mark.parametrize("command, where", OUTPUT_CASES)
def test_every_output_location_is_checked_before_work(tmp_path, capsys, command, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a_file.txt").write_text("x\n")
    args = _commands(work)[command]
    if where == "a folder":
        out = work / "existing.nii.gz"
        out.mkdir()
        fragment = "is a folder"
    elif where == "under a file":
        out = work / "a_file.txt" / "o.nii.gz"
        fragment = "a_file.txt is a file, not a folder"
    else:
        out = work / "seg.nii.gz"
        fragment = "would overwrite --mask"
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert main([a.format(out=out) for a in args]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and fragment in err, err
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before  # nothing written or changed
    expected = [*before, work / "existing.nii.gz"] if where == "a folder" else list(before)
    assert sorted(work.rglob("*")) == sorted(expected)


ENVELOPE = ["envelope", "--image", str(TS_CT), "--mask", str(TS_SEG)]
CROP = ["crop", "--image", str(TS_CT), "--mask", str(TS_SEG), "--around", "5"]
CROP_30 = [*CROP, "--size-mm", "30", "30", "30"]
BAD_VALUES = {
    "threshold nan": ([*ENVELOPE, "--threshold", "nan"], "--threshold nan: must be a number in [-1000, 0]"),
    "threshold inf": ([*ENVELOPE, "--threshold", "inf"], "--threshold inf"),
    "threshold above tissue": ([*ENVELOPE, "--threshold", "300"], "--threshold 300: must be a number in"),
    "opening nan": ([*ENVELOPE, "--opening-mm", "nan"], "--opening-mm nan: must be a number in [0, 50] mm"),
    "opening inf": ([*ENVELOPE, "--opening-mm", "inf"], "--opening-mm inf"),
    "opening negative": ([*ENVELOPE, "--opening-mm", "-1"], "--opening-mm -1"),
    "lung id 200": ([*ENVELOPE, "--lungs-from-hu", "200"], "--lungs-from-hu 200: must be a label id"),
    "lung id 0": ([*ENVELOPE, "--lungs-from-hu", "0"], "--lungs-from-hu 0"),
    "size nan": ([*CROP, "--output-image", "{dir}/c.nii.gz", "--size-mm", "9", "nan", "9"], "--size-mm nan"),
    "size inf": ([*CROP, "--output-image", "{dir}/c.nii.gz", "--size-mm", "inf", "9", "9"], "--size-mm inf"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
def test_bad_numbers_are_refused_before_work(tmp_path, capsys, case):
    args, fragment = BAD_VALUES[case]
    output = ["--output-mask" if args[0] == "crop" else "--output", str(tmp_path / "o.nii.gz")]
    assert main([a.format(dir=tmp_path) for a in args] + output) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_show_of_a_folder_is_refused(tmp_path, capsys):
    assert main(["show", "--label-dict", str(tmp_path)]) == 2
    assert f"label dictionary {tmp_path}: is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["show", "add", "remap"])
def test_non_utf8_label_dictionary_is_refused_naming_it(tmp_path, capsys, command):
    labels = tmp_path / "labels_latin1.json"
    labels.write_bytes('{"liver": 1, "tumeur hépatique": 2}'.encode("latin-1"))
    args = {
        "show": ["show", "--label-dict", str(labels)],
        "add": ["add", "--name", "x", "--label-dict", str(labels), "--output", str(tmp_path / "o.json")],
        "remap": [*REMAP_TS, "--label-dict", str(labels), "--output", str(tmp_path / "o.nii.gz")],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{labels}: not UTF-8 text (byte 0xe9" in err and "Traceback" not in err
    assert _listing(tmp_path) == ["labels_latin1.json"]


def test_label_dictionary_with_a_utf8_byte_order_mark_loads(tmp_path):
    labels = tmp_path / "bom.json"
    labels.write_bytes(b"\xef\xbb\xbf" + '{"liver": 1, "tumeur hépatique": 2}'.encode())
    assert load_label_dict(labels) == {"liver": 1, "tumeur hépatique": 2}


def test_crop_with_an_unwritable_mask_format_writes_neither(tmp_path, capsys):
    """It used to write the CT and then fail on the mask: half a pair."""
    ct_out, mask_out = tmp_path / "ct.nii.gz", tmp_path / "mask.png"
    crop = [*CROP_30, "--output-image", str(ct_out), "--output-mask", str(mask_out)]
    assert main(crop) == 2
    assert "--output-mask" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_crop_that_fails_writing_the_mask_leaves_neither_file(tmp_path, capsys, monkeypatch):
    import SimpleITK as sitk

    real_write, calls = sitk.WriteImage, []

    def write_then_fail(image, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_write(image, filename, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", write_then_fail)
    ct_out, mask_out = tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"
    crop = [*CROP_30, "--output-image", str(ct_out), "--output-mask", str(mask_out)]
    assert main(crop) == 1
    assert len(calls) == 2 and "disk full" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # neither output, no temporary file


# ----------------------------------------------------------------------------- broken volumes via the CLI


def test_envelope_of_a_dicom_series_with_a_truncated_slice_is_refused(tmp_path, capsys):
    series = tmp_path / "series"
    series.mkdir()
    for src in sorted((DATA / "totalseg_dicom3").iterdir()):
        (series / src.name).write_bytes(src.read_bytes())
    middle = sorted(series.iterdir())[1]
    middle.write_bytes(middle.read_bytes()[:50000])
    mask = write_volume(tmp_path / "mask.nii.gz", Volume(np.zeros((512, 512, 3), np.uint8), np.eye(4)))
    out = tmp_path / "o.nii.gz"
    assert main(["envelope", "--image", str(series), "--mask", str(mask), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert middle.name in err and "not part of the DICOM series" in err and not out.exists()


def test_remap_of_a_mask_with_zero_spacing_is_refused(tmp_path, capsys):
    """It used to end in a ValueError traceback (exit 1)."""
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4))
    img.header["srow_x"] = [0.0, 0.0, 0.0, 0.0]
    mask = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(img.dataobj, None, img.header), mask)
    out = tmp_path / "o.nii.gz"
    assert main(["remap", "--mask", str(mask), "--mapping", "totalsegmentator", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{mask}: voxel spacing [0.0, 1.0, 1.0] mm is not usable" in err and "(0, 100] mm" in err
    assert not out.exists()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.uint16])
def test_envelope_of_a_narrow_signed_mask_writes_the_body_label(tmp_path, capsys, dtype):
    """An int8 mask (NRRD 'signed char') crashed with OverflowError: 200 does not fit."""
    ct = read_volume(TS_CT)
    seg = read_mask(TS_SEG)
    small = np.where(seg.array > 0, 5, 0).astype(dtype)
    write_volume(tmp_path / "mask.nrrd", seg.with_array(small))
    assert read_mask(tmp_path / "mask.nrrd").array.dtype == dtype
    out = tmp_path / "body.nii.gz"
    assert (
        main(["envelope", "--image", str(TS_CT), "--mask", str(tmp_path / "mask.nrrd"), "--output", str(out)])
        == 0
    )
    labelled = read_mask(out).array
    assert set(np.unique(labelled).tolist()) == {0, 5, BODY_LABEL}
    np.testing.assert_array_equal(labelled[small == 5], 5)
    assert (labelled == BODY_LABEL).sum() > 0.1 * ct.array.size


def test_remap_of_a_mask_with_negative_labels_names_the_file(tmp_path, capsys):
    seg = read_mask(TS_SEG)
    array = seg.array.astype(np.int16)
    array[0, 0, 0] = -1
    write_volume(tmp_path / "neg.nii.gz", seg.with_array(array))
    out = tmp_path / "out.nii.gz"
    assert (
        main(
            [
                "remap",
                "--mask",
                str(tmp_path / "neg.nii.gz"),
                "--mapping",
                "totalsegmentator",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{tmp_path / 'neg.nii.gz'}: mask holds negative labels (-1)" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("ct", [TS_CT, CHEST_CT], ids=["nifti int16", "nrrd int32"])
def test_resample_of_a_ct_is_refused_naming_it(tmp_path, capsys, ct):
    out = tmp_path / "out.nii.gz"
    assert main(["resample", "--mask", str(ct), "--output", str(out), "--spacing", "4", "4", "4"]) == 2
    err = capsys.readouterr().err
    assert f"{ct}: values are not labels" in err and "a CT" in err and "Traceback" not in err, err
    assert not out.exists()


def test_resample_of_a_mask_still_works(tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    assert main(["resample", "--mask", str(TS_SEG), "--output", str(out), "--spacing", "4", "4", "4"]) == 0
    assert np.allclose(read_mask(out).spacing, (4, 4, 4))
