"""maisi.masks.database: MAISI's candidate format, index (restart, bad masks, workers), load checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maisi.data.io import Volume, read_mask, write_volume
from maisi.errors import InputError, VolumeError
from maisi.files import file_sha256
from maisi.masks.database import (
    DatabaseError,
    build_database,
    index_masks,
    label_counts,
    load_database,
    read_entry_mask,
    summarise,
    write_database,
)
from maisi.masks.retrieval import select_masks

REPO = Path(__file__).resolve().parents[2]


def test_index_real_masks_records_what_maisi_reads_and_what_we_add(real_masks, tmp_path):
    out = tmp_path / "db.json"
    report = index_masks([real_masks / "masks"], out, mask_root=real_masks)
    assert (report.indexed, report.kept, report.dropped, report.bad) == (3, 0, [], [])
    records = {r["pseudo_label_filename"]: r for r in json.loads(out.read_text())}
    assert sorted(records) == ["masks/chest.nrrd", "masks/ts.nii.gz", "masks/ts_tumour.nii.gz"]
    ts, chest = records["masks/ts.nii.gz"], records["masks/chest.nrrd"]
    volume = read_mask(real_masks / "masks" / "ts.nii.gz")
    ids, counts = np.unique(volume.array, return_counts=True)
    assert ts["label_list"] == [int(i) for i in ids if i]
    assert ts["dim"] == [122, 101, 30] and ts["spacing"] == [3.0, 3.0, 3.0]
    # lung bases (chest) and liver (abdomen)
    assert (ts["top_region_index"], ts["bottom_region_index"]) == ([0, 1, 0, 0], [0, 0, 1, 0])
    assert ts["label_voxels"] == {str(int(i)): int(c) for i, c in zip(ids, counts) if i}
    assert ts["label_volumes_ml"]["1"] == pytest.approx(ts["label_voxels"]["1"] * 27 / 1000, abs=1e-3)
    assert ts["sha256"] == file_sha256(real_masks / "masks" / "ts.nii.gz")
    assert chest["label_list"] == [28, 30, 200] and chest["dim"] == [128, 128, 34]
    assert chest["spacing"] == pytest.approx([3.046876, 3.046876, 10.0], abs=1e-5)
    assert chest["top_region_index"] == chest["bottom_region_index"] == [0, 1, 0, 0]
    assert 23 in records["masks/ts_tumour.nii.gz"]["label_list"]


def test_database_written_by_index_round_trips(real_masks, tmp_path):
    out = tmp_path / "db.json"
    index_masks([real_masks / "masks"], out, mask_root=real_masks)
    db = load_database(out, real_masks)
    assert [e.path for e in db.entries] == ["masks/chest.nrrd", "masks/ts.nii.gz", "masks/ts_tumour.nii.gz"]
    write_database(tmp_path / "again.json", [e.record for e in db.entries])
    assert (tmp_path / "again.json").read_bytes() == out.read_bytes()
    for entry in db.entries:
        volume = read_entry_mask(db, entry)
        assert volume.shape == entry.dim and sorted(set(np.unique(volume.array).tolist()) - {0}) == sorted(
            entry.label_ids
        )
    summary = summarise(db)
    assert summary["entries"] == 3 and summary["regions"] == {"chest-abdomen": 2, "chest": 1}
    liver = next(c for c in summary["classes"] if c["id"] == 1)
    assert liver == {"id": 1, "name": "liver", "entries": 2}


def test_maisi_released_layout_loads_unchanged(real_masks, tmp_path):
    """A hand-made file in the released layout: a top-level list, paths relative to the extracted zip folder
    (a mask root apart from the file), label_filename, float one-hots, a negative spacing, and a v2 entry
    without region indices (derived from label_list)."""
    extracted = tmp_path / "all_masks_flexible_size_and_spacing_4000"
    shutil.copytree(real_masks / "masks", extracted / "TotalSeg" / "cases")
    released = [
        {
            "bottom_region_index": [0.0, 0.0, 1.0, 0.0],
            "dim": [122, 101, 30],
            "label_filename": "TotalSeg/cases/ts.nii.gz",
            "label_list": [0, 1, 3, 4, 5, 28, 29, 31, 32, 62],
            "pseudo_label_filename": "TotalSeg/cases/ts.nii.gz",
            "spacing": [3.0, -3.0, 3.0],
            "top_region_index": [0.0, 1.0, 0.0, 0.0],
        },
        {
            "dim": [128, 128, 34],
            "label_list": [28, 30, 200],
            "pseudo_label_filename": "TotalSeg/cases/chest.nrrd",
            "spacing": [3.046875, 3.046875, 10.0],
        },
    ]
    database = tmp_path / "datasets" / "candidate_masks_flexible_size_and_spacing_4000.json"
    database.parent.mkdir()
    database.write_text(json.dumps(released))
    before = database.read_bytes()
    db = load_database(database, extracted)
    ts, chest = db.entries
    assert ts.spacing == (3.0, 3.0, 3.0) and ts.regions == (1, 2) and 0 not in ts.label_ids
    assert chest.regions == (1, 1)  # no indices: lung lobes in label_list -> chest
    assert read_entry_mask(db, ts).shape == (122, 101, 30)
    picks = select_masks(db, ["liver"], ["chest"], (128, 128, 32), (3.0, 3.0, 3.0), 1, 0).picks
    assert [c.entry.path for c in picks] == ["TotalSeg/cases/ts.nii.gz"]
    assert ts.record == released[0] and database.read_bytes() == before


def test_restart_keeps_unchanged_entries_adds_new_and_drops_gone(masks_copy):
    out = masks_copy / "db.json"
    index_masks([masks_copy / "masks"], out)
    records = json.loads(out.read_text())
    for record in records:  # a field only a kept (not re-described) entry can still carry
        record["note"] = "from the first run"
    out.write_text(json.dumps(records))
    shutil.copy(masks_copy / "masks" / "chest.nrrd", masks_copy / "masks" / "chest_copy.nrrd")
    (masks_copy / "masks" / "ts_tumour.nii.gz").unlink()
    changed = read_mask(masks_copy / "masks" / "ts.nii.gz")
    array = changed.array.copy()
    array[array == 62] = 0  # colon removed
    write_volume(masks_copy / "masks" / "ts.nii.gz", changed.with_array(array))

    report = index_masks([masks_copy / "masks"], out)
    assert (report.indexed, report.kept, report.dropped) == (2, 1, ["masks/ts_tumour.nii.gz"])
    after = {r["pseudo_label_filename"]: r for r in json.loads(out.read_text())}
    assert sorted(after) == ["masks/chest.nrrd", "masks/chest_copy.nrrd", "masks/ts.nii.gz"]
    assert after["masks/chest.nrrd"]["note"] == "from the first run"
    assert "note" not in after["masks/ts.nii.gz"] and 62 not in after["masks/ts.nii.gz"]["label_list"]


def test_a_touched_file_is_described_again_the_others_kept(masks_copy):
    out = masks_copy / "db.json"
    index_masks([masks_copy / "masks"], out)
    mask = masks_copy / "masks" / "chest.nrrd"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))  # mtime only
    report = index_masks([masks_copy / "masks"], out)
    assert (report.indexed, report.kept) == (1, 2)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """nibabel keeps a sheared affine as given (SimpleITK would make it orthogonal)."""
    nib.Nifti1Image(array, affine).to_filename(path)
    return path


def _bad_masks(folder: Path) -> dict[str, Path]:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    sheared = affine.copy()
    sheared[0, 1] = 1.0
    good = np.zeros((8, 8, 8), np.uint8)
    good[2:6, 2:6, 2:6] = 1
    fractional = good.astype(np.float32) * 1.5
    unknown = good.copy()
    unknown[0, 0, 0] = 250
    (folder / "broken.nii.gz").parent.mkdir(parents=True, exist_ok=True)
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
    return {
        "fractional": write_volume(folder / "fractional.nii.gz", Volume(fractional, affine)),
        "unknown": write_volume(folder / "unknown.nii.gz", Volume(unknown, affine)),
        "sheared": _write_nifti(folder / "sheared.nii.gz", good, sheared),
        "broken": folder / "broken.nii.gz",
    }


def test_bad_masks_are_all_named_and_nothing_is_written(masks_copy):
    bad = _bad_masks(masks_copy / "masks" / "bad")
    out = masks_copy / "db.json"
    with pytest.raises(InputError) as err:
        index_masks([masks_copy / "masks"], out)
    message = str(err.value)
    assert "4 of 7 mask(s) cannot be indexed" in message and "--skip-bad" in message
    assert "fractional.nii.gz: a mask must hold integer labels, found 1.5" in message
    assert "unknown.nii.gz: labels not in the label dictionary: [250]" in message
    assert "sheared.nii.gz: its voxel axes are not orthogonal" in message
    assert "broken.nii.gz: cannot read as a medical image" in message
    assert not out.exists()

    report = index_masks([masks_copy / "masks"], out, skip_bad=True)
    assert sorted(Path(p).name for p, _ in report.bad) == sorted(p.name for p in bad.values())
    assert len(json.loads(out.read_text())) == 3


def test_local_workers_give_the_same_database(real_masks, tmp_path):
    one = build_database([real_masks / "masks"], tmp_path / "a.json", mask_root=real_masks, workers=1)
    two = build_database([real_masks / "masks"], tmp_path / "b.json", mask_root=real_masks, workers=2)
    assert one.records == two.records and len(one.records) == 3


def test_sources_globs_and_outputs_are_checked_before_any_work(real_masks, tmp_path):
    pattern = str(real_masks / "masks" / "ts*.nii.gz")
    report = build_database([pattern], tmp_path / "db.json", mask_root=real_masks)
    paths = [r["pseudo_label_filename"] for r in report.records]
    assert paths == ["masks/ts.nii.gz", "masks/ts_tumour.nii.gz"]
    with pytest.raises(InputError, match=r"no mask file .* matches '.*nothing\*\.nii\.gz'"):
        build_database([str(tmp_path / "nothing*.nii.gz")], tmp_path / "db.json")
    with pytest.raises(InputError, match="is a folder; give the database file name"):
        build_database([real_masks / "masks"], tmp_path)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("[{")
    with pytest.raises(DatabaseError, match="not valid JSON"):
        build_database([real_masks / "masks"], corrupt)
    assert corrupt.read_text() == "[{"


def _record(path: str, **fields) -> dict:
    return {
        "pseudo_label_filename": path,
        "label_list": [1],
        "dim": [4, 4, 4],
        "spacing": [1, 1, 1],
        **fields,
    }


def test_invalid_database_lists_every_problem_with_its_json_path(tmp_path):
    path = tmp_path / "db.json"
    nameless = _record("b.nii.gz")
    del nameless["pseudo_label_filename"]
    broken = [
        _record("a.nii.gz", dim=[1, 2], spacing=[1, 1, 0]),
        nameless,
        _record("c.nii.gz", label_list=["liver"]),
    ]
    path.write_text(json.dumps(broken))
    with pytest.raises(DatabaseError) as err:
        load_database(path, check_files=False)
    message = str(err.value)
    assert f"invalid mask database {path}" in message
    for fragment in ("$[0].dim", "$[0].spacing[2]", "$[1]: 'pseudo_label_filename' is a required"):
        assert fragment in message
    assert "$[2].label_list[0]" in message

    chest, abdomen = [0, 1, 0, 0], [0, 0, 1, 0]
    wrong = [
        _record("a.nii.gz", top_region_index=[0, 1, 1, 0], bottom_region_index=chest),
        _record("b.nii.gz", top_region_index=abdomen, bottom_region_index=chest),
        _record("b.nii.gz"),
    ]
    path.write_text(json.dumps(wrong))
    with pytest.raises(DatabaseError) as err:
        load_database(path, check_files=False)
    message = str(err.value)
    assert "$[0].top_region_index: got [0, 1, 1, 0], expected a one-hot list" in message
    assert "$[1]: top region 'abdomen' lies below bottom region 'chest'" in message
    assert "$[2].pseudo_label_filename: 'b.nii.gz' is also in $[1]" in message
    path.write_text(json.dumps({"masks": []}))
    with pytest.raises(DatabaseError, match=r"\$: got .*expected type array"):
        load_database(path, check_files=False)


def test_missing_mask_files_are_all_listed(real_masks, tmp_path):
    out = tmp_path / "db.json"
    index_masks([real_masks / "masks"], out, mask_root=real_masks)
    with pytest.raises(DatabaseError) as err:
        load_database(out, tmp_path)  # the wrong mask root: none of the three is there
    message = str(err.value)
    assert "3 problem(s)" in message
    for i, name in enumerate(["chest.nrrd", "ts.nii.gz", "ts_tumour.nii.gz"]):
        assert f"$[{i}].pseudo_label_filename: mask file not found: {tmp_path / 'masks' / name}" in message


def test_a_mask_unlike_its_entry_is_refused_when_loaded(masks_copy):
    out = masks_copy / "db.json"
    index_masks([masks_copy / "masks"], out)
    records = json.loads(out.read_text())
    records[0]["dim"] = [128, 128, 33]
    out.write_text(json.dumps(records))
    db = load_database(out)
    expected = r"chest.nrrd: grid \[128, 128, 34\] .* differs from its database entry .*db.json \$\[0\] \(dim"
    with pytest.raises(VolumeError, match=expected):
        read_entry_mask(db, db.entries[0])
    ts = masks_copy / "masks" / "ts.nii.gz"
    volume = read_mask(ts)
    write_volume(ts, volume.with_array(np.where(volume.array == 62, 0, volume.array).astype(np.uint8)))
    with pytest.raises(VolumeError, match=r"ts.nii.gz: file changed since it was indexed .*\$\[1\].sha256"):
        read_entry_mask(db, db.entries[1])


@pytest.mark.slow
def test_torchrun_shards_the_work_and_rank0_writes(real_masks, tmp_path):
    out = tmp_path / "db.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    args = ["--masks", str(real_masks / "masks"), "--output", str(out), "--mask-root", str(real_masks)]
    command = [*torchrun, "-m", "maisi.masks", "index", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    single = build_database([real_masks / "masks"], tmp_path / "single.json", mask_root=real_masks)
    assert json.loads(out.read_text()) == single.records


@pytest.mark.parametrize(
    "dtype, low, high", [(np.uint8, 0, 256), (np.int16, -5, 300), (np.int32, 0, 70000), (np.uint16, 0, 1)]
)
def test_label_counts_equal_numpys_unique(dtype, low, high):
    array = np.random.default_rng(0).integers(low, high, size=(9, 7, 5)).astype(dtype)
    ids, counts = label_counts(np.asfortranarray(array), chunk=16)  # NIfTI order, many chunks
    expected_ids, expected_counts = np.unique(array, return_counts=True)
    assert ids.tolist() == expected_ids.tolist() and counts.tolist() == expected_counts.tolist()
