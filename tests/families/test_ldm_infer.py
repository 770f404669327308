"""``python -m maisi.infer`` with plain LDM presets (tiny-ldm-2d, tiny-ldm-3d) end to end on CPU: files and
their geometry, the fixed PNG mapping, metadata, reruns, strict loading of our checkpoints and of old
GenerativeModels state dicts, and the refusals (foreign keys, PNG of a volume, weights that do not fit)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from maisi.checkpoints import save_checkpoint
from maisi.errors import InputError
from maisi.families.checks import load_checked_config
from maisi.families.ldm import LDM_PARTS, build_ldm_networks, get_ldm_preset
from maisi.files import file_sha256
from maisi.generation.ldm_files import display_2d, to_uint8
from maisi.generation.pipeline import Pipeline
from maisi.infer import main
from tests.families.test_legacy_weights import randomised, to_old_layout

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
UNET_SCALE = 0.8  # stored in our UNet checkpoint


def _checkpoints(folder: Path, name: str) -> dict[str, dict[str, Path]]:
    """The same random networks of preset ``name`` as our checkpoints and as old GenerativeModels files."""
    torch.manual_seed(0)
    preset = get_ldm_preset(name)
    networks = [randomised(n) for n in build_ldm_networks(preset)]
    out: dict[str, dict[str, Path]] = {"ours": {}, "old": {}}
    folder.mkdir(parents=True, exist_ok=True)
    for part, net in zip(LDM_PARTS, networks):
        scale = UNET_SCALE if part == "diffusion_unet" else None
        out["ours"][part] = save_checkpoint(folder / f"{part}.pt", net, preset, part, scale_factor=scale)
        out["old"][part] = folder / f"{part}_old.pt"
        torch.save(to_old_layout(net), out["old"][part])
    return out


@pytest.fixture(scope="module")
def ldm_checkpoints(tmp_path_factory) -> dict[str, dict[str, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("ldm_weights")
    return {name: _checkpoints(root / name, name) for name in ("tiny-ldm-2d", "tiny-ldm-3d")}


def _config(folder: Path, preset: str, checkpoints: dict[str, Path], **changes) -> Path:
    data = {
        "preset": preset,
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "sampling": {"num_inference_steps": STEPS},
        "num_samples": 2,
        "seed": 3,
        "output": {"dir": str(folder / "out"), "prefix": "ldm"},
        "device": "cpu",
        "precision": "float32",
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # type: ignore[dict-item]
        else:
            data[key] = value
    path = folder / f"{preset}.json"
    path.write_text(json.dumps(data))
    return path


def _meta(folder: Path, seed: int) -> dict:
    return json.loads((folder / "out" / f"ldm_seed{seed}.json").read_text())


def test_png_mapping_is_fixed_not_per_image_max():
    decoded = np.array([-0.2, 0.0, 0.25, 0.5, 1.0, 1.7])
    assert to_uint8(decoded).tolist() == [0, 0, 64, 128, 255, 255]
    assert to_uint8(decoded * 0.5).tolist() == [0, 0, 32, 64, 128, 217]  # a darker image stays darker


def test_tiny_2d_writes_image_with_spacing_png_and_metadata(tmp_path, ldm_checkpoints, caplog):
    ckpt = ldm_checkpoints["tiny-ldm-2d"]["ours"]
    config = _config(tmp_path, "tiny-ldm-2d", ckpt, sampling={"timestep_spacing": "leading"})
    assert main(["--config", str(config)]) == 0
    out = tmp_path / "out"
    for seed in (3, 4):
        image = nib.load(out / f"ldm_seed{seed}_image.nii.gz")
        assert image.shape == (16, 16)
        assert np.allclose(image.affine[:2, :2], np.eye(2))  # 1 mm pixels, RAS (no flips)
        decoded = np.asarray(image.dataobj)
        assert decoded.dtype == np.float32
        png = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"ldm_seed{seed}_image.png")))
        assert png.dtype == np.uint8
        assert np.array_equal(png, display_2d(to_uint8(decoded)))  # the fixed mapping, displayed
        meta = _meta(tmp_path, seed)
        assert meta["preset"] == "tiny-ldm-2d" and meta["family"] == "ldm" and meta["seed"] == seed
        assert meta["sampler"] == {
            "scheduler": "ddim",
            "num_inference_steps": STEPS,
            "timestep_spacing": "leading",
            "timesteps": [750, 500, 250, 0],  # the seeds' leading spacing: (n - 1 - i) * (1000 // n)
            "prediction_type": "epsilon",
            "clip_sample": False,
        }
        assert meta["scale_factor"]["value"] == UNET_SCALE and meta["scale_factor"]["source"] == "checkpoint"
        assert meta["spacing_mm"] == [1.0, 1.0]
        assert meta["png_mapping"].startswith("decoded [0, 1] -> [0, 255]")
        for part in LDM_PARTS:
            record = meta["checkpoints"][part]
            assert record["format"] == "maisi-checkpoint" and record["sha256"] == file_sha256(ckpt[part])
        assert set(meta["outputs_sha256"]) == {"image", "png"}
        assert "mask" not in meta["config"] and "quality_check" not in meta["config"]
    first = nib.load(out / "ldm_seed3_image.nii.gz").get_fdata()
    assert not np.allclose(first, nib.load(out / "ldm_seed4_image.nii.gz").get_fdata())  # seeds differ

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.clear()
    assert main(["--config", str(config)]) == 0  # rerun: both samples are finished
    assert "seed 3: already done, skipped" in caplog.text and "0 generated, 2 skipped" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    (out / "ldm_seed4_image.png").unlink()  # an incomplete sample is made again, the same
    assert main(["--config", str(config)]) == 0
    assert "1 generated, 1 skipped" in caplog.text
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ldm_seed4_image.png"))),
        display_2d(to_uint8(nib.load(out / "ldm_seed4_image.nii.gz").get_fdata())),
    )


def test_old_generative_models_files_load_strictly_and_give_the_same_image(tmp_path, ldm_checkpoints):
    ours, old = ldm_checkpoints["tiny-ldm-2d"]["ours"], ldm_checkpoints["tiny-ldm-2d"]["old"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert main(["--config", str(_config(tmp_path / "a", "tiny-ldm-2d", ours, num_samples=1))]) == 0
    assert main(["--config", str(_config(tmp_path / "b", "tiny-ldm-2d", old, num_samples=1))]) == 0
    meta = _meta(tmp_path / "b", 3)
    assert {meta["checkpoints"][p]["format"] for p in LDM_PARTS} == {"generative-0.x"}
    preset = get_ldm_preset("tiny-ldm-2d")
    assert meta["scale_factor"] == {
        "value": preset.scale_factor,
        "source": "preset",
        "detail": preset.scale_factor_source,
    }
    assert meta["sampler"]["timestep_spacing"] == preset.timestep_spacing  # the preset's default
    # The same weights with the same scale factor (now from the config) give the same image.
    config = _config(tmp_path / "b", "tiny-ldm-2d", old, num_samples=1, sampling={"scale_factor": UNET_SCALE})
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "c")]) == 0
    meta = json.loads((tmp_path / "c" / "ldm_seed3.json").read_text())
    assert meta["scale_factor"] == {
        "value": UNET_SCALE,
        "source": "config",
        "detail": "$.sampling.scale_factor",
    }
    a = nib.load(tmp_path / "a" / "out" / "ldm_seed3_image.nii.gz").get_fdata()
    c = nib.load(tmp_path / "c" / "ldm_seed3_image.nii.gz").get_fdata()
    assert np.allclose(a, c, atol=1e-6)


def test_tiny_3d_writes_float_nifti_with_the_presets_spacing_in_ras(tmp_path, ldm_checkpoints):
    ckpt = ldm_checkpoints["tiny-ldm-3d"]["ours"]
    assert main(["--config", str(_config(tmp_path, "tiny-ldm-3d", ckpt, num_samples=1))]) == 0
    image = nib.load(tmp_path / "out" / "ldm_seed3_image.nii.gz")
    assert image.shape == (16, 16, 16) and image.get_data_dtype() == np.float32
    assert np.allclose(image.affine[:3, :3], np.diag([6.0, 6.0, 6.0]))  # 6 mm, RAS: not an identity affine
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert (tmp_path / "out" / "ldm_seed3_preview.png").is_file()
    meta = _meta(tmp_path, 3)
    assert meta["spacing_mm"] == [6.0, 6.0, 6.0] and meta["shape"] == [16, 16, 16]
    assert np.allclose(meta["affine_ras"], image.affine)


def test_2d_nrrd_keeps_the_pixel_spacing(tmp_path, ldm_checkpoints):
    ckpt = ldm_checkpoints["tiny-ldm-2d"]["ours"]
    output = {"format": "nrrd", "dir": str(tmp_path / "out"), "prefix": "ldm", "preview": False}
    assert main(["--config", str(_config(tmp_path, "tiny-ldm-2d", ckpt, num_samples=1, output=output))]) == 0
    image = sitk.ReadImage(str(tmp_path / "out" / "ldm_seed3_image.nrrd"))
    assert image.GetDimension() == 2 and image.GetSize() == (16, 16) and image.GetSpacing() == (1.0, 1.0)
    assert image.GetDirection() == (-1.0, 0.0, 0.0, -1.0)  # RAS axes, in ITK's LPS
    assert not (tmp_path / "out" / "ldm_seed3_image.png").exists()  # preview off: no PNG


def test_png_only_for_2d(tmp_path, ldm_checkpoints):
    ckpt2, ckpt3 = ldm_checkpoints["tiny-ldm-2d"]["ours"], ldm_checkpoints["tiny-ldm-3d"]["ours"]
    png = {"format": "png", "dir": str(tmp_path / "out"), "prefix": "ldm"}
    assert main(["--config", str(_config(tmp_path, "tiny-ldm-2d", ckpt2, num_samples=1, output=png))]) == 0
    assert sorted(
        p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith((".", "ldm_job"))
    ) == [
        "ldm_seed3.json",
        "ldm_seed3_image.png",
    ]
    (tmp_path / "3d").mkdir()
    config = _config(
        tmp_path / "3d", "tiny-ldm-3d", ckpt3, output={**png, "dir": str(tmp_path / "3d" / "out")}
    )
    assert main(["--config", str(config)]) == 2
    assert not (tmp_path / "3d" / "out").exists()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"mask": "label.nii.gz"}, "$.mask"),
        ({"masks": ["*.nii.gz"]}, "$.masks"),
        ({"body_region": {"top": "chest", "bottom": "abdomen"}}, "$.body_region"),
        ({"anatomy": {"anatomy_list": ["liver"]}}, "$.anatomy"),
        ({"spacing": [1.0, 1.0, 1.0]}, "$.spacing"),
        ({"modality": "mri_flair"}, "$.modality"),
        ({"output_size": [64, 64, 64]}, "$.output_size"),
        ({"quality_check": {"enabled": False}}, "$.quality_check"),
        ({"sampling": {"conditioning_scale": 1.0}}, "$.sampling.conditioning_scale"),
        ({"sampling": {"guidance_scale": 2.0}}, "$.sampling.guidance_scale"),
        ({"output": {"format": "png"}}, "$.output.format"),  # a 3D preset
        ({"prompts": ["small right pleural effusion"]}, "$.prompts"),  # no cross-attention
        ({"text_encoder": {"checkpoint": "encoder.pt"}}, "$.text_encoder"),
        ({"sampling": {"null_prompt": "training"}}, "$.sampling.null_prompt"),
    ],
)
def test_keys_an_ldm_preset_does_not_take_are_refused_by_name(
    tmp_path, ldm_checkpoints, capsys, changes, key
):
    config = _config(tmp_path, "tiny-ldm-3d", ldm_checkpoints["tiny-ldm-3d"]["ours"], **changes)
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{key}: " in err and err.count("\n  ") == 1  # one problem, named
    assert not (tmp_path / "out").exists()


def test_ldm_keys_are_refused_for_maisi_presets(tmp_path, capsys):
    data = {
        "preset": "tiny-rflow",
        "checkpoints": {"autoencoder": "a.pt", "diffusion_unet": "b.pt"},
        "output_size": [32, 32, 32],
        "spacing": [1.5, 1.5, 1.5],
        "sampling": {"timestep_spacing": "leading", "scale_factor": 0.5},
        "output": {"format": "png"},
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert main(["--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    for key in ("$.sampling.timestep_spacing: ", "$.sampling.scale_factor: ", "$.output.format: "):
        assert key in err
    assert "a key of the ldm family only" in err


def test_weights_that_do_not_fit_are_refused_naming_the_key(tmp_path, ldm_checkpoints, capsys):
    old = dict(ldm_checkpoints["tiny-ldm-2d"]["old"])
    state = torch.load(old["diffusion_unet"], weights_only=True)
    state["time_embed.9.weight"] = torch.zeros(2)
    old["diffusion_unet"] = tmp_path / "extra.pt"
    torch.save(state, old["diffusion_unet"])
    assert main(["--config", str(_config(tmp_path, "tiny-ldm-2d", old))]) == 2
    assert "'time_embed.9.weight'" in capsys.readouterr().err
    # Weights of another preset in our format name the preset.
    other = dict(
        ldm_checkpoints["tiny-ldm-2d"]["ours"],
        autoencoder=ldm_checkpoints["tiny-ldm-3d"]["ours"]["autoencoder"],
    )
    assert main(["--config", str(_config(tmp_path, "tiny-ldm-2d", other))]) == 2
    assert "made for preset 'tiny-ldm-3d'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_released_weights_say_how_to_download(tmp_path, capsys):
    missing = {"autoencoder": tmp_path / "model_autoencoder.pt", "diffusion_unet": tmp_path / "model.pt"}
    assert main(["--config", str(_config(tmp_path, "brats-2d-ldm", missing)), "--dry-run"]) == 2
    assert "python -m maisi.download --variant brats-2d" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["brats-2d-ldm", "brats-3d-ldm"])
def test_seed_presets_sample_ddim_50_with_leading_timesteps_by_default(tmp_path, name):
    data = {"preset": name, "checkpoints": {"autoencoder": "a.pt", "diffusion_unet": "b.pt"}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    config = load_checked_config(tmp_path / "c.json", "infer")
    assert (config.sampler, config.num_inference_steps) == ("ddim", 50)
    assert config.sampling.timestep_spacing is None and get_ldm_preset(name).timestep_spacing == "leading"
    shipped = load_checked_config(REPO / "configs" / f"inference_{name[:8].replace('-', '_')}.json", "infer")
    assert shipped.preset == name and shipped.sampling.timestep_spacing == "leading"
    assert shipped.checkpoints.diffusion_unet.endswith(f"models/seeds/{name[:8]}/model.pt")


def test_the_library_pipeline_refuses_an_ldm_preset_by_name(tmp_path, ldm_checkpoints):
    config = _config(tmp_path, "tiny-ldm-2d", ldm_checkpoints["tiny-ldm-2d"]["ours"])
    with pytest.raises(InputError, match=r"\$\.preset: 'tiny-ldm-2d' is a plain LDM preset"):
        Pipeline.from_config(config).check_inputs()


@pytest.mark.slow  # two processes start torch: about a minute on 2 busy cores
def test_two_process_torchrun_shares_the_seeds_and_a_rerun_skips_them(tmp_path, ldm_checkpoints):
    from tests.test_infer_batch import torchrun

    config = _config(tmp_path, "tiny-ldm-2d", ldm_checkpoints["tiny-ldm-2d"]["ours"], num_samples=3)
    done = torchrun(config)
    assert done.returncode == 0, done.stderr
    ranks = {seed: _meta(tmp_path, seed)["process"] for seed in (3, 4, 5)}
    assert ranks == {s: {"rank": r, "world_size": 2} for s, r in ((3, 0), (4, 1), (5, 0))}
    assert done.stderr.count("finished: 3 generated, 0 skipped, 0 failed") == 1  # one summary, rank 0
    again = torchrun(config)
    assert again.returncode == 0 and "finished: 0 generated, 3 skipped" in again.stderr


@pytest.mark.released
def test_released_brats_2d_weights_generate_a_slice(tmp_path):
    """Opt-in (-m released): MAISI_SEED_WEIGHTS=<--dest of python -m maisi.download --variant brats-2d>."""
    folder = os.environ.get("MAISI_SEED_WEIGHTS")
    if not folder:
        pytest.skip(
            "set MAISI_SEED_WEIGHTS to the folder python -m maisi.download --variant brats-2d wrote into"
        )
    files = {
        "autoencoder": Path(folder) / "brats-2d/model_autoencoder.pt",
        "diffusion_unet": Path(folder) / "brats-2d/model.pt",
    }
    if not all(p.is_file() for p in files.values()):
        pytest.skip(f"the brats-2d files are not in {folder}")
    config = _config(tmp_path, "brats-2d-ldm", files, num_samples=1, sampling={"num_inference_steps": 2})
    assert main(["--config", str(config)]) == 0
    meta = _meta(tmp_path, 3)
    assert meta["shape"] == [256, 256] and meta["sampler"]["timesteps"] == [500, 0]
    assert meta["scale_factor"]["source"] == "preset" and meta["scale_factor"]["value"] == 1.0


@pytest.mark.parametrize(
    ("preset", "sampling", "message"),
    [
        ("tiny-text-ldm-2d", {}, "$.prompts: required by preset 'tiny-text-ldm-2d'"),
        (
            "tiny-ldm-2d",
            {"scheduler": "rflow"},
            "$.sampling: sampler 'rflow' cannot sample a ddpm-trained UNet",
        ),
        (
            "tiny-ldm-2d",
            {"scheduler": "ddpm", "num_inference_steps": 50},
            "$.sampling: sampler 'ddpm' must run",
        ),
    ],
)
def test_what_an_ldm_preset_cannot_do_is_refused_before_any_work(tmp_path, capsys, preset, sampling, message):
    checkpoints = {"autoencoder": tmp_path / "a.pt", "diffusion_unet": tmp_path / "b.pt"}
    assert main(["--config", str(_config(tmp_path, preset, checkpoints, sampling=sampling))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_on_a_checkpoint_is_refused_by_the_guard_before_any_work(tmp_path, ldm_checkpoints, capsys):
    ckpt = dict(ldm_checkpoints["tiny-ldm-2d"]["ours"])
    out = tmp_path / "out"
    out.mkdir()
    ckpt["autoencoder"] = out / "ldm_seed3_image.png"  # where sample 3 would write its PNG
    ckpt["autoencoder"].write_bytes(ldm_checkpoints["tiny-ldm-2d"]["ours"]["autoencoder"].read_bytes())
    before = ckpt["autoencoder"].read_bytes()
    assert main(["--config", str(_config(tmp_path, "tiny-ldm-2d", ckpt))]) == 2
    err = capsys.readouterr().err
    assert "the png of sample 3" in err and "would overwrite $.checkpoints.autoencoder" in err
    assert ckpt["autoencoder"].read_bytes() == before and sorted(p.name for p in out.iterdir()) == [
        "ldm_seed3_image.png"
    ]
