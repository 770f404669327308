"""``maisi.infer`` with many masks ($.masks, $.datalist): naming, checks before work, failures, torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maisi import infer
from maisi.data.io import Volume, read_volume, write_volume
from maisi.generation import plan as generation_plan
from maisi.generation.inputs import base_stem, unique_stems
from tests.conftest import phantom_mask
from tests.test_infer import fake_generate

REPO = Path(__file__).resolve().parents[1]
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def write_mask(path: Path, shift: int = 0, array: np.ndarray | None = None) -> Path:
    """A phantom mask whose organs are moved by ``shift`` voxels along x (so every mask differs)."""
    mask = np.roll(phantom_mask(), shift, axis=0) if array is None else array
    return write_volume(path, Volume(mask, AFFINE))


def run_cli(config: Path, *flags: str) -> int:
    return infer.main(["--config", str(config), *flags])


def image_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*_image.nii.gz"))


def last_line(caplog) -> str:
    return caplog.records[-1].getMessage()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=N -m maisi.infer`` on CPU (gloo, env:// on a free port)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        "-m",
        "maisi.infer",
        "--config",
        str(config),
        "--no-progress",
    ]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_two_processes_generate_each_sample_once_with_one_summary_and_a_rerun_skips_all(
    infer_config, tmp_path, caplog
):
    masks = tmp_path / "masks"
    for i, name in enumerate(["liver", "lung", "kidney"]):
        write_mask(masks / f"{name}.nii.gz", shift=i)
    blank = write_mask(masks / "kidney_blank.nii.gz", array=np.zeros((32, 32, 16), np.uint8))
    config = infer_config(mask="<drop>", masks=["masks/*.nii.gz"], num_samples=2)
    out = tmp_path / "out"

    # Bad input: the blank mask is checked by rank 1 (sorted: kidney, kidney_blank, liver, lung); every
    # rank stops with the same message before any work.
    bad = torchrun(config)
    assert bad.returncode != 0
    assert bad.stderr.count("maisi.infer: error: 1 problem(s) with the masks") == 2, bad.stderr[-3000:]
    assert f"mask {blank}:\n      has no labelled voxel" in bad.stderr
    # torchrun's report: the ranks exit 2; once one has, torchrun may stop the other (SIGTERM) first
    codes = re.findall(r"exitcode\s*: (-?\d+) ", bad.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert f'File "{REPO / "maisi"}' not in bad.stderr  # no traceback of ours (torchrun prints its own)
    assert not out.exists()

    blank.unlink()
    done = torchrun(config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("finished:") == 1, done.stderr[-3000:]
    assert "finished: 6 generated, 0 skipped; HU check:" in done.stderr
    expected = [f"sample_{m}_seed{s}_image.nii.gz" for m in ("kidney", "liver", "lung") for s in (0, 1)]
    assert image_files(out) == expected
    for name in expected:
        assert done.stderr.count(f"wrote {name}") == 1, name  # generated exactly once, by one rank
    ranks = set()
    for name in expected:
        meta = json.loads((out / name.replace("_image.nii.gz", ".json")).read_text())
        assert meta["process"]["world_size"] == 2 and meta["mask"]["path"].endswith(
            name.split("_")[1] + ".nii.gz"
        )
        ranks.add(meta["process"]["rank"])
    assert ranks == {0, 1}
    liver = read_volume(out / "sample_liver_seed0_label.nii.gz").array
    assert np.array_equal(liver, read_volume(masks / "liver.nii.gz").array)
    assert not (out / ".maisi.lock").exists() and not list(out.glob(".tmp-*"))

    # A rerun with another number of processes (one, in this process) skips every sample.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.clear()
    assert run_cli(config) == 0
    assert last_line(caplog).startswith("finished: 0 generated, 6 skipped; HU check:")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_masks_with_the_same_file_name_in_different_folders_get_distinct_outputs(
    infer_config, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(generation_plan, "generate", fake_generate(set()))
    a = write_mask(tmp_path / "a" / "mask.nii.gz", shift=0)
    b = write_mask(tmp_path / "b" / "mask.nii.gz", shift=3)
    config = infer_config(mask="<drop>", masks=["a/mask.nii.gz", str(b)])
    assert run_cli(config) == 0
    out = tmp_path / "out"
    assert image_files(out) == ["sample_a_mask_seed0_image.nii.gz", "sample_b_mask_seed0_image.nii.gz"]
    for stem, source in (("a_mask", a), ("b_mask", b)):
        label = read_volume(out / f"sample_{stem}_seed0_label.nii.gz").array
        assert np.array_equal(label, read_volume(source).array)
        meta = json.loads((out / f"sample_{stem}_seed0.json").read_text())
        assert meta["mask"]["path"] == str(source) and meta["input"]["stem"] == stem
    keys = {json.loads((out / f"sample_{s}_seed0.json").read_text())["job_key"] for s in ("a_mask", "b_mask")}
    assert len(keys) == 2  # each input's key holds its mask's checksum
    assert last_line(caplog).startswith("finished: 2 generated, 0 skipped; HU check: 2 passed")
    assert len(list(out.glob("sample_job-*_config.json"))) == 1  # one resolved config for the job


def test_every_bad_input_is_listed_at_once_and_nothing_is_written(infer_config, tmp_path, capsys):
    good = write_mask(tmp_path / "masks" / "good.nii.gz")
    blank = write_mask(tmp_path / "masks" / "blank.nii.gz", array=np.zeros((32, 32, 16), np.uint8))
    text = tmp_path / "masks" / "text.nii.gz"
    text.write_text("not an image")
    masks = ["masks/*.nii.gz", "none/*.nrrd", "missing.nii.gz", str(good)]
    for flags in ((), ("--dry-run",)):
        assert run_cli(infer_config(mask="<drop>", masks=masks), *flags) == 2
        captured = capsys.readouterr()
        err = captured.err
        assert err.startswith("maisi.infer: error: 4 problem(s) with the masks:"), err
        assert f"$.masks[1]: the pattern '{tmp_path}/none/*.nrrd' matches no file" in err
        assert f"$.masks[2]: {tmp_path}/missing.nii.gz: file not found" in err
        assert f"mask {blank}:\n      has no labelled voxel" in err
        assert f"{text}: " in err and "cannot read as a medical image" in err
        assert str(good) not in err and "Traceback" not in err and captured.out == ""
    assert not (tmp_path / "out").exists()


def write_datalist(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"training": entries}))
    return path


def test_datalist_generates_from_the_labels_of_one_fold(infer_config, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(generation_plan, "generate", fake_generate(set()))
    entries = []
    for i, fold in enumerate([0, 1, 0]):
        write_mask(tmp_path / "data" / f"case_{i:05d}" / "segmentation.nii.gz", shift=i)
        entries.append(
            {"image": f"case_{i:05d}/imaging.nii.gz", "label": f"case_{i:05d}/segmentation.nii.gz"}
        )
        entries[-1]["fold"] = fold
    datalist = write_datalist(tmp_path / "data" / "datalist.json", entries)
    config = infer_config(mask="<drop>", datalist={"path": "data/datalist.json", "fold": 0}, seed=4)
    assert run_cli(config) == 0
    out = tmp_path / "out"
    assert image_files(out) == [
        "sample_case_00000_segmentation_seed4_image.nii.gz",
        "sample_case_00002_segmentation_seed4_image.nii.gz",
    ]
    meta = json.loads((out / "sample_case_00002_segmentation_seed4.json").read_text())
    assert meta["mask"]["path"] == str(datalist.parent / "case_00002" / "segmentation.nii.gz")
    assert meta["input"]["source"] == f"{datalist} $.training[2] (image case_00002/imaging.nii.gz)"
    every = infer_config(mask="<drop>", datalist={"path": "data/datalist.json"}, seed=4)
    caplog.clear()
    assert run_cli(every) == 0  # all folds: the two of fold 0 are finished, the third is generated
    assert last_line(caplog).startswith("finished: 1 generated, 2 skipped")


def test_datalist_cases_without_a_label_exit_2_naming_them(infer_config, tmp_path, capsys):
    write_mask(tmp_path / "data" / "a" / "seg.nii.gz")
    entries = [
        {"image": "a/ct.nii.gz", "label": "a/seg.nii.gz"},
        {"image": "b/ct.nii.gz"},
        {"image": "c/ct.nii.gz", "label": "c/seg.nii.gz"},
    ]
    datalist = write_datalist(tmp_path / "data" / "list.json", entries)
    assert run_cli(infer_config(mask="<drop>", datalist={"path": str(datalist)})) == 2
    err = capsys.readouterr().err
    assert f"{datalist} $.training[1] (image b/ct.nii.gz): has no label to generate from" in err, err
    assert f"$.training[2] (image c/ct.nii.gz): label {tmp_path}/data/c/seg.nii.gz: file not found" in err
    assert "a/seg.nii.gz" not in err and not (tmp_path / "out").exists()
    assert run_cli(infer_config(mask="<drop>", datalist={"path": str(datalist), "fold": 3})) == 2
    assert f"$.datalist.fold: no case of {datalist} is in fold 3" in capsys.readouterr().err


def test_a_failing_sample_is_counted_and_the_others_are_written(infer_config, tmp_path, monkeypatch, caplog):
    write_mask(tmp_path / "masks" / "a.nii.gz", shift=0)
    write_mask(tmp_path / "masks" / "b.nii.gz", shift=2)
    working = fake_generate(set())

    def generate(plan, models, seed, progress=True):
        if plan.config.mask.endswith("a.nii.gz") and seed == 1:
            raise RuntimeError("simulated out of memory")
        return working(plan, models, seed, progress)

    monkeypatch.setattr(generation_plan, "generate", generate)
    config = infer_config(mask="<drop>", masks=["masks/*.nii.gz"], num_samples=2)
    assert run_cli(config) == 1
    out = tmp_path / "out"
    assert image_files(out) == [
        "sample_a_seed0_image.nii.gz",
        "sample_b_seed0_image.nii.gz",
        "sample_b_seed1_image.nii.gz",
    ]
    assert "a seed 1: runtime failure, not generated: RuntimeError: simulated out of memory" in caplog.text
    assert last_line(caplog).startswith("finished: 3 generated, 0 skipped, 1 failed (samples a_seed1); ")
    assert last_line(caplog).endswith("; exit code 1: 1 sample(s) could not be generated (errors above)")
    monkeypatch.setattr(generation_plan, "generate", working)
    caplog.clear()
    assert run_cli(config) == 0  # the rerun does only what is missing
    assert last_line(caplog).startswith("finished: 1 generated, 3 skipped; HU check: 4 passed")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (
            {"masks": ["m.nii.gz"]},
            "$.mask, $.masks: set at most one of $.mask, $.masks, $.datalist, $.anatomy",
        ),
        ({"mask": "<drop>", "masks": []}, "$.masks: got []"),
        (
            {"mask": "<drop>", "masks": ["a"], "datalist": {"path": "d.json"}},
            "$.masks, $.datalist: set at most",
        ),
        (
            {"mask": "<drop>", "masks": ["a"], "checkpoints": "no-controlnet"},
            "required when generating from masks",
        ),
        ({"mask": "<drop>", "datalist": {"path": "d.json", "key": "x"}}, "$.datalist.key: unknown key 'key'"),
    ],
)
def test_batch_keys_are_checked_with_the_config(changes, fragment, infer_config, tiny_checkpoints, capsys):
    if changes.get("checkpoints") == "no-controlnet":
        ckpt = tiny_checkpoints["tiny-rflow"]
        changes["checkpoints"] = {
            "autoencoder": str(ckpt["autoencoder"]),
            "diffusion_unet": str(ckpt["diffusion_unet"]),
        }
    assert run_cli(infer_config(**changes)) == 2
    err = capsys.readouterr().err
    assert fragment in err, err


def test_masks_named_like_the_outputs_in_the_output_folder_are_refused(infer_config, tmp_path, capsys):
    out = tmp_path / "out"
    write_mask(out / "mask.nii.gz")
    earlier = write_mask(out / "sample_mask_seed0_label.nii.gz")  # a generated mask of an earlier job
    assert run_cli(infer_config(mask="<drop>", masks=["out/*.nii.gz"])) == 2
    err = capsys.readouterr().err
    assert f"{earlier} is named like this job's outputs in its output folder (prefix 'sample_')" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["mask.nii.gz", "sample_mask_seed0_label.nii.gz"]


def test_the_shipped_batch_config_passes_every_check(capsys):
    assert run_cli(REPO / "configs" / "inference_batch.json", "--dry-run", "--device", "cpu") == 0
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["masks"][1].endswith("maisi/resources/anatomy/masks/*.nii.gz") and printed["num_samples"] == 2
    )


@pytest.mark.parametrize(
    "paths, stems",
    [
        (
            ["/d/liver.nii.gz", "/d/lung.nrrd", "/d/ct.seg.nrrd", "/d/dicom_series"],
            ["liver", "lung", "ct.seg", "dicom_series"],
        ),
        (["/d/a/mask.nii.gz", "/d/b/mask.nii.gz", "/e/mask.mha"], ["a_mask", "b_mask", "e_mask"]),
        (
            ["/k/case_00000/segmentation.nii.gz", "/k/case_00001/segmentation.nii.gz"],
            ["case_00000_segmentation", "case_00001_segmentation"],
        ),
        (
            ["/x/z.nii", "/x/z.nii.gz", "/x/z.nrrd"],
            ["x_z", "x_z-2", "x_z-3"],
        ),  # nothing tells them apart: numbered
        (["/d/my mask (1).nii.gz", "/d/my_mask_1.nii.gz"], ["d_my_mask_1", "d_my_mask_1-2"]),
    ],
)
def test_stems_are_the_file_names_made_unique(paths, stems):
    assert unique_stems([Path(p) for p in paths]) == stems
    assert base_stem(Path("/d/CT 1.NII.GZ")) == "CT_1"  # extensions in any case; spaces made safe


def test_round_robin_shares_cover_every_sample_once_for_any_number_of_processes():
    from maisi.distributed import Ranks

    samples = list(range(7))
    for world in (1, 2, 3, 8):
        shares = [Ranks(r, world).shard(samples) for r in range(world)]
        assert sorted(s for share in shares for s in share) == samples
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_relative_patterns_are_relative_to_the_config_file(infer_config, tmp_path, monkeypatch):
    monkeypatch.setattr(generation_plan, "generate", fake_generate(set()))
    write_mask(tmp_path / "masks" / "deep" / "one.nii.gz")
    monkeypatch.chdir(os.path.dirname(tmp_path))  # another working directory
    assert run_cli(infer_config(mask="<drop>", masks=["masks/**/*.nii.gz"])) == 0
    assert image_files(tmp_path / "out") == ["sample_one_seed0_image.nii.gz"]


def test_a_mask_changed_during_the_job_is_not_used_under_the_old_checksum(
    infer_config, tmp_path, monkeypatch, caplog
):
    write_mask(tmp_path / "masks" / "a.nii.gz")
    b = write_mask(tmp_path / "masks" / "b.nii.gz", shift=1)
    working = fake_generate(set())

    def generate(plan, models, seed, progress=True):
        write_mask(b, shift=4)  # edited while the job runs: after its checks, before its samples
        return working(plan, models, seed, progress)

    monkeypatch.setattr(generation_plan, "generate", generate)
    assert run_cli(infer_config(mask="<drop>", masks=["masks/*.nii.gz"])) == 1
    assert f"b seed 0: not generated: mask {b} changed since the job was checked" in caplog.text
    assert image_files(tmp_path / "out") == ["sample_a_seed0_image.nii.gz"]


def test_outputs_that_collide_or_overwrite_an_input_are_refused(infer_config, tmp_path):
    from maisi.config import load_config
    from maisi.errors import InputError
    from maisi.generation.files import run_paths, sample_files

    config = load_config(infer_config(mask="<drop>", masks=[str(tmp_path / "m*.nii.gz")]), "infer")
    files = sample_files(config, 0, "m")
    config = dataclasses.replace(  # a checkpoint where a preview would go
        config, checkpoints=dataclasses.replace(config.checkpoints, controlnet=str(files["preview"]))
    )
    with pytest.raises(InputError) as info:
        run_paths(config, [(None, "m", "$.masks[0]"), (None, "m", "$.masks[1]")]).check("generate")
    message = str(info.value)
    assert (
        f"the preview of sample m_seed0 {files['preview']} would overwrite $.checkpoints.controlnet"
        in message
    )
    assert f"the image of sample m_seed0 {files['image']} and the image of sample m_seed0" in message
