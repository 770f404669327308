"""``maisi.encode``: latents with sidecars, restartable, sharded with torchrun, bad input refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maisi.data.datalist import build_datalist, read_datalist, write_datalist
from maisi.data.io import read_mask
from maisi.data.latents import read_latent, read_sidecar
from maisi.encode import main
from maisi.labels import load_label_dict
from tests.conftest import write_config


@pytest.fixture
def encode_setup(real_cases, tiny_checkpoints, tmp_path):
    """Factory: an encode config over the 3 real cases, with top-level keys replaced by ``changes``."""
    datalist = real_cases / "datalist.json"
    if not datalist.exists():
        write_datalist(
            datalist,
            build_datalist(
                real_cases,
                "*/imaging.nii.gz",
                "*/segmentation.nii.gz",
                datalist,
                load_label_dict(),
                num_folds=3,
            ),
        )

    def make(**changes) -> Path:
        data = {
            "preset": "tiny-rflow",
            "autoencoder": str(tiny_checkpoints["tiny-rflow"]["autoencoder"]),
            "datalist": str(datalist),
            "output_dir": str(tmp_path / "emb"),
            "tiling": {"method": "sliding_window", "roi_size": [64, 64, 32]},
            "device": "cpu",
        }
        data.update(changes)
        return write_config(tmp_path / "encode.json", data)

    return make


def test_latents_sidecars_labels_and_datalist(encode_setup, real_cases, tmp_path):
    assert main(["--config", str(encode_setup())]) == 0
    out = tmp_path / "emb"
    latent, affine = read_latent(out / "case0" / "imaging_emb.nii.gz")
    assert latent.shape == (4, 32, 28, 8) and latent.dtype == np.float32  # (122, 101, 30) padded to x16, / 4
    assert nib.load(out / "case0" / "imaging_emb.nii.gz").shape == (32, 28, 8, 4)  # stored channel-last
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [12.0, 12.0, 12.0])
    side = read_sidecar(out / "case0" / "imaging_emb.nii.gz")
    assert side["dim"] == [128, 112, 32] and side["spacing"] == [3.0, 3.0, 3.0] and side["modality"] == "ct"
    assert side["top_region_index"] == [0, 1, 0, 0] and side["latent_shape"] == [4, 32, 28, 8]
    assert side["fingerprint"]["vae_sha256"] and side["intensity"]["hu_window"] == [-1000.0, 1000.0]
    label = read_mask(out / "case0" / "imaging_label.nii.gz")
    assert label.shape == (128, 112, 32) and list(label.shape) == [4 * s for s in latent.shape[1:]]
    original = read_mask(real_cases / "case0" / "segmentation.nii.gz")
    assert np.array_equal(np.unique(label.array), np.unique(original.array))  # padding adds only background
    assert (label.array > 0).sum() == (original.array > 0).sum()
    data = read_datalist(out / "datalist.json")
    assert [e["image"] for e in data["training"]] == [f"case{i}/imaging_emb.nii.gz" for i in range(3)]
    assert all((out / e["label"]).is_file() for e in data["training"])
    assert sorted(e["fold"] for e in data["training"]) == [0, 1, 2]


def test_interrupted_run_resumes_and_skips_finished_cases(encode_setup, tmp_path, caplog):
    config = encode_setup()
    assert main(["--config", str(config), "--max-cases", "1"]) == 0
    assert "1 encoded, 0 skipped, 0 failed, 2 pending" in caplog.text
    out = tmp_path / "emb"
    first = (out / "case0" / "imaging_emb.nii.gz").stat().st_mtime_ns
    caplog.clear()
    assert main(["--config", str(config)]) == 0
    assert "2 encoded, 1 skipped, 0 failed, 0 pending" in caplog.text
    assert (out / "case0" / "imaging_emb.nii.gz").stat().st_mtime_ns == first
    # a latent without its sidecar (killed while writing) and a corrupted latent are both redone
    Path(f"{out / 'case1' / 'imaging_emb.nii.gz'}.json").unlink()
    (out / "case2" / "imaging_emb.nii.gz").write_bytes(b"garbage")
    caplog.clear()
    assert main(["--config", str(config)]) == 0
    assert "2 encoded, 1 skipped" in caplog.text
    assert read_latent(out / "case2" / "imaging_emb.nii.gz")[0].shape == (4, 32, 28, 8)


def test_changed_settings_re_encode_and_resample(encode_setup, tmp_path, caplog):
    assert main(["--config", str(encode_setup())]) == 0
    caplog.clear()
    assert main(["--config", str(encode_setup(target_spacing=[4.0, 4.0, 4.0]))]) == 0
    assert "3 encoded, 0 skipped" in caplog.text
    side = read_sidecar(tmp_path / "emb" / "case0" / "imaging_emb.nii.gz")
    assert side["spacing"] == [4.0, 4.0, 4.0] and side["dim"] == [96, 80, 32]  # 366/4 -> 92 -> 96 ...


def test_sampled_latents_are_seeded(encode_setup, tmp_path):
    assert main(["--config", str(encode_setup(latent="sample", tiling={"method": "full"}))]) == 0
    a = read_latent(tmp_path / "emb" / "case0" / "imaging_emb.nii.gz")[0]
    b = read_latent(tmp_path / "emb" / "case1" / "imaging_emb.nii.gz")[0]
    assert not np.array_equal(a, b)  # same image, different per-case seed
    assert (
        main(
            [
                "--config",
                str(
                    encode_setup(
                        latent="sample", tiling={"method": "full"}, output_dir=str(tmp_path / "again")
                    )
                ),
            ]
        )
        == 0
    )
    assert np.array_equal(a, read_latent(tmp_path / "again" / "case0" / "imaging_emb.nii.gz")[0])


def test_a_failing_case_is_reported_and_the_others_finish(encode_setup, real_cases, tmp_path, caplog):
    data = json.loads((real_cases / "datalist.json").read_text())
    data["training"][1]["image"] = "case1/missing.nii.gz"
    (tmp_path / "dl.json").write_text(json.dumps(data))
    assert (
        main(["--config", str(encode_setup(datalist=str(tmp_path / "dl.json"), data_root=str(real_cases)))])
        == 1
    )
    assert "2 encoded, 0 skipped, 1 failed" in caplog.text and "missing.nii.gz" in caplog.text
    assert len(read_datalist(tmp_path / "emb" / "datalist.json")["training"]) == 2


@pytest.mark.parametrize(
    "case",
    ["unwritable", "vae mismatch", "datalist not json", "datalist keys", "config key", "roi not multiple"],
)
def test_bad_input_exits_2(case, encode_setup, tiny_checkpoints, tmp_path, capsys):
    changes: dict = {}
    if case == "unwritable":
        (tmp_path / "a_file").write_text("")
        changes["output_dir"] = str(tmp_path / "a_file" / "emb")
        fragment = f"cannot be created: {tmp_path / 'a_file'} is a file, not a folder"
    elif case == "vae mismatch":
        changes["preset"] = "small-rflow"
        fragment = (
            "autoencoder checkpoint was made for preset 'tiny-rflow', which differs from preset 'small-rflow'"
        )
    elif case == "datalist not json":
        (tmp_path / "dl.json").write_text("{")
        changes["datalist"] = str(tmp_path / "dl.json")
        fragment = "not valid JSON"
    elif case == "datalist keys":
        (tmp_path / "dl.json").write_text('{"cases": []}')
        changes["datalist"] = str(tmp_path / "dl.json")
        fragment = "'training' is a required property"
    elif case == "config key":
        changes["tilling"] = {}
        fragment = "did you mean 'tiling'?"
    else:
        changes["tiling"] = {"method": "sliding_window", "roi_size": [64, 62, 32]}
        fragment = "must be multiples of the VAE factor 4"
    assert main(["--config", str(encode_setup(**changes))]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "emb").exists()


def test_two_process_torchrun_splits_the_work_and_writes_one_datalist(encode_setup, tmp_path):
    config = encode_setup()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "maisi.encode",
        "--config",
        str(config),
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        },
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 encoded, 0 skipped" in done.stderr and done.stderr.count("wrote ") == 1
    data = read_datalist(tmp_path / "emb" / "datalist.json")
    assert len(data["training"]) == 3
    for entry in data["training"]:
        assert read_sidecar(tmp_path / "emb" / entry["image"])["latent_shape"] == [4, 32, 28, 8]


def test_tiled_encoding_stays_close_to_the_full_pass(encode_setup, tmp_path):
    assert main(["--config", str(encode_setup(tiling={"method": "full"}))]) == 0
    full = read_latent(tmp_path / "emb" / "case0" / "imaging_emb.nii.gz")[0]
    assert main(["--config", str(encode_setup(output_dir=str(tmp_path / "tiled")))]) == 0
    tiled = read_latent(tmp_path / "tiled" / "case0" / "imaging_emb.nii.gz")[0]
    assert full.shape == tiled.shape and np.abs(full - tiled).mean() < 0.5 * np.abs(full).mean()


def test_default_tiled_encoding_equals_the_full_pass(encode_setup, tmp_path):
    assert main(["--config", str(encode_setup(tiling={"method": "full"}))]) == 0
    full = read_latent(tmp_path / "emb" / "case0" / "imaging_emb.nii.gz")[0]
    config = encode_setup(output_dir=str(tmp_path / "tiled"), tiling={"memory_budget_mb": 16})  # many tiles
    assert main(["--config", str(config)]) == 0
    tiled = read_latent(tmp_path / "tiled" / "case0" / "imaging_emb.nii.gz")[0]
    np.testing.assert_allclose(tiled, full, atol=1e-4)
    assert read_sidecar(tmp_path / "tiled" / "case0" / "imaging_emb.nii.gz")["fingerprint"]["tiling"] == {
        "method": "tiled"
    }


def test_outputs_stay_inside_output_dir_when_paths_climb(encode_setup, real_cases, tmp_path):
    """A datalist kept outside the data folder has '../' paths; latents must still land in output_dir."""
    lists = real_cases.parent / f"lists_{tmp_path.name}"  # a sibling of the data folder
    lists.mkdir()
    data = json.loads((real_cases / "datalist.json").read_text())
    for entry in data["training"]:
        entry["image"], entry["label"] = (
            f"../{real_cases.name}/{entry['image']}",
            f"../{real_cases.name}/{entry['label']}",
        )
    (lists / "dl.json").write_text(json.dumps(data))
    config = encode_setup(datalist=str(lists / "dl.json"), data_root=str(lists))
    assert main(["--config", str(config)]) == 0
    assert (tmp_path / "emb" / real_cases.name / "case0" / "imaging_emb.nii.gz").is_file()
    assert not list(real_cases.rglob("*_emb.nii.gz"))


CT = Path(__file__).parent / "data" / "totalseg_example_ct_sm.nii.gz"


def _small_case(folder: Path, name: str = "ct", suffix: str = ".nii.gz", nan_at: tuple = ()) -> None:
    """A 32 x 32 x 16 crop of the real CT (float32 HU) and its label ``<name>_label.nii.gz``; NaN at the
    voxels ``nan_at``, the last of two or more inf."""
    from maisi.data.io import Volume, read_volume, write_volume

    ct = read_volume(CT)
    array = ct.array[40:72, 30:62, 6:22].astype(np.float32)
    for voxel in nan_at:
        array[voxel] = np.nan if len(nan_at) < 2 or voxel != nan_at[-1] else np.inf
    write_volume(folder / f"{name}{suffix}", Volume(array, ct.affine))
    write_volume(folder / f"{name}_label.nii.gz", Volume((array > -200).astype(np.uint8), ct.affine))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def small_data(tmp_path, tiny_checkpoints):
    """Factory: ``tmp/data`` with cases c0 and c1 (``ct.nii.gz`` + ``ct_label.nii.gz``), a datalist of
    ``entries`` in it (default: both cases), and an encode config with top-level keys set by ``changes``."""
    data = tmp_path / "data"

    def make(entries: list[dict] | None = None, **changes) -> Path:
        if not data.exists():
            for case in ("c0", "c1"):
                _small_case(data / case)
        listed = entries or [{"image": f"c{i}/ct.nii.gz", "label": f"c{i}/ct_label.nii.gz"} for i in range(2)]
        write_datalist(data / "datalist.json", {"training": listed})
        config = {
            "preset": "tiny-rflow",
            "autoencoder": str(tiny_checkpoints["tiny-rflow"]["autoencoder"]),
            "datalist": str(data / "datalist.json"),
            "output_dir": str(tmp_path / "emb"),
            "tiling": {"method": "full"},
            "device": "cpu",
            **changes,
        }
        return write_config(tmp_path / "encode.json", config)

    return make


def _no_model_load(monkeypatch) -> None:
    """Refusals must come before the autoencoder loads: loading it now fails the run with exit 1."""

    def refuse(*args, **kwargs):
        raise AssertionError("the autoencoder was loaded before the inputs were checked")

    monkeypatch.setattr("maisi.encoding.run.load_network", refuse)


@pytest.mark.parametrize("where", ["the data folder", "a symlink to it", "a folder containing it"])
def test_output_dir_on_the_data_never_overwrites_an_input(where, small_data, tmp_path, monkeypatch, capsys):
    """Issue 18: output_dir = data folder resampled c0/ct_label.nii.gz in place and replaced datalist.json."""
    config = small_data()
    data = tmp_path / "data"
    if where == "a symlink to it":
        (tmp_path / "link").symlink_to(data)
        config = small_data(output_dir=str(tmp_path / "link"))
    elif where == "a folder containing it":  # a datalist beside the data, '../' paths: outputs keep 'data/'
        (tmp_path / "lists").mkdir()
        entries = [
            {"image": f"../data/c{i}/ct.nii.gz", "label": f"../data/c{i}/ct_label.nii.gz"} for i in range(2)
        ]
        write_datalist(tmp_path / "lists" / "dl.json", {"training": entries})
        config = small_data(
            datalist=str(tmp_path / "lists" / "dl.json"),
            output_dir=str(tmp_path),
            output_datalist=str(tmp_path / "lists" / "dl.json"),
        )
    else:
        config = small_data(output_dir=str(data))
    before = _snapshot(tmp_path)
    _no_model_load(monkeypatch)
    capsys.readouterr()
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "refusing to encode" in err, err
    label = str(data.resolve() / "c0" / "ct_label.nii.gz")
    overwrite = "would overwrite the label of $.training[0]"
    assert any(label in line and overwrite in line for line in err.splitlines()), err
    assert any(
        line.strip().startswith("the output datalist ") and "would overwrite the input datalist" in line
        for line in err.splitlines()
    ), err
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed


def test_output_dir_beside_the_inputs_is_fine_when_nothing_collides(small_data, tmp_path):
    """Outputs may share the data folder as long as no input is written: only collisions are refused."""
    small_data()
    (tmp_path / "data" / "c0" / "ct_label.nii.gz").rename(tmp_path / "data" / "c0" / "seg.nii.gz")
    entries = [{"image": "c0/ct.nii.gz", "label": "c0/seg.nii.gz"}]
    config = small_data(
        entries, output_dir=str(tmp_path / "data"), output_datalist=str(tmp_path / "latents.json")
    )
    before = _snapshot(tmp_path / "data")
    assert main(["--config", str(config)]) == 0
    after = _snapshot(tmp_path / "data")
    assert {k: after[k] for k in before} == before
    assert {"c0/ct_emb.nii.gz", "c0/ct_label.nii.gz"} <= set(after)


def test_two_images_encoding_to_one_latent_are_refused(small_data, tmp_path, monkeypatch, capsys):
    """Issue 18: c3/ct.nii.gz and c3/ct.nrrd both became c3/ct_emb.nii.gz; the second overwrote the first."""
    small_data()
    from maisi.data.io import read_volume, write_volume

    write_volume(tmp_path / "data" / "c0" / "ct.nrrd", read_volume(tmp_path / "data" / "c0" / "ct.nii.gz"))
    entries = [{"image": "c0/ct.nii.gz"}, {"image": "c1/ct.nii.gz"}, {"image": "c0/ct.nrrd"}]
    _no_model_load(monkeypatch)
    capsys.readouterr()
    assert main(["--config", str(small_data(entries))]) == 2
    err = capsys.readouterr().err
    latent = tmp_path / "emb" / "c0" / "ct_emb.nii.gz"
    both = (
        f"the latent of $.training[2] (c0/ct.nrrd) {latent} and the latent of $.training[0] (c0/ct.nii.gz) "
        f"{latent} are one file: both would write it"
    )
    assert both in err, err
    assert err.count("both would write") == 1 and "Traceback" not in err  # one line per pair of cases
    assert not (tmp_path / "emb").exists()


BAD_LOCATIONS = [
    "output_dir is a file",
    "output_dir under a file",
    "output_datalist a folder",
    "output_datalist under a file",
    "output_dir not writable",
]


@pytest.mark.parametrize("case", BAD_LOCATIONS)
def test_bad_output_locations_are_refused_before_the_model_loads(
    case, small_data, tmp_path, monkeypatch, capsys
):
    (tmp_path / "a_file").write_text("keep me")
    changes = {
        "output_dir is a file": {"output_dir": str(tmp_path / "a_file")},
        "output_dir under a file": {"output_dir": str(tmp_path / "a_file" / "emb")},
        "output_datalist a folder": {"output_datalist": str(tmp_path)},
        "output_datalist under a file": {"output_datalist": str(tmp_path / "a_file" / "dl.json")},
        "output_dir not writable": {},
    }[case]
    fragments = {
        "output_datalist a folder": f"output datalist {tmp_path} is a folder",
        "output_datalist under a file": f"{tmp_path / 'a_file'} is a file, not a folder",
        "output_dir not writable": f"no write permission on {tmp_path}",
    }
    fragment = fragments.get(case, f"{tmp_path / 'a_file'} is a file, not a folder")
    config = small_data(**changes)
    if case == "output_dir not writable":  # root may write anywhere: stand in for a read-only folder
        real_access = os.access
        monkeypatch.setattr(
            "maisi.files.os.access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode)
        )
    _no_model_load(monkeypatch)
    capsys.readouterr()
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert (tmp_path / "a_file").read_text() == "keep me" and not (tmp_path / "emb").exists()


def test_non_finite_ct_voxels_fail_that_case_unless_filled_as_air(small_data, tmp_path, caplog):
    """Issue 18: one NaN voxel made the whole latent NaN and the sidecar marked the case finished."""
    small_data()
    _small_case(tmp_path / "data" / "c1", nan_at=((3, 4, 5), (10, 10, 10)))  # a NaN and an inf
    assert main(["--config", str(small_data())]) == 1
    assert "1 encoded, 0 skipped, 1 failed" in caplog.text
    assert f"{tmp_path / 'data' / 'c1' / 'ct.nii.gz'}: 2 non-finite voxel(s) (NaN or inf)" in caplog.text
    out = tmp_path / "emb"
    assert not (out / "c1").exists()  # nothing of the failed case
    assert [e["image"] for e in read_datalist(out / "datalist.json")["training"]] == ["c0/ct_emb.nii.gz"]
    caplog.clear()
    assert main(["--config", str(small_data(nonfinite="fill_air"))]) == 0
    assert "1 encoded, 1 skipped, 0 failed" in caplog.text
    assert np.isfinite(read_latent(out / "c1" / "ct_emb.nii.gz")[0]).all()
    assert read_sidecar(out / "c1" / "ct_emb.nii.gz")["nonfinite_filled"] == 2
    assert read_sidecar(out / "c0" / "ct_emb.nii.gz")["nonfinite_filled"] == 0
    caplog.clear()  # back to "error": the filled case is not taken as finished
    assert main(["--config", str(small_data())]) == 1
    assert "0 encoded, 1 skipped, 1 failed" in caplog.text


def test_a_non_finite_latent_is_never_written(small_data, tmp_path, monkeypatch, caplog):
    import maisi.encoding.cases

    real = maisi.encoding.cases.encode
    monkeypatch.setattr(maisi.encoding.cases, "encode", lambda *a, **k: real(*a, **k) * float("nan"))
    entries = [{"image": "c0/ct.nii.gz", "label": "c0/ct_label.nii.gz"}]
    assert main(["--config", str(small_data(entries))]) == 1
    assert "ct.nii.gz: its latent has " in caplog.text and "non-finite value(s)" in caplog.text
    assert not (tmp_path / "emb").exists()


def test_a_nan_latent_from_before_the_checks_is_encoded_again(small_data, tmp_path, caplog):
    from maisi.data.latents import write_latent, write_sidecar
    from maisi.files import file_sha256

    config = small_data([{"image": "c0/ct.nii.gz"}])
    assert main(["--config", str(config)]) == 0
    latent_path = tmp_path / "emb" / "c0" / "ct_emb.nii.gz"
    latent, affine = read_latent(latent_path)
    write_latent(latent_path, latent * np.nan, affine)  # as an older version wrote a case whose CT held a NaN
    side = read_sidecar(latent_path)
    side.pop("nonfinite_filled", None)
    write_sidecar(latent_path, {**side, "latent_sha256": file_sha256(latent_path)})
    caplog.clear()
    assert main(["--config", str(config)]) == 0
    assert "1 encoded, 0 skipped" in caplog.text and np.isfinite(read_latent(latent_path)[0]).all()


# ------------------------------------------------------------------------------------------ kind "mask"


@pytest.fixture(scope="module")
def tiny_mask_vae(tmp_path_factory) -> Path:
    """A tiny-mask-ddpm mask VAE with seeded random weights, in our format."""
    import torch

    from maisi.checkpoints import save_checkpoint
    from maisi.families.mask import get_mask_preset
    from maisi.masks.networks import build_mask_network

    preset = get_mask_preset("tiny-mask-ddpm")
    torch.manual_seed(0)
    vae = build_mask_network(preset, "autoencoder")
    return save_checkpoint(tmp_path_factory.mktemp("mask_vae") / "vae.pt", vae, preset, "mask_autoencoder")


def test_kind_mask_encodes_each_label_mask_into_a_quarter_size_latent(
    encode_setup, tiny_mask_vae, real_cases, tmp_path
):
    config = encode_setup(
        kind="mask", preset="tiny-mask-ddpm", autoencoder=str(tiny_mask_vae), tiling={"method": "tiled"}
    )
    assert main(["--config", str(config)]) == 0
    entries = read_datalist(tmp_path / "emb" / "datalist.json")["training"]
    assert len(entries) == 3
    mask = read_mask(real_cases / "case0" / "segmentation.nii.gz")  # 122 x 101 x 30 at 3 mm
    padded = [128, 104, 32]  # multiples of 8: the VAE factor 4 x the tiny mask UNet's 2
    for entry in entries:
        latent, affine = read_latent(tmp_path / "emb" / entry["image"])
        assert latent.shape == (4, 32, 26, 8) and np.isfinite(latent).all()
        assert np.allclose(affine[:3, :3], mask.affine[:3, :3] * 4)
        sidecar = read_sidecar(tmp_path / "emb" / entry["image"])
        assert (
            sidecar["kind"] == "mask"
            and sidecar["dim"] == padded
            and sidecar["latent_shape"] == [4, 32, 26, 8]
        )
        assert sidecar["label_ids"] == sorted(int(v) for v in np.unique(mask.array))
        assert entry["label"] is None and "anatomy_size" not in entry  # the entries had none
        assert entry["image"].endswith("segmentation_emb.nii.gz")  # named after the mask
    assert not list((tmp_path / "emb").rglob("*_label.nii.gz"))


@pytest.mark.parametrize("case", ["CT preset", "CT checkpoint", "entry without label"])
def test_kind_mask_bad_input_exits_2_before_anything_is_written(
    case, encode_setup, tiny_mask_vae, tiny_checkpoints, real_cases, tmp_path, capsys
):
    changes = {"kind": "mask", "preset": "tiny-mask-ddpm", "autoencoder": str(tiny_mask_vae)}
    if case == "CT preset":
        changes["preset"] = "tiny-rflow"
        fragment = "$.preset: 'tiny-rflow' is a CT preset; kind 'mask' needs a mask preset"
    elif case == "CT checkpoint":
        changes["autoencoder"] = str(tiny_checkpoints["tiny-rflow"]["autoencoder"])
        fragment = "holds a autoencoder checkpoint, expected a mask_autoencoder checkpoint"
    else:
        data = json.loads((real_cases / "datalist.json").read_text())
        del data["training"][1]["label"]
        changes.update(datalist=str(tmp_path / "no_label.json"), data_root=str(real_cases))
        (tmp_path / "no_label.json").write_text(json.dumps(data))
        fragment = "$.training[1].label: missing (kind 'mask' encodes each entry's label mask)"
    assert main(["--config", str(encode_setup(**changes))]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "emb").exists()


def test_kind_mask_case_with_ids_outside_the_table_fails_and_the_others_finish(
    encode_setup, tiny_mask_vae, real_cases, tmp_path, caplog
):
    from maisi.data.io import write_volume

    mask = read_mask(real_cases / "case0" / "segmentation.nii.gz")
    bad = mask.array.copy()
    bad[:2, :2, :2] = 250
    write_volume(tmp_path / "bad" / "segmentation.nii.gz", mask.with_array(bad))
    data = json.loads((real_cases / "datalist.json").read_text())
    data["training"][2]["label"] = str(tmp_path / "bad" / "segmentation.nii.gz")
    datalist = tmp_path / "bad.json"
    datalist.write_text(json.dumps(data))
    config = encode_setup(
        kind="mask",
        preset="tiny-mask-ddpm",
        autoencoder=str(tiny_mask_vae),
        datalist=str(datalist),
        data_root=str(real_cases),
        tiling={"method": "tiled"},
    )
    assert main(["--config", str(config)]) == 1
    assert "2 encoded, 0 skipped, 1 failed" in caplog.text
    assert (
        "bad/segmentation.nii.gz holds label id(s) [250] that the mask VAE has no channel for" in caplog.text
    )
    assert len(read_datalist(tmp_path / "emb" / "datalist.json")["training"]) == 2


@pytest.mark.parametrize("value", [-1, 300, 40000])
def test_a_label_outside_0_255_fails_its_case_instead_of_wrapping(value, small_data, tmp_path, caplog):
    """A label of -1 was written as 255 (uint8) and 40000 as -25536 (int16); the ControlNet reads 8 bits."""
    from maisi.data.io import Volume, read_volume, write_volume

    small_data()
    label_path = tmp_path / "data" / "c1" / "ct_label.nii.gz"
    label = read_volume(label_path)
    array = label.array.astype(np.int32)
    array[:2, :2, :2] = value
    write_volume(label_path, Volume(array, label.affine))
    assert main(["--config", str(small_data())]) == 1
    assert "1 encoded, 0 skipped, 1 failed" in caplog.text
    assert f"{label_path}: label(s) [{value}] outside 0..255" in caplog.text
    assert not (tmp_path / "emb" / "c1").exists()


@pytest.mark.parametrize("kind", ["intercept dropped", "mr"])
def test_a_ct_without_any_voxel_below_0_hu_fails_its_case(kind, small_data, tmp_path, caplog):
    """A CT stored without its -1024 intercept (air at +24) or an MR image listed as CT was clipped to
    [-1000, 1000] HU and encoded as if it were CT."""
    from maisi.data.io import Volume, read_volume, write_volume

    small_data()
    path = tmp_path / "data" / "c1" / "ct.nii.gz"
    ct = read_volume(path)
    shifted = ct.array + 1024 if kind == "intercept dropped" else np.clip(ct.array + 1000, 0, None) / 3
    write_volume(path, Volume(shifted.astype(np.uint16), ct.affine))
    assert main(["--config", str(small_data())]) == 1
    assert "1 encoded, 0 skipped, 1 failed" in caplog.text
    assert f"{path}: no voxel below 0 HU (lowest {int(shifted.min())})" in caplog.text
    assert not (tmp_path / "emb" / "c1").exists()
    caplog.clear()  # the same image declared as MR is encoded
    entries = [{"image": "c1/ct.nii.gz", "label": "c1/ct_label.nii.gz", "modality": "mri"}]
    assert main(["--config", str(small_data(entries))]) == 0
    assert read_sidecar(tmp_path / "emb" / "c1" / "ct_emb.nii.gz")["modality"] == "mri"
