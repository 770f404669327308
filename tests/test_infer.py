"""``maisi.infer`` end to end on CPU with tiny random-weight checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from maisi import infer
from maisi.checkpoints import file_sha256
from maisi.data.io import Volume, read_volume, write_volume
from tests.conftest import phantom_mask


def run_cli(config: Path, *flags: str) -> int:
    return infer.main(["--config", str(config), *flags])


def test_from_mask_writes_ct_on_the_mask_grid(infer_config, mask_file, tmp_path, tiny_checkpoints):
    assert run_cli(infer_config()) == 0
    out = tmp_path / "out"
    image = read_volume(out / "sample_seed0_image.nii.gz")
    mask = read_volume(mask_file)
    assert image.shape == mask.shape == (32, 32, 16)
    np.testing.assert_allclose(image.affine, mask.affine, atol=1e-5)
    np.testing.assert_allclose(nib.load(out / "sample_seed0_image.nii.gz").header.get_zooms(), (2.0, 2.0, 3.0))
    assert image.array.dtype == np.int16
    assert image.array.min() >= -1000 and image.array.max() <= 1000
    assert np.all(image.array[mask.array == 0] == -1000)
    assert np.unique(image.array[mask.array > 0]).size > 10  # an image, not a constant
    label = read_volume(out / "sample_seed0_label.nii.gz")
    assert np.array_equal(label.array, mask.array) and label.array.dtype == np.uint8  # MAISI ids, unchanged
    preview = sitk.ReadImage(str(out / "sample_seed0_preview.png"))
    assert preview.GetDimension() == 2 and preview.GetNumberOfComponentsPerPixel() == 3  # mask outlines in colour
    meta = json.loads((out / "sample_seed0.json").read_text())
    assert meta["seed"] == 0 and meta["shape"] == [32, 32, 16]
    assert meta["checkpoints"]["controlnet"]["sha256"] == file_sha256(tiny_checkpoints["tiny-rflow"]["controlnet"])
    assert meta["mask"]["sha256"] == file_sha256(mask_file)
    assert meta["conditions"]["spacing_mm"] == [2.0, 2.0, 3.0] and meta["sampler"]["scheduler"] == "rflow"
    assert set(meta["timings_s"]) == {"sampling", "decoding", "writing", "total"}
    assert meta["config"]["preset"] == "tiny-rflow"
    assert json.loads((out / "sample_resolved_config.json").read_text())["mask"] == str(mask_file)
    assert not list(out.glob(".tmp-*"))


def fake_generate(bad_seeds: set[int]):
    """A stand-in for generation.generate: liver 50 HU (-500 HU for ``bad_seeds``), lung -800, rest 0."""

    def generate(plan, models, seed, progress=True):
        labels = plan.mask.array
        hu = np.zeros(labels.shape, dtype=np.int16)
        hu[labels == 1] = -500 if seed in bad_seeds else 50
        hu[labels == 28] = -800
        return plan.mask.with_array(hu), {"sampling_s": 1.0, "decoding_s": 0.5}

    return generate


def test_failed_hu_check_regenerates_with_new_seeds_and_records_every_try(infer_config, tmp_path, monkeypatch):
    from maisi import generation

    monkeypatch.setattr(generation, "generate", fake_generate({5, 5 + 1_000_003}))
    assert run_cli(infer_config(seed=5, quality_check={"max_tries": 4})) == 0
    out = tmp_path / "out"
    meta = json.loads((out / "sample_seed5.json").read_text())
    tries = meta["quality_check"]["tries"]
    assert [t["seed"] for t in tries] == [5, 1_000_008, 2_000_011]  # stops at the first pass
    assert [t["failed"] for t in tries] == [["liver"], ["liver"], []] and meta["quality_check"]["passed"]
    assert tries[0]["organs"]["liver"]["median_hu"] == -500 and tries[2]["organs"]["lung"]["passed"]
    assert meta["timings_s"]["sampling"] == 3.0  # all tries counted
    image = read_volume(out / "sample_seed5_image.nii.gz")
    assert np.all(image.array[read_volume(out / "sample_seed5_label.nii.gz").array == 1] == 50)  # the passing try
    assert meta["mask_fidelity"]["lung"] is not None


def test_when_every_try_fails_the_sample_is_kept_and_flagged(infer_config, tmp_path, monkeypatch, caplog):
    from maisi import generation

    monkeypatch.setattr(generation, "generate", fake_generate({0, 1_000_003}))
    assert run_cli(infer_config(quality_check={"max_tries": 2})) == 0
    meta = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())
    assert meta["quality_check"]["passed"] is False and len(meta["quality_check"]["tries"]) == 2
    assert "HU check failed for liver" in caplog.text


def test_quality_check_can_be_switched_off(infer_config, tmp_path, monkeypatch):
    from maisi import generation

    monkeypatch.setattr(generation, "generate", fake_generate({0}))
    assert run_cli(infer_config(quality_check={"enabled": False})) == 0
    assert json.loads((tmp_path / "out" / "sample_seed0.json").read_text())["quality_check"] is None


def test_image_only_ddpm_with_ddim_and_sliding_window(infer_config, tmp_path):
    config = infer_config(
        "tiny-ddpm", mask=None, output_size=[32, 48, 16], spacing=[1.5, 1.5, 2.5],
        body_region={"top": "chest", "bottom": "abdomen"}, sampling={"scheduler": "ddim", "num_inference_steps": 4},
        decoding={"method": "sliding_window", "sw_roi_size": [4, 4, 4], "sw_overlap": 0.25},
        output={"dir": str(tmp_path / "out"), "format": "nrrd"},
    )  # fmt: skip
    assert run_cli(config) == 0
    image = read_volume(tmp_path / "out" / "sample_seed0_image.nrrd")
    assert image.shape == (32, 48, 16) and np.allclose(image.spacing, (1.5, 1.5, 2.5))
    centre = image.affine @ np.array([*(np.array(image.shape) - 1) / 2.0, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)  # volume centred on the world origin
    assert not (tmp_path / "out" / "sample_seed0_label.nrrd").exists()
    meta = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())
    assert meta["conditions"]["top_region"] == "chest" and meta["mask"] is None


def test_seeds_are_reproducible_and_reruns_skip_finished_samples(infer_config, tmp_path, caplog):
    config = infer_config(num_samples=2)
    assert run_cli(config) == 0
    out = tmp_path / "out"
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    a, b = (read_volume(out / f"sample_seed{s}_image.nii.gz").array for s in (0, 1))
    assert not np.array_equal(a, b)
    assert run_cli(config) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in first and "resolved" not in p.name} == {
        k: v for k, v in first.items() if "resolved" not in k}  # fmt: skip
    assert "2 skipped" in caplog.text
    (out / "sample_seed1.json").unlink()  # an unfinished sample is redone
    assert run_cli(config) == 0
    assert np.array_equal(read_volume(out / "sample_seed1_image.nii.gz").array, b)
    assert run_cli(config, "--seed", "1", "--num-samples", "1", "--output-dir", str(tmp_path / "again")) == 0
    assert np.array_equal(read_volume(tmp_path / "again" / "sample_seed1_image.nii.gz").array, b)


def test_dry_run_prints_the_resolved_config_and_writes_nothing(infer_config, tmp_path, capsys):
    assert run_cli(infer_config(), "--dry-run") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sampling"]["conditioning_scale"] == 1.0 and printed["output"]["format"] == "nii.gz"
    assert not (tmp_path / "out").exists()


def test_missing_body_label_is_a_warning_not_an_error(infer_config, tmp_path, caplog):
    mask = phantom_mask()
    mask[mask == 200] = 0
    path = write_volume(tmp_path / "nobody.nii.gz", Volume(mask, np.diag([2.0, 2.0, 3.0, 1.0])))
    assert run_cli(infer_config(mask=str(path))) == 0
    assert "no body label 200" in caplog.text and "-800 HU" in caplog.text


def _broken_masks(tmp_path: Path) -> dict[str, Path]:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    masks = {}
    masks["text"] = tmp_path / "text.nii.gz"
    masks["text"].write_text("not an image")
    half = phantom_mask().astype(np.float32)
    half[5, 5, 5] = 0.5
    masks["float"] = write_volume(tmp_path / "float.nii.gz", Volume(half, affine))
    unknown = phantom_mask()
    unknown[6, 6, 6] = 250
    masks["unknown"] = write_volume(tmp_path / "unknown.nii.gz", Volume(unknown, affine))
    masks["size"] = write_volume(tmp_path / "size.nii.gz", Volume(phantom_mask((30, 32, 16)), affine))
    return masks


BROKEN = [
    ("unknown key", {"colour": "red"}, "$.colour: unknown key 'colour'"),
    ("wrong type", {"seed": "zero"}, "$.seed: got \"zero\", expected type integer"),
    ("missing weights", {"checkpoints": "missing"}, "diffusion_unet checkpoint not found"),
    ("other architecture", {"checkpoints": "ddpm-unet"}, "made for preset 'tiny-ddpm'"),
    ("no scale_factor", {"checkpoints": "no-scale"}, "has no scale_factor"),
    ("released size", {"preset": "maisi-ct-rflow", "mask": None, "output_size": [256, 256, 100],
                       "spacing": [1.0, 1.0, 1.0]}, "size z 100 is not one of"),  # fmt: skip
    ("released fov", {"preset": "maisi-ct-rflow", "mask": None, "output_size": [256, 256, 128],
                      "spacing": [0.5, 0.5, 1.0]}, "field of view in x/y 128 mm is under 256 mm"),  # fmt: skip
    ("mask unreadable", {"mask": "text"}, "cannot read as a medical image"),
    ("mask not integer", {"mask": "float"}, "must hold integer labels, found 0.5"),
    ("mask labels unknown", {"mask": "unknown"}, "labels not in the label dictionary: 250"),
    ("mask size", {"mask": "size"}, "size [30, 32, 16] is not a multiple of 16"),
    ("mask missing", {"mask": "/nonexistent/mask.nii.gz"}, "/nonexistent/mask.nii.gz: file not found"),
]


@pytest.mark.parametrize("changes, fragment", [(c, f) for _, c, f in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(
    changes, fragment, infer_config, tiny_checkpoints, tmp_path, capsys
):
    changes = dict(changes)
    masks = _broken_masks(tmp_path)
    if changes.get("mask") in masks:
        changes["mask"] = str(masks[changes["mask"]])
    ckpt = {k: str(v) for k, v in tiny_checkpoints["tiny-rflow"].items()}
    if changes.get("checkpoints") == "missing":
        changes["checkpoints"] = {**ckpt, "diffusion_unet": str(tmp_path / "nope.pt")}
    elif changes.get("checkpoints") == "ddpm-unet":
        changes["checkpoints"] = {**ckpt, "diffusion_unet": str(tiny_checkpoints["tiny-ddpm"]["diffusion_unet"])}
    elif changes.get("checkpoints") == "no-scale":
        raw = torch.load(ckpt["diffusion_unet"], weights_only=True)
        torch.save({"unet_state_dict": raw["state_dict"]}, tmp_path / "released_unet.pt")
        changes["checkpoints"] = {**ckpt, "diffusion_unet": str(tmp_path / "released_unet.pt")}
    assert run_cli(infer_config(**changes)) == 2
    err = capsys.readouterr().err
    assert err.startswith("maisi.infer: error:") and fragment in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_output_dir_of_another_job_is_not_overwritten(infer_config, tmp_path, capsys):
    assert run_cli(infer_config()) == 0
    before = (tmp_path / "out" / "sample_seed0_image.nii.gz").read_bytes()
    assert run_cli(infer_config(sampling={"num_inference_steps": 2})) == 2
    assert "holds sample_seed0.json from another job" in capsys.readouterr().err
    assert (tmp_path / "out" / "sample_seed0_image.nii.gz").read_bytes() == before


def test_cuda_requested_without_cuda_is_an_input_error(infer_config, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli(infer_config(), "--device", "cuda") == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_runtime_failure_exits_1_with_a_traceback(infer_config, monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(infer, "generate_checked", explode)
    assert run_cli(infer_config()) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "simulated out of memory" in err and "runtime failure" in err


def test_bad_flags_exit_2():
    with pytest.raises(SystemExit) as info:
        infer.main(["--config", "x.json", "--num-samples", "0"])
    assert info.value.code == 2


def test_module_entry_point_runs_in_a_fresh_process(infer_config, tmp_path):
    config = infer_config()
    done = subprocess.run([sys.executable, "-m", "maisi.infer", "--config", str(config)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "sample_seed0_image.nii.gz").is_file()
