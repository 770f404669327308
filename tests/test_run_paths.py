"""Issue 26: no output may land on an input, in any command. The guard itself, then each case found."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from maisi.atomic import folder_lock
from maisi.data.io import Volume, write_volume
from maisi.errors import InputError
from tests.conftest import phantom_mask, write_config

REPO = Path(__file__).resolve().parents[1]
DATABASE = REPO / "maisi" / "resources" / "anatomy"


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (links followed), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------- the guard


@pytest.fixture
def data(tmp_path) -> Path:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.json").write_text("{}")
    return tmp_path / "in" / "a.json"


def RunPaths():  # noqa: N802 - imported here so that each regression below runs (and fails) on old code
    from maisi.run_paths import RunPaths

    return RunPaths()


def refusal(paths) -> str:
    with pytest.raises(InputError) as info:
        paths.check("test")
    return str(info.value)


def test_an_output_on_an_input_is_refused_however_it_is_spelled(tmp_path, data):
    (tmp_path / "link.json").symlink_to(data)
    os.link(data, tmp_path / "hard.json")
    for spelling in (
        data,
        tmp_path / "in" / ".." / "in" / "a.json",
        tmp_path / "link.json",
        tmp_path / "hard.json",
    ):
        message = refusal(RunPaths().read("--input", data).write("--output", spelling))
        assert f"--output {spelling}" in message and f"would overwrite --input {data}" in message


def test_outputs_inside_input_folders_and_inputs_inside_owned_folders_are_refused(tmp_path, data):
    message = refusal(RunPaths().read("--series", data.parent).write("--output", data.parent / "new.json"))
    assert "would be written inside the folder --series" in message
    message = refusal(RunPaths().read("--init", data).write_into("--run", tmp_path, owned=True))
    assert f"--init {data} lies inside --run {tmp_path}" in message
    RunPaths().read("--mask", data).write_into("--out", data.parent).write("--o", data.parent / "b").check()


def test_two_outputs_on_one_file_and_a_lock_that_is_a_folder_are_refused(tmp_path):
    message = refusal(RunPaths().write("--output", tmp_path / "x.json").write("--other", tmp_path / "x.json"))
    assert "are one file: both would write it" in message and "--output" in message and "--other" in message
    (tmp_path / ".maisi.lock").mkdir()
    message = refusal(RunPaths().write_into("$.output.dir", tmp_path, lock=True))
    assert f"its lock {tmp_path / '.maisi.lock'} is a folder" in message


def test_a_symlink_loop_is_named_not_a_traceback(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    message = refusal(RunPaths().read("--input", tmp_path / "loop").write("--output", tmp_path / "loop"))
    assert "would overwrite --input" in message


# ------------------------------------------------------------------------------- maisi.masks sizes


@pytest.fixture
def sized(tmp_path) -> Path:
    """A datalist of two cases with labels under ``cases/a`` and ``cases/b``, and a size reference."""
    from maisi.masks.__main__ import main

    for case in ("a", "b"):
        write_volume(tmp_path / "cases" / case / "label.nii.gz", Volume(phantom_mask(), np.eye(4)))
    entries = [{"image": f"cases/{c}/ct.nii.gz", "label": f"cases/{c}/label.nii.gz"} for c in "ab"]
    (tmp_path / "dl.json").write_text(json.dumps({"training": entries}))
    args = ["sizes", "--datalist", str(tmp_path / "dl.json"), "--output", str(tmp_path / "tmp.json")]
    assert main([*args, "--build-reference", str(tmp_path / "ref.json")]) == 0
    (tmp_path / "tmp.json").unlink()
    return tmp_path


SIZES = {
    "--output is the datalist": (["--output", "dl.json", "--reference", "ref.json"], "dl.json"),
    "--build-reference is the datalist": (["--output", "o.json", "--build-reference", "dl.json"], "dl.json"),
    "--output is a label": (["--output", "cases/a/label.nii.gz", "--reference", "ref.json"], "label.nii.gz"),
    "--build-reference is a label": (
        ["--output", "o.json", "--build-reference", "cases/b/label.nii.gz"],
        "label.nii.gz",
    ),
    "--output is the reference": (["--output", "ref.json", "--reference", "ref.json"], "ref.json"),
}


@pytest.mark.parametrize("args, named", SIZES.values(), ids=SIZES.keys())
def test_masks_sizes_never_writes_on_its_inputs(sized, capsys, args, named):
    from maisi.masks.__main__ import main

    before = digests(sized)
    argv = ["sizes", "--datalist", str(sized / "dl.json")]
    argv += [str(sized / a) if not a.startswith("--") else a for a in args]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "would overwrite" in err and named in err and "Traceback" not in err, err
    assert digests(sized) == before


def test_datalist_build_never_writes_on_a_ct(sized, capsys):
    from maisi.datalist import main

    write_volume(sized / "cases" / "a" / "ct.nii.gz", Volume(np.zeros((32, 32, 16), np.float32), np.eye(4)))
    before = digests(sized)
    target = sized / "cases" / "a" / "ct.nii.gz"
    argv = ["build", "--root", str(sized / "cases"), "--images", "*/ct.nii.gz", "--output", str(target)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--output {target} would overwrite --images match {target}" in err, err
    assert digests(sized) == before


# ------------------------------------------------------------------------------------------ maisi.infer


@pytest.mark.parametrize("name", ["sample_seed0_label.nii.gz", "sample_seed0_image.nii.gz"])
def test_infer_never_writes_on_its_mask(infer_config, mask_file, tmp_path, capsys, name):
    from maisi.infer import main

    mask = mask_file.rename(mask_file.with_name(name))
    before = digests(mask.parent)
    assert main(["--config", str(infer_config(mask=str(mask), output={"dir": str(mask.parent)}))]) == 2
    err = capsys.readouterr().err
    assert f"would overwrite $.mask {mask}" in err and "Traceback" not in err, err
    assert digests(mask.parent) == before


def test_infer_never_writes_on_a_checkpoint(infer_config, tiny_checkpoints, tmp_path, capsys):
    from maisi.infer import main

    folder = tmp_path / "weights"
    folder.mkdir()
    ckpt = {
        p: str(shutil.copy(path, folder / f"{p}.pt")) for p, path in tiny_checkpoints["tiny-rflow"].items()
    }
    ckpt["controlnet"] = str(Path(ckpt["controlnet"]).rename(folder / "sample_seed0_preview.png"))
    before = digests(folder)
    config = infer_config(checkpoints=ckpt, output={"dir": str(folder), "preview": True})
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"would overwrite $.checkpoints.controlnet {ckpt['controlnet']}" in err, err
    assert digests(folder) == before


def _database_copy(tmp_path) -> tuple[Path, Path]:
    """The shipped anatomy database copied, its first mask renamed like an output: (database, mask)."""
    db = tmp_path / "db"
    shutil.copytree(DATABASE, db)
    entries = json.loads((db / "database.json").read_text())
    first = db / entries[0]["pseudo_label_filename"]
    renamed = first.rename(first.with_name("sample_seed0_label.nii.gz"))
    entries[0]["pseudo_label_filename"] = str(renamed.relative_to(db))
    (db / "database.json").write_text(json.dumps(entries))
    return db / "database.json", renamed


def test_anatomy_mode_never_writes_on_a_database_mask(tmp_path, tiny_checkpoints, capsys):
    from maisi.infer import main

    database, mask = _database_copy(tmp_path)
    before = digests(database.parent)
    config = write_config(
        tmp_path / "anatomy.json",
        {
            "preset": "tiny-rflow",
            "checkpoints": {part: str(p) for part, p in tiny_checkpoints["tiny-rflow"].items()},
            "anatomy": {"anatomy_list": ["liver"], "mask_database": str(database), "augment": False},
            "output_size": [48, 48, 32],
            "spacing": [7.0, 7.0, 10.0],
            "sampling": {"num_inference_steps": 2},
            "output": {"dir": str(mask.parent)},
            "device": "cpu",
        },
    )
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"would overwrite a mask of $.anatomy.mask_database {mask}" in err, err
    assert digests(database.parent) == before


def test_a_lock_that_is_a_folder_exits_2(infer_config, tmp_path, capsys):
    from maisi.infer import main

    (tmp_path / "out" / ".maisi.lock").mkdir(parents=True)
    assert main(["--config", str(infer_config())]) == 2
    err = capsys.readouterr().err
    assert ".maisi.lock is a folder" in err and "Traceback" not in err, err


@pytest.mark.parametrize("mode", ["anatomy", "mask"])
def test_a_folder_in_use_is_refused_before_masks_or_networks(
    infer_config, tiny_checkpoints, tmp_path, capsys, monkeypatch, mode
):
    """The lock is taken right after the config checks, not after the (slow) masks and networks."""
    from maisi.generation import pipeline, plan
    from maisi.generation import run as run
    from maisi.infer import main

    config = infer_config()
    if mode == "anatomy":
        anatomy = {
            "anatomy_list": ["liver"],
            "mask_database": str(DATABASE / "database.json"),
            "augment": True,
        }
        config = infer_config(
            mask="<drop>", anatomy=anatomy, output_size=[48, 48, 32], spacing=[7.0, 7.0, 10.0]
        )

    def too_late(*args, **kwargs):
        raise AssertionError("masks or networks prepared before the lock was taken")

    for module in (run, pipeline, plan):
        for name in ("prepare_all", "load_models", "plan_generation"):
            monkeypatch.setattr(module, name, too_late, raising=False)
    (tmp_path / "out").mkdir()
    with folder_lock(tmp_path / "out"):
        assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "is in use by another run" in err and "Traceback" not in err, err


def test_two_hard_links_to_one_mask_are_one_input(infer_config, mask_file, tmp_path):
    from maisi.config import load_config
    from maisi.generation.inputs import expand_inputs

    os.link(mask_file, mask_file.with_name("same.nii.gz"))
    (mask_file.parent / "link.nii.gz").symlink_to(mask_file)
    config = load_config(infer_config(mask="<drop>", masks=[str(mask_file.parent / "*.nii.gz")]), "infer")
    inputs, problems = expand_inputs(config)
    assert problems == [] and len(inputs) == 1


# ------------------------------------------------------------------------------------------ maisi.train


def test_train_never_replaces_its_init_checkpoint(tmp_path, tiny_checkpoints, encoded_cases, capsys):
    from maisi.train import main

    run = tmp_path / "run"
    run.mkdir()
    init = Path(shutil.copy(tiny_checkpoints["tiny-rflow"]["autoencoder"], run / "autoencoder.pt"))
    before = digests(run)
    config = write_config(
        tmp_path / "train.json",
        {
            "preset": "tiny-rflow",
            "datalist": str(encoded_cases),
            "output_dir": str(run),
            "init": {"autoencoder": str(init)},
            "steps": 1,
            "device": "cpu",
        },
    )
    for extra in ([], ["--dry-run"]):
        assert main(["autoencoder", "--config", str(config), *extra]) == 2
        err = capsys.readouterr().err
        assert f"$.init.autoencoder {init} lies inside $.output_dir {run}" in err, err
    assert digests(run) == before
