"""``maisi.infer`` end to end on CPU with tiny random-weight checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from maisi import device as device_module
from maisi import infer
from maisi.config import load_config
from maisi.data.io import Volume, read_volume, write_volume
from maisi.errors import InputError
from maisi.files import file_sha256
from maisi.generation import memory as generation_memory
from maisi.generation import pipeline as generation_pipeline
from maisi.generation import plan as generation_plan
from maisi.generation import run as generation_run
from tests.conftest import phantom_mask
from tests.test_atomic import dead_pid, held_lock  # noqa: F401 - held_lock is a fixture


def run_cli(config: Path, *flags: str) -> int:
    return infer.main(["--config", str(config), *flags])


def test_from_mask_writes_ct_on_the_mask_grid(infer_config, mask_file, tmp_path, tiny_checkpoints):
    assert run_cli(infer_config()) == 0
    out = tmp_path / "out"
    image = read_volume(out / "sample_seed0_image.nii.gz")
    mask = read_volume(mask_file)
    assert image.shape == mask.shape == (32, 32, 16)
    np.testing.assert_allclose(image.affine, mask.affine, atol=1e-5)
    np.testing.assert_allclose(
        nib.load(out / "sample_seed0_image.nii.gz").header.get_zooms(), (2.0, 2.0, 3.0)
    )
    assert image.array.dtype == np.int16
    assert image.array.min() >= -1000 and image.array.max() <= 1000
    assert np.all(image.array[mask.array == 0] == -1000)
    assert np.unique(image.array[mask.array > 0]).size > 10  # an image, not a constant
    label = read_volume(out / "sample_seed0_label.nii.gz")
    assert np.array_equal(label.array, mask.array) and label.array.dtype == np.uint8  # MAISI ids, unchanged
    preview = sitk.ReadImage(str(out / "sample_seed0_preview.png"))
    assert (
        preview.GetDimension() == 2 and preview.GetNumberOfComponentsPerPixel() == 3
    )  # mask outlines in colour
    meta = json.loads((out / "sample_seed0.json").read_text())
    assert meta["seed"] == 0 and meta["shape"] == [32, 32, 16]
    assert meta["checkpoints"]["controlnet"]["sha256"] == file_sha256(
        tiny_checkpoints["tiny-rflow"]["controlnet"]
    )
    assert meta["mask"]["sha256"] == file_sha256(mask_file)
    assert meta["conditions"]["spacing_mm"] == [2.0, 2.0, 3.0] and meta["sampler"]["scheduler"] == "rflow"
    assert set(meta["timings_s"]) == {"sampling", "decoding", "writing", "total"}
    assert meta["config"]["preset"] == "tiny-rflow"
    job_configs = list(out.glob("sample_job-*_config.json"))
    assert [p.name for p in job_configs] == [f"sample_job-{meta['job_key'][:12]}_config.json"]
    assert json.loads(job_configs[0].read_text())["mask"] == str(mask_file)
    assert meta["outputs_sha256"] == {k: file_sha256(out / name) for k, name in meta["files"].items()}
    assert not list(out.glob(".tmp-*")) and not (out / ".maisi.lock").exists()


def fake_generate(bad_seeds: set[int]):
    """A stand-in for generation_plan.generate: liver 50 HU (-500 HU for ``bad_seeds``), lung -800, rest 0."""

    def generate(plan, models, seed, progress=True):
        labels = plan.mask.array
        hu = np.zeros(labels.shape, dtype=np.int16)
        hu[labels == 1] = -500 if seed in bad_seeds else 50
        hu[labels == 28] = -800
        return plan.mask.with_array(hu), {"sampling_s": 1.0, "decoding_s": 0.5}

    return generate


def test_failed_hu_check_regenerates_with_new_seeds_and_records_every_try(
    infer_config, tmp_path, monkeypatch, caplog
):
    from maisi.generation import plan as generation_plan

    monkeypatch.setattr(generation_plan, "generate", fake_generate({5, 5 + 1_000_003}))
    assert run_cli(infer_config(seed=5, quality_check={"max_tries": 4})) == 0
    out = tmp_path / "out"
    meta = json.loads((out / "sample_seed5.json").read_text())
    tries = meta["quality_check"]["tries"]
    assert [t["seed"] for t in tries] == [5, 1_000_008, 2_000_011]  # stops at the first pass
    assert [t["failed"] for t in tries] == [["liver"], ["liver"], []] and meta["quality_check"]["passed"]
    assert tries[0]["organs"]["liver"]["median_hu"] == -500 and tries[2]["organs"]["lung"]["passed"]
    assert meta["timings_s"]["sampling"] == 3.0  # all tries counted
    assert meta["hu_min_max"] == [-800, 50] and "(HU [-800, 50];" in caplog.text  # CT's range is in HU
    image = read_volume(out / "sample_seed5_image.nii.gz")
    assert np.all(
        image.array[read_volume(out / "sample_seed5_label.nii.gz").array == 1] == 50
    )  # the passing try
    assert meta["mask_fidelity"]["lung"] is not None


def test_when_every_try_fails_the_sample_is_kept_and_flagged(infer_config, tmp_path, monkeypatch, caplog):
    from maisi.generation import plan as generation_plan

    monkeypatch.setattr(generation_plan, "generate", fake_generate({0, 1_000_003}))
    assert run_cli(infer_config(quality_check={"max_tries": 2})) == 0
    meta = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())
    assert meta["quality_check"]["passed"] is False and len(meta["quality_check"]["tries"]) == 2
    assert "HU check failed for liver" in caplog.text


def test_quality_check_can_be_switched_off(infer_config, tmp_path, monkeypatch):
    from maisi.generation import plan as generation_plan

    monkeypatch.setattr(generation_plan, "generate", fake_generate({0}))
    assert run_cli(infer_config(quality_check={"enabled": False})) == 0
    assert json.loads((tmp_path / "out" / "sample_seed0.json").read_text())["quality_check"] is None


def test_image_only_ddpm_with_ddim_and_sliding_window(infer_config, tmp_path):
    config = infer_config(
        "tiny-ddpm",
        mask=None,
        output_size=[32, 48, 16],
        spacing=[1.5, 1.5, 2.5],
        body_region={"top": "chest", "bottom": "abdomen"},
        sampling={"scheduler": "ddim", "num_inference_steps": 4},
        decoding={"method": "sliding_window", "sw_roi_size": [4, 4, 4], "sw_overlap": 0.25},
        output={"dir": str(tmp_path / "out"), "format": "nrrd"},
    )
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
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first  # the job's config included
    assert "0 generated, 2 skipped" in caplog.text
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
    coarse = np.diag([2.0, 2.0, 6.0, 1.0])  # z spacing outside the released presets' limits: padding fails
    masks["coarse"] = write_volume(tmp_path / "coarse.nii.gz", Volume(phantom_mask((30, 32, 16)), coarse))
    masks["empty"] = write_volume(tmp_path / "empty.nii.gz", Volume(np.zeros((32, 32, 16), np.uint8), affine))
    return masks


BROKEN = [
    ("unknown key", {"colour": "red"}, "$.colour: unknown key 'colour'"),
    ("wrong type", {"seed": "zero"}, '$.seed: got "zero", expected type integer'),
    ("missing weights", {"checkpoints": "missing"}, "diffusion_unet checkpoint not found"),
    ("other architecture", {"checkpoints": "ddpm-unet"}, "made for preset 'tiny-ddpm'"),
    ("no scale_factor", {"checkpoints": "no-scale"}, "has no scale_factor"),
    (
        "released size",
        {
            "preset": "maisi-ct-rflow",
            "mask": None,
            "output_size": [256, 256, 100],
            "spacing": [1.0, 1.0, 1.0],
        },
        "size z 100 is not one of",
    ),
    (
        "released fov",
        {
            "preset": "maisi-ct-rflow",
            "mask": None,
            "output_size": [256, 256, 128],
            "spacing": [0.5, 0.5, 1.0],
        },
        "field of view in x/y 128 mm is under 256 mm",
    ),
    ("mask unreadable", {"mask": "text"}, "cannot read as a medical image"),
    ("mask not integer", {"mask": "float"}, "must hold integer labels, found 0.5"),
    ("mask labels unknown", {"mask": "unknown"}, "labels not in the label dictionary: 250"),
    ("mask grid", {"preset": "maisi-ct-rflow", "mask": "coarse"}, "spacing z 6 mm is outside [0.5, 5] mm"),
    ("mask missing", {"mask": "/nonexistent/mask.nii.gz"}, "/nonexistent/mask.nii.gz: file not found"),
    ("mask all zero", {"mask": "empty"}, "empty.nii.gz:\n  has no labelled voxel (every voxel is 0"),
    ("controlnet missing", {"checkpoints": "no-controlnet"}, "controlnet checkpoint not found"),
    (
        "label dict missing",
        {"label_dict": "/nonexistent/labels.json"},
        "$.label_dict: /nonexistent/labels.json: file not found",
    ),
]


@pytest.mark.parametrize("flags", [(), ("--dry-run",)], ids=["run", "dry-run"])
@pytest.mark.parametrize("changes, fragment", [(c, f) for _, c, f in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(
    changes, fragment, flags, infer_config, tiny_checkpoints, tmp_path, capsys
):
    assert run_cli(broken_config(changes, infer_config, tiny_checkpoints, tmp_path), *flags) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("maisi.infer: error:") and fragment in err, err
    assert "Traceback" not in err and captured.out == ""  # a dry run prints no config when a check fails
    assert not (tmp_path / "out").exists()


def broken_config(changes: dict, infer_config, tiny_checkpoints, tmp_path) -> Path:
    """The config of a row of BROKEN: its masks and checkpoints made in ``tmp_path``."""
    changes = dict(changes)
    masks = _broken_masks(tmp_path)
    if changes.get("mask") in masks:
        changes["mask"] = str(masks[changes["mask"]])
    ckpt = {k: str(v) for k, v in tiny_checkpoints["tiny-rflow"].items()}
    if changes.get("checkpoints") == "missing":
        changes["checkpoints"] = {**ckpt, "diffusion_unet": str(tmp_path / "nope.pt")}
    elif changes.get("checkpoints") == "ddpm-unet":
        changes["checkpoints"] = {
            **ckpt,
            "diffusion_unet": str(tiny_checkpoints["tiny-ddpm"]["diffusion_unet"]),
        }
    elif changes.get("checkpoints") == "no-controlnet":
        changes["checkpoints"] = {**ckpt, "controlnet": str(tmp_path / "gone" / "controlnet.pt")}
    elif changes.get("checkpoints") == "no-scale":
        raw = torch.load(ckpt["diffusion_unet"], weights_only=True)
        torch.save({"unet_state_dict": raw["state_dict"]}, tmp_path / "released_unet.pt")
        changes["checkpoints"] = {**ckpt, "diffusion_unet": str(tmp_path / "released_unet.pt")}
    return infer_config(**changes)


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

    monkeypatch.setattr(generation_pipeline, "generate_checked", explode)
    assert run_cli(infer_config()) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "simulated out of memory" in err and "runtime failure" in err


def test_bad_flags_exit_2():
    with pytest.raises(SystemExit) as info:
        infer.main(["--config", "x.json", "--num-samples", "0"])
    assert info.value.code == 2


def test_module_entry_point_runs_in_a_fresh_process(infer_config, tmp_path):
    config = infer_config()
    done = subprocess.run(
        [sys.executable, "-m", "maisi.infer", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "sample_seed0_image.nii.gz").is_file()


def last_line(caplog) -> str:
    return caplog.records[-1].getMessage()


def test_a_mask_without_a_checked_organ_is_not_checked_not_passed(
    infer_config, tmp_path, monkeypatch, caplog
):
    mask = phantom_mask()
    mask[mask == 1] = 23  # a lung tumour and the body: no organ the HU check knows
    mask[mask == 28] = 200
    path = write_volume(tmp_path / "tumour.nii.gz", Volume(mask, np.diag([2.0, 2.0, 3.0, 1.0])))
    monkeypatch.setattr(generation_plan, "generate", fake_generate(set()))
    region = {"top": "chest", "bottom": "chest"}
    assert run_cli(infer_config(mask=str(path), body_region=region, quality_check={"max_tries": 3})) == 0
    check = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())["quality_check"]
    assert check["passed"] is None and check["reason"].startswith("no checked organ (liver, spleen")
    assert len(check["tries"]) == 1 and check["tries"][0]["organs"] == {}  # another seed would not change it
    assert "seed 0: HU check not checked: no checked organ" in caplog.text
    out = tmp_path / "out"
    assert last_line(caplog) == (
        f"finished: 1 generated, 0 skipped; HU check: 0 passed, 0 FAILED, 1 not checked; output in {out}"
    )


def test_summary_line_counts_the_verdicts_and_strict_quality_makes_a_failure_exit_1(
    infer_config, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "out"
    monkeypatch.setattr(generation_plan, "generate", fake_generate({1}))
    config = infer_config(num_samples=2)  # one try per sample: seed 1 fails
    assert run_cli(config) == 0
    summary = "HU check: 1 passed, 1 FAILED (seeds 1), 0 not checked; output in"
    assert last_line(caplog) == f"finished: 2 generated, 0 skipped; {summary} {out}"
    assert caplog.records[-1].levelname == "WARNING"
    caplog.clear()
    # Skipped samples count with the verdict recorded in their metadata.
    assert run_cli(config, "--strict-quality") == 1
    strict = "; exit code 1: 1 sample(s) failed the HU check (strict quality)"
    assert last_line(caplog) == f"finished: 0 generated, 2 skipped; {summary} {out}{strict}"
    assert caplog.records[-1].levelname == "ERROR"
    caplog.clear()
    monkeypatch.setattr(generation_plan, "generate", fake_generate({2}))
    by_config = infer_config(seed=2, quality_check={"max_tries": 1, "fail_on_error": True})
    assert run_cli(by_config) == 1
    assert (out / "sample_seed2_image.nii.gz").is_file()  # the failed sample is still written
    assert json.loads((out / "sample_seed2.json").read_text())["quality_check"]["passed"] is False
    assert last_line(caplog).endswith(strict) and "1 generated, 0 skipped" in last_line(caplog)
    caplog.clear()
    assert run_cli(infer_config(seed=0, quality_check={"max_tries": 1, "fail_on_error": True})) == 0
    assert "0 FAILED" in last_line(caplog) and caplog.records[-1].levelname == "INFO"


def test_fail_on_error_is_in_the_schema_with_a_default_of_false(infer_config):
    from maisi.config import load_schema

    spec = load_schema("infer")["properties"]["quality_check"]["properties"]["fail_on_error"]
    assert spec["type"] == "boolean" and spec["default"] is False and "exit" in spec["description"]
    assert load_config(infer_config(), "infer").quality_check.fail_on_error is False


def image_only(infer_config, size: int):
    region = {"top": "chest", "bottom": "chest"}
    return infer_config(mask=None, output_size=[size] * 3, spacing=[1.0, 1.0, 1.0], body_region=region)


def test_a_grid_too_large_for_the_memory_is_refused_before_any_work(
    infer_config, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(generation_memory, "available_ram_bytes", lambda: 64 << 30)
    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: False)  # float32 intermediates
    config = image_only(infer_config, 2048)
    for flags in ((), ("--dry-run",)):
        assert run_cli(config, *flags) == 2
        err = capsys.readouterr().err
        assert "$.output_size: a 2048 x 2048 x 2048 grid needs at least 344.0 GiB of RAM" in err, err
        assert "but this machine has 64.0 GiB" in err
    assert not (tmp_path / "out").exists()


def test_memory_estimate_follows_its_formula_on_cpu_and_cuda(infer_config, tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: False)  # float32 on this CPU
    plan = generation_plan.plan_generation(load_config(infer_config(), "infer"))
    n, latent = 32 * 32 * 16, 4 * 8 * 8 * 4
    weights = sum(os.path.getsize(p) for p in tiny_checkpoints["tiny-rflow"].values())
    # host: mask (1 byte a voxel), image 10 N, tiled intermediates 8 channels x 4 bytes, bit-planes 32 N
    cpu = generation_memory.estimate_memory(plan, torch.device("cpu"))
    assert cpu == generation_memory.MemoryEstimate(n + 10 * n + 32 * n + 32 * n + 16 * latent + weights, 0)
    cuda = generation_memory.estimate_memory(
        plan, torch.device("cuda")
    )  # float16: intermediates 2 bytes a channel
    assert cuda == generation_memory.MemoryEstimate(n + 48 * n, weights + 16 * latent + 32 * n)


def test_a_grid_too_large_for_the_gpu_is_refused(infer_config, monkeypatch):
    plan = generation_plan.plan_generation(load_config(infer_config(), "infer"))
    gpu = SimpleNamespace(total_memory=1 << 20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    with pytest.raises(InputError, match=r"needs at least 0\.0 GiB of GPU memory .* but cuda has 0\.0 GiB"):
        generation_memory.check_memory(plan, torch.device("cuda"))
    assert (
        generation_memory.check_memory(plan, torch.device("cpu")).host_bytes < 10 << 20
    )  # 32 x 32 x 16 fits


def test_when_only_the_tiled_decoder_does_not_fit_the_refusal_says_so(infer_config, monkeypatch):
    plan = generation_plan.plan_generation(load_config(infer_config(), "infer"))
    tiled = generation_memory.estimate_memory(plan, torch.device("cpu")).host_bytes
    monkeypatch.setattr(generation_memory, "available_ram_bytes", lambda: tiled - 1)
    with pytest.raises(InputError, match="set \\$.decoding.method to 'sliding_window'"):
        generation_memory.check_memory(plan, torch.device("cpu"))
    # nothing fits: no such advice
    monkeypatch.setattr(generation_memory, "available_ram_bytes", lambda: 1000)
    with pytest.raises(InputError, match="; generate a smaller grid"):
        generation_memory.check_memory(plan, torch.device("cpu"))


@pytest.mark.parametrize("case", ["a file", "under a file", "not writable"])
def test_an_unusable_output_location_exits_2_before_the_networks_load(
    case, infer_config, tmp_path, monkeypatch, capsys
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the networks were loaded before the output location was checked")

    monkeypatch.setattr(generation_run, "load_models", no_loading)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    target, expected = {
        "a file": (blocker, "is a file, not a folder"),
        "under a file": (blocker / "sub" / "out", f"cannot be created: {blocker} is a file"),
        "not writable": (readonly / "out", f"cannot be created: {readonly} is not writable"),
    }[case]
    access = os.access  # tests may run as root, which may write anywhere: the check is what is tested
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != readonly and access(path, mode))
    config = infer_config(output={"dir": str(target)})
    for flags in ((), ("--dry-run",)):
        assert run_cli(config, *flags) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"maisi.infer: error: output directory {target}") and expected in err, err
    assert blocker.read_text() == "a file" and list(readonly.iterdir()) == []


def test_a_run_removes_the_temporaries_a_killed_run_left(infer_config, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(generation_plan, "generate", fake_generate(set()))
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".tmp-{dead_pid()}-sample_seed0_image.nii.gz"
    stale.write_bytes(b"half an image")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    live = out / f".tmp-{os.getpid()}-sample_seed7.json"  # its writer is alive: not ours to remove
    live.write_text("{")
    assert run_cli(infer_config()) == 0
    assert not stale.exists() and live.exists()
    assert f"removed {stale.name}, left by a run that was killed" in caplog.text


def test_a_second_run_into_a_folder_in_use_exits_2_naming_the_holder(
    held_lock,  # noqa: F811 - the fixture imported from tests.test_atomic
    infer_config,
    monkeypatch,
    capsys,
):
    folder, holder = held_lock
    monkeypatch.setattr(generation_plan, "generate", fake_generate(set()))
    assert run_cli(infer_config()) == 2
    err = capsys.readouterr().err
    assert f"output directory {folder} is in use by another run (pid {holder.pid}" in err, err
    assert [p.name for p in folder.iterdir()] == [".maisi.lock"]  # nothing written


def test_each_job_keeps_its_own_resolved_config(infer_config, tmp_path, monkeypatch):
    monkeypatch.setattr(generation_plan, "generate", fake_generate(set()))
    assert run_cli(infer_config()) == 0
    another_job = infer_config(seed=1, sampling={"num_inference_steps": 2})
    assert run_cli(another_job) == 0
    out = tmp_path / "out"
    for seed, steps in ((0, 3), (1, 2)):
        key = json.loads((out / f"sample_seed{seed}.json").read_text())["job_key"]
        resolved = json.loads((out / f"sample_job-{key[:12]}_config.json").read_text())
        assert resolved["sampling"]["num_inference_steps"] == steps and resolved["seed"] == seed
    assert len(list(out.glob("*_config.json"))) == 2


def _truncate_image(files):
    data = files["image"].read_bytes()
    files["image"].write_bytes(data[: len(data) // 2])


def _drop_checksums(files):
    meta = json.loads(files["metadata"].read_text())
    del meta["outputs_sha256"]
    files["metadata"].write_text(json.dumps(meta))


DAMAGE = {
    "truncated image": (
        _truncate_image,
        "sample_seed0_image.nii.gz does not match the SHA-256 recorded in sample_seed0.json",
    ),
    "missing preview": (lambda files: files["preview"].unlink(), "sample_seed0_preview.png is missing"),
    "older metadata": (_drop_checksums, "sample_seed0.json records no checksums of the sample's files"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_sample_whose_files_do_not_match_their_checksums_is_generated_again(
    damage, infer_config, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(generation_plan, "generate", fake_generate(set()))
    config = infer_config()
    assert run_cli(config) == 0
    files = generation_run.sample_files(load_config(config, "infer"), 0)
    original = read_volume(files["image"]).array
    harm, reason = DAMAGE[damage]
    harm(files)
    caplog.clear()
    assert run_cli(config) == 0
    assert f"seed 0: generating again: {reason}" in caplog.text
    assert "finished: 1 generated, 0 skipped" in last_line(caplog)
    assert np.array_equal(read_volume(files["image"]).array, original)
    meta = json.loads(files["metadata"].read_text())
    assert meta["outputs_sha256"] == {k: file_sha256(p) for k, p in files.items() if k != "metadata"}


@pytest.mark.parametrize(
    "flag, value, bounds",
    [
        ("--seed", str(2**64), "[0, 4294967295]"),
        ("--seed", "4294967296", "[0, 4294967295]"),
        ("--seed", "-1", "[0, 4294967295]"),
        ("--num-samples", "100001", "[1, 100000]"),
        ("--num-samples", "0", "[1, 100000]"),
    ],
)
def test_overrides_are_held_to_the_schema_bounds(flag, value, bounds, capsys):
    with pytest.raises(SystemExit) as info:
        infer.main(["--config", "x.json", f"{flag}={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value} is outside {bounds}, the bounds of $." in err, err


def test_overrides_at_the_schema_bounds_are_accepted():
    argv = ["--config", "x", "--seed", "4294967295", "--num-samples", "100000"]
    args = infer.build_parser().parse_args(argv)
    assert (args.seed, args.num_samples) == (4294967295, 100000)
