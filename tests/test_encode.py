"""``maisi.encode``: latents with sidecars, restartable, sharded with torchrun, bad input refused."""

from __future__ import annotations

import json
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
        write_datalist(datalist, build_datalist(real_cases, "*/imaging.nii.gz", "*/segmentation.nii.gz", datalist,
                                                load_label_dict(), num_folds=3))  # fmt: skip

    def make(**changes) -> Path:
        data = {"preset": "tiny-rflow", "autoencoder": str(tiny_checkpoints["tiny-rflow"]["autoencoder"]),
                "datalist": str(datalist), "output_dir": str(tmp_path / "emb"),
                "tiling": {"method": "sliding_window", "roi_size": [64, 64, 32]}, "device": "cpu"}  # fmt: skip
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
    assert main(["--config", str(encode_setup(latent="sample", tiling={"method": "full"},
                                              output_dir=str(tmp_path / "again")))]) == 0  # fmt: skip
    assert np.array_equal(a, read_latent(tmp_path / "again" / "case0" / "imaging_emb.nii.gz")[0])


def test_a_failing_case_is_reported_and_the_others_finish(encode_setup, real_cases, tmp_path, caplog):
    data = json.loads((real_cases / "datalist.json").read_text())
    data["training"][1]["image"] = "case1/missing.nii.gz"
    (tmp_path / "dl.json").write_text(json.dumps(data))
    assert main(["--config", str(encode_setup(datalist=str(tmp_path / "dl.json"), data_root=str(real_cases)))]) == 1
    assert "2 encoded, 0 skipped, 1 failed" in caplog.text and "missing.nii.gz" in caplog.text
    assert len(read_datalist(tmp_path / "emb" / "datalist.json")["training"]) == 2


@pytest.mark.parametrize("case", ["unwritable", "vae mismatch", "datalist not json", "datalist keys", "config key",
                                  "roi not multiple"])  # fmt: skip
def test_bad_input_exits_2(case, encode_setup, tiny_checkpoints, tmp_path, capsys):
    changes: dict = {}
    if case == "unwritable":
        (tmp_path / "a_file").write_text("")
        changes["output_dir"] = str(tmp_path / "a_file" / "emb")
        fragment = "is not writable"
    elif case == "vae mismatch":
        changes["preset"] = "small-rflow"
        fragment = "autoencoder checkpoint was made for preset 'tiny-rflow', which differs from preset 'small-rflow'"
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "maisi.encode", "--config", str(config)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                          "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
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
        "method": "tiled"}


def test_outputs_stay_inside_output_dir_when_paths_climb(encode_setup, real_cases, tmp_path):
    """A datalist kept outside the data folder has '../' paths; latents must still land in output_dir."""
    lists = real_cases.parent / f"lists_{tmp_path.name}"  # a sibling of the data folder
    lists.mkdir()
    data = json.loads((real_cases / "datalist.json").read_text())
    for entry in data["training"]:
        entry["image"], entry["label"] = f"../{real_cases.name}/{entry['image']}", f"../{real_cases.name}/{entry['label']}"
    (lists / "dl.json").write_text(json.dumps(data))
    config = encode_setup(datalist=str(lists / "dl.json"), data_root=str(lists))
    assert main(["--config", str(config)]) == 0
    assert (tmp_path / "emb" / real_cases.name / "case0" / "imaging_emb.nii.gz").is_file()
    assert not list(real_cases.rglob("*_emb.nii.gz"))
