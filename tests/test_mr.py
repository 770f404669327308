"""MR (MAISI v2 rflow-mr / rflow-mr-brain): released layouts load strictly, MR grid limits, MR intensities in
encode / autoencoder training / evaluate, MR output mapping and the "not checked" HU check, mask refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import ScaleIntensityRangePercentiles

from maisi import encode, evaluate, infer
from maisi.checkpoints import load_network, read_weights
from maisi.data.io import Volume, read_volume, write_volume
from maisi.data.latents import read_latent, read_sidecar
from maisi.errors import CheckpointError, InputError
from maisi.families.ct import MRGridLimits, get_preset, grid_problems
from maisi.families.networks import build_network
from maisi.generation.plan import fitting_size
from maisi.intensity import (
    is_mr,
    mr_to_unit,
    to_unit,
    unit_to_mr,
    unit_to_mr_source,
)
from maisi.training.ct_data import LoadUnitCTd, check_images
from maisi.vae.codec import encode as vae_encode
from tests.conftest import mr_infer_config, mr_like, write_config

TINY_MR = "tiny-mr-rflow"
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


# ------------------------------------------------------------------------------------ released layouts


def test_released_mr_layouts_load_strictly(tmp_path):
    """NV-Generate-CTMR saves the UNet as {epoch, loss, num_train_timesteps, scale_factor, unet_state_dict}
    (scripts/diff_model_train.py) and its loaders also accept a VAE wrapped in 'unet_state_dict'."""
    preset = get_preset(TINY_MR)
    torch.manual_seed(1)
    vae, unet = build_network(preset, "autoencoder"), build_network(preset, "diffusion_unet")
    files = {
        "plain_vae": vae.state_dict(),
        "wrapped_vae": {"unet_state_dict": vae.state_dict()},
        "unet": {
            "epoch": 1000,
            "loss": 0.0123,
            "num_train_timesteps": 1000,
            "scale_factor": torch.tensor(1.2345),
            "unet_state_dict": unet.state_dict(),
        },
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    for name in ("plain_vae", "wrapped_vae"):
        loaded, weights = load_network(preset, "autoencoder", tmp_path / f"{name}.pt")
        assert weights.source_format == "released-vae"
        for key, value in vae.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    loaded, weights = load_network(preset, "diffusion_unet", tmp_path / "unet.pt")
    assert weights.source_format == "released-unet" and weights.scale_factor == pytest.approx(1.2345)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in unet.state_dict().items())
    # a real UNet file is not taken for a wrapped VAE
    with pytest.raises(CheckpointError, match="holds a released MAISI diffusion_unet checkpoint"):
        read_weights(tmp_path / "unet.pt", "autoencoder")
    # the CT rflow VAE of the same size is refused by name and shape, not loaded loosely
    with pytest.raises(CheckpointError, match="do not fit the autoencoder"):
        load_network(get_preset("small-rflow"), "autoencoder", tmp_path / "wrapped_vae.pt")


# ------------------------------------------------------------------------------------ grid limits


@pytest.mark.parametrize(
    "size, spacing, says",
    [
        ((128, 256, 256), (1.25, 1.0, 1.0), None),  # rflow-mr's default (sagittal T1 brain FOV 160x256x256)
        ((256, 256, 128), (0.94, 0.94, 1.36), None),  # rflow-mr-brain's default
        ((512, 512, 128), (0.4, 0.4, 5.0), None),
        ((256, 128, 256), (1.0, 1.0, 1.0), None),
        ((128, 128, 128), (1.0, 1.0, 1.0), None),
        ((256, 256, 384), (1.0, 1.0, 1.0), "size z 384 is not one of [128, 256]"),
        ((128, 256, 128), (1.0, 1.0, 1.0), "with size z 128, sizes x and y must be equal"),
        ((256, 384, 128), (1.0, 1.0, 1.0), "at least two of the sizes [256, 384, 128] must be equal"),
        ((512, 512, 256), (1.0, 1.0, 1.0), "with size z 256 the size must be one of"),
        ((128, 256, 256), (0.3, 1.0, 5.5), "spacing 0.3, 5.5 mm is outside [0.4, 5] mm"),
    ],
)
def test_mr_grid_limits_are_check_input_mr(size, spacing, says):
    for name in ("maisi-mr-rflow", "maisi-mr-brain-rflow"):
        preset = get_preset(name)
        problems = grid_problems(preset, size, spacing, enforce_limits=True)
        if says is None:
            assert problems == []
        else:
            assert any(says in p for p in problems), problems
            assert all(f"preset '{name}' limits" in p for p in problems)
        assert grid_problems(preset, size, spacing, enforce_limits=False) == []  # relaxed: multiples only


def test_mr_limits_differ_from_ct_and_have_a_maximum_volume():
    assert grid_problems(get_preset("maisi-ct-rflow"), (128, 256, 256), (1.25, 1.0, 1.0), True)  # x != y
    small = MRGridLimits(max_size=(256, 256, 128))
    assert (
        "more voxels than the maximum volume 256x256x128" in small.violations((512, 512, 128), (1, 1, 1))[0]
    )
    assert max(np.prod(s) for s in small.shapes()) == 256 * 256 * 256 // 2  # 384/512 and 256^3 are gone
    assert fitting_size(get_preset("maisi-mr-rflow"), (100, 200, 200), True) == (128, 256, 256)
    assert fitting_size(get_preset("maisi-mr-rflow"), (600, 600, 100), True) is None


# ------------------------------------------------------------------------------------ intensities


def test_mr_encode_intensity_round_trip():
    """0-99.5 percentiles -> [0, 1], not clipped (MONAI's ScaleIntensityRangePercentiles as MAISI uses it),
    and back to the source intensities with the recorded window."""
    image = mr_like()
    unit, window = mr_to_unit(image)
    assert window.low == pytest.approx(float(np.percentile(image, 0)), rel=1e-5)
    assert window.high == pytest.approx(float(np.percentile(image, 99.5)), rel=1e-4)
    maisi_way = ScaleIntensityRangePercentiles(lower=0, upper=99.5, b_min=0.0, b_max=1.0, clip=False)
    np.testing.assert_allclose(unit, np.asarray(maisi_way(torch.from_numpy(image))), atol=1e-6)
    assert unit.min() == pytest.approx(0.0, abs=1e-6)
    assert 0 < (unit > 1.0).sum() == (image > window.high).sum()  # the bright tail is kept, not clipped
    np.testing.assert_allclose(unit_to_mr_source(unit, window), image, rtol=1e-5, atol=1e-3)
    record = to_unit(image, "mri_t2")[1]
    assert record["kind"] == "mr_percentile" and record["window"] == [window.low, window.high]
    assert record["clipped"] is False and record["percentiles"] == [0.0, 99.5]
    ct_unit, ct_record = to_unit(np.array([-2000.0, 0.0, 3000.0]), "ct")
    assert ct_unit.tolist() == [0.0, 0.5, 1.0] and ct_record["hu_window"] == [-1000.0, 1000.0]
    with pytest.raises(InputError, match="case7.nii.gz: its 0 and 99.5 percentiles are equal"):
        mr_to_unit(np.full((4, 4, 4), 7.0), where="case7.nii.gz")


def test_mr_codes_and_output_mapping():
    assert [
        is_mr(m) for m in ("ct", "ct_contrast", "unknown", "mri", "mri_t1", "mri_swi_skull_stripped")
    ] == [
        False,
        False,
        False,
        True,
        True,
        True,
    ]
    assert is_mr(8) and not is_mr(7)
    out = unit_to_mr(np.array([-0.2, 0.0, 0.5, 1.0, 1.75, 40.0]))
    assert out.dtype == np.int16 and out.tolist() == [0, 0, 500, 1000, 1750, 32767]  # no upper clip at 1000


# ------------------------------------------------------------------------------------ encode, train data


def _mr_cases(root: Path) -> Path:
    """Two MR cases (the entry of case0 says mri_t1, case1 has no modality) and their datalist."""
    entries = []
    for i in range(2):
        rel = f"case{i}/t1.nii.gz"
        write_volume(root / rel, Volume(mr_like(i), AFFINE))
        entries.append({"image": rel, **({"modality": "mri_t1"} if i == 0 else {}), "fold": i})
    return write_config(root / "datalist.json", {"training": entries})


def test_encode_scales_mr_cases_by_their_percentiles(tiny_mr_checkpoints, tmp_path):
    datalist = _mr_cases(tmp_path / "data")
    config = write_config(
        tmp_path / "encode.json",
        {
            "preset": TINY_MR,
            "autoencoder": str(tiny_mr_checkpoints["autoencoder"]),
            "datalist": str(datalist),
            "output_dir": str(tmp_path / "emb"),
            "tiling": {"method": "full"},
            "modality": "mri_t2",  # the default of case1, whose entry has none
            "device": "cpu",
        },
    )
    assert encode.main(["--config", str(config)]) == 0
    vae, _ = load_network(get_preset(TINY_MR), "autoencoder", tiny_mr_checkpoints["autoencoder"])
    for i, modality in enumerate(("mri_t1", "mri_t2")):
        side = read_sidecar(tmp_path / "emb" / f"case{i}" / "t1_emb.nii.gz")
        image = mr_like(i)
        unit, window = mr_to_unit(image)
        assert side["modality"] == modality and side["intensity"]["kind"] == "mr_percentile"
        assert side["intensity"]["window"] == pytest.approx([window.low, window.high])
        assert side["fingerprint"]["intensity"] == "mr_percentile"
        latent, _ = read_latent(tmp_path / "emb" / f"case{i}" / "t1_emb.nii.gz")
        with torch.no_grad():
            expected = vae_encode(vae, torch.from_numpy(unit)[None, None], method="full")[0]
        np.testing.assert_allclose(latent, expected.numpy(), atol=1e-4)


def test_autoencoder_training_data_scales_mr_entries(tmp_path):
    datalist = json.loads(_mr_cases(tmp_path).read_text())
    items, problems = check_images(list(enumerate(datalist["training"])), tmp_path, "training")
    assert problems == [] and [it["modality"] for it in items] == ["mri_t1", "ct"]  # no entry modality: CT
    mr = LoadUnitCTd(None)(items[0])["image"]
    np.testing.assert_allclose(mr[0].numpy(), mr_to_unit(mr_like(0))[0], atol=1e-6)
    assert float(mr.max()) > 1.0  # not clipped
    ct = LoadUnitCTd(None)(items[1])["image"]
    assert float(ct.min()) >= 0.5 and float(ct.max()) == 1.0  # the same file read as HU: clipped at 1000


def test_evaluate_uses_each_volumes_modality(tiny_mr_checkpoints, tmp_path):
    datalist = _mr_cases(tmp_path / "data")
    synthetic = write_volume(
        tmp_path / "syn" / "s_image.nii.gz", Volume(unit_to_mr(mr_to_unit(mr_like(5))[0]), AFFINE)
    )
    config = write_config(
        tmp_path / "evaluate.json",
        {
            "real_datalist": str(datalist),
            "synthetic": [str(synthetic)],
            "reconstruction": {
                "enabled": True,
                "preset": TINY_MR,
                "autoencoder": str(tiny_mr_checkpoints["autoencoder"]),
                "memory_budget_mb": 16,
            },
            "diversity": {"enabled": False},
            "ssim": {"kernel_size": 3},
            "modality": "mri_flair",
            "output": {"report": "out/report.json", "montage": "out/montage.png"},
            "device": "cpu",
        },
    )
    assert evaluate.main(["--config", str(config), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    data = tmp_path / "data"
    assert report["modalities"] == {
        str(data / "case0/t1.nii.gz"): "mri_t1",
        str(data / "case1/t1.nii.gz"): "mri_flair",
        str(synthetic): "mri_flair",
    }
    cases = report["reconstruction"]["cases"]
    assert [c["modality"] for c in cases] == ["mri_t1", "mri_flair"]
    assert all(np.isfinite(c["psnr"]) for c in cases)


# ------------------------------------------------------------------------------------ generation


def test_generated_mr_is_mapped_as_maisi_and_not_hu_checked(tiny_mr_checkpoints, tmp_path, caplog):
    assert infer.main(["--config", str(mr_infer_config(tmp_path, tiny_mr_checkpoints))]) == 0
    image = read_volume(tmp_path / "out" / "sample_seed0_image.nii.gz")
    assert image.array.dtype == np.int16 and image.array.min() >= 0 and image.shape == (32, 32, 16)
    meta = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())
    assert meta["intensity"]["kind"] == "mr" and meta["intensity"]["unit_to"] == [0.0, 1000.0]
    # the range is recorded and logged in MR units, never called HU
    assert meta["mr_units_min_max"] == [int(image.array.min()), int(image.array.max())]
    assert "hu_min_max" not in meta
    assert f"(MR units {meta['mr_units_min_max']};" in caplog.text and "(HU [" not in caplog.text
    quality = meta["quality_check"]
    assert quality["passed"] is None and quality["reason"].startswith("MR output (modality 'mri_t1')")
    assert "1 not checked" in caplog.text


def test_mask_on_an_mr_preset_is_refused_before_any_work(tiny_mr_checkpoints, mask_file, tmp_path, capsys):
    with_controlnet = {
        **tiny_mr_checkpoints,
        "controlnet": tiny_mr_checkpoints["autoencoder"],
    }  # any file: never read
    config = mr_infer_config(tmp_path, with_controlnet, mask=str(mask_file), output_size=None, spacing=None)
    assert infer.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"$.mask: preset '{TINY_MR}' has no ControlNet (MAISI released none for MR)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
