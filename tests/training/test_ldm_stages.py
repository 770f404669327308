"""``maisi.train autoencoder|diffusion`` with plain-LDM presets on a tiny synthetic Decathlon dataset.

The model-zoo CI pattern (``ci/unit_tests/test_brats_mri_generative_diffusion.py``): a fake BraTS-style
``dataset.json`` with random 4-channel volumes, a few steps of each stage.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from maisi.checkpoints import read_weights
from maisi.families.ldm import get_ldm_preset
from maisi.families.ldm_models import load_ldm_network
from maisi.train import main
from maisi.training.ldm_data import CropDraw, ImageSteps, LDMVolumes, check_ldm_images, read_ldm_dataset
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[2]
CHANNELS = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: one thread is faster, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> Path:
    """3 cases of 4-channel 24^3 volumes at 1 mm (channel c: a blob of brightness c + 1), BraTS layout."""
    root = tmp_path_factory.mktemp("Task01_BrainTumour")
    (root / "imagesTr").mkdir()
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"))
    training = []
    for case in range(3):
        centre = rng.uniform(8, 16, size=3)[:, None, None, None]
        blob = np.exp(-((grid - centre) ** 2).sum(0) / 30.0)
        data = np.stack([(c + 1) * blob + 0.05 * rng.standard_normal(blob.shape) for c in range(4)], -1)
        name = f"BRATS_{case:03d}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), root / "imagesTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    dataset = {
        "name": "BRATS",
        "modality": CHANNELS,
        "labels": {"0": "background", "1": "edema"},
        "numTraining": 3,
        "training": training,
        "test": ["./imagesTs/BRATS_999.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root / "dataset.json"


def config(tmp_path: Path, brats: Path, preset: str, out: str, name: str = "train.json", **changes) -> Path:
    data = {
        "preset": preset,
        "datalist": str(brats),
        "output_dir": str(tmp_path / out),
        "device": "cpu",
        "steps": 2,
        "batch_size": 2,
        "checkpoint_every": 1,
        "validate_every": 2,
        "tensorboard": False,
        "autoencoder": {"adversarial_weight": 0.0},
        "diffusion": {"scale_factor_batches": 2},
        "ldm": {"channel": "FLAIR", "resample": False, "num_validation": 1},
        **changes,
    }
    return write_config(tmp_path / name, data)


@pytest.mark.parametrize("preset", ["tiny-ldm-2d", "tiny-ldm-3d"])
def test_both_stages_train_resume_and_keep_the_scale_factor(tmp_path, brats, preset, caplog):
    """Autoencoder (with the PatchGAN on 24-voxel crops), then diffusion on its latents; resume continues
    to the new step count; the scale factor saved is the estimate and survives the checkpoint round trip."""
    patch = [24, 24] if preset.endswith("2d") else [24, 24, 24]
    ae = dict(
        tmp_path=tmp_path,
        brats=brats,
        preset=preset,
        out="ae",
        name="ae.json",
        autoencoder={"adversarial_weight": 0.1},
        ldm={"channel": "flair", "resample": False, "num_validation": 1, "autoencoder_patch": patch},
        tensorboard=True,
        log_every=1,
    )
    assert main(["autoencoder", "--config", str(config(**ae))]) == 0
    ae_path = tmp_path / "ae" / "autoencoder.pt"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "ae" / "tensorboard"))
    events.Reload()
    assert {"val/input", "val/reconstruction"} <= set(events.Tags()["images"])
    assert {"val/psnr", "val/ssim", "train/recon", "train/kl", "train/discriminator"} <= set(
        events.Tags()["scalars"]
    )
    network, weights = load_ldm_network(get_ldm_preset(preset), "autoencoder", ae_path)
    assert weights.format == "maisi-checkpoint" and read_weights(ae_path, "autoencoder").preset == preset
    assert torch.load(ae_path, weights_only=True)["family"] == "ldm"
    ae_state = tmp_path / "ae" / "state" / "last.pt"
    assert "discriminator" in torch.load(ae_state, weights_only=True)["stage_state"]
    assert main(["autoencoder", "--config", str(config(**ae, steps=3)), "--resume"]) == 0
    assert torch.load(ae_state, weights_only=True)["step"] == 3

    unet = config(tmp_path, brats, preset, "unet", "unet.json", init={"autoencoder": str(ae_path)})
    caplog.set_level("INFO")
    assert main(["diffusion", "--config", str(unet)]) == 0
    first = read_weights(tmp_path / "unet" / "diffusion_unet.pt", "diffusion_unet")
    assert first.scale_factor is not None and first.scale_factor > 0
    assert "1/std of" in first.scale_factor_source and "2 batches of 2" in first.scale_factor_source
    assert first.prediction_type == "epsilon"
    assert f"scale_factor = {first.scale_factor:.5f}" in caplog.text

    longer = config(tmp_path, brats, preset, "unet", "unet.json", init={"autoencoder": str(ae_path)}, steps=3)
    assert main(["diffusion", "--config", str(longer), "--resume"]) == 0
    resumed = read_weights(tmp_path / "unet" / "diffusion_unet.pt", "diffusion_unet")
    assert resumed.scale_factor == first.scale_factor  # from the state, not re-estimated
    assert resumed.scale_factor_source == first.scale_factor_source
    assert any(not torch.equal(resumed.state_dict[k], first.state_dict[k]) for k in first.state_dict)
    state = torch.load(tmp_path / "unet" / "state" / "last.pt", weights_only=True)
    assert state["step"] == 3

    # finetuning from the trained UNet keeps its scale factor
    again = config(
        tmp_path,
        brats,
        preset,
        "again",
        "again.json",
        init={"autoencoder": str(ae_path), "diffusion_unet": str(tmp_path / "unet" / "diffusion_unet.pt")},
        steps=1,
    )
    assert main(["diffusion", "--config", str(again)]) == 0
    assert read_weights(tmp_path / "again" / "diffusion_unet.pt", "diffusion_unet").scale_factor == (
        first.scale_factor
    )


def test_the_channel_is_chosen_by_name(tmp_path, brats, capsys):
    """A wrong channel name exits 2 naming every channel, and writes nothing; a right one trains on it."""
    bad = config(tmp_path, brats, "tiny-ldm-2d", "bad", ldm={"channel": "DWI"})
    assert main(["autoencoder", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "$.ldm.channel: 'DWI'" in err
    for name in CHANNELS.values():
        assert f"'{name}'" in err
    assert not (tmp_path / "bad").exists()

    none = config(tmp_path, brats, "tiny-ldm-2d", "none", ldm={"channel": None})
    assert main(["autoencoder", "--config", str(none)]) == 2
    assert "choose one by name" in capsys.readouterr().err


def test_ldm_refusals(tmp_path, brats, capsys):
    """controlnet with an LDM preset, a 3D patch that is not a multiple of the factor, a 2D patch with 3
    values, the diffusion stage without an autoencoder, a text preset, a run folder holding the dataset's
    images: exit 2, each named, nothing written."""
    cases = [
        ("controlnet", {}, "the controlnet stage"),
        (
            "autoencoder",
            {"preset": "tiny-ldm-3d", "ldm": {"autoencoder_patch": [24, 24, 25]}},
            "[24, 24, 25]",
        ),
        ("autoencoder", {"ldm": {"autoencoder_patch": [24, 24, 24]}}, "is 2D and trains on (x, y)"),
        ("diffusion", {}, "$.init.autoencoder"),
        ("autoencoder", {"preset": "tiny-text-ldm-2d"}, "text-conditioned"),
        # the run folder may hold no input: the dataset's images are inputs too
        ("autoencoder", {"output_dir": str(brats.parent / "imagesTr")}, "BRATS_000.nii.gz"),
    ]
    for i, (stage, changes, expected) in enumerate(cases):
        path = config(
            tmp_path, brats, changes.pop("preset", "tiny-ldm-2d"), f"out{i}", f"c{i}.json", **changes
        )
        assert main([stage, "--config", str(path)]) == 2, stage
        assert expected in capsys.readouterr().err
        assert not (tmp_path / f"out{i}").exists()


def test_the_named_channel_is_read_scaled_and_cropped_by_generator(brats):
    """``T1w`` is channel 1 of every volume, scaled by its 0-100 percentiles to [0, 1]; a step's crops are a
    function of its generator: (N, 1, x, y) slices of one image for 2D presets, (N, 1, x, y, z) for 3D."""
    dataset = read_ldm_dataset(brats, None, "t1W")
    assert (dataset.channel, dataset.channel_name) == (1, "T1w")
    steps = ImageSteps(2, dataset.channel, None, None, (0.0, 100.0))
    items, problems = check_ldm_images(dataset.entries, dataset.root, "training")
    assert problems == []
    volumes = LDMVolumes(items, steps, (16, 16, 1), cache_rate=1.0)
    raw = nib.load(brats.parent / "imagesTr" / "BRATS_000.nii.gz").get_fdata()[..., 1]
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    assert torch.allclose(volumes[0][0], torch.as_tensor(expected, dtype=torch.float32), atol=1e-5)

    draw = CropDraw(volumes, 5, (16, 12), flip_prob=0.5)
    batch = draw(torch.Generator().manual_seed(3))
    assert batch.shape == (5, 1, 16, 12)
    assert torch.equal(batch, draw(torch.Generator().manual_seed(3)))
    assert not torch.equal(batch, draw(torch.Generator().manual_seed(4)))
    assert CropDraw(volumes, 3, (8, 12, 4))(torch.Generator().manual_seed(3)).shape == (3, 1, 8, 12, 4)


def test_two_process_torchrun_all_reduces_the_scale_factor(tmp_path, brats):
    """Under torchrun each process encodes its own batches; the sums are all-reduced, so both processes train
    with one factor, which the checkpoint records as coming from 2 processes."""
    ae = config(tmp_path, brats, "tiny-ldm-3d", "ae", "ae.json", steps=1)
    assert main(["autoencoder", "--config", str(ae)]) == 0
    unet = config(
        tmp_path,
        brats,
        "tiny-ldm-3d",
        "unet",
        "unet.json",
        init={"autoencoder": str(tmp_path / "ae" / "autoencoder.pt")},
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547"]
    done = subprocess.run(
        [*cmd, "-m", "maisi.train", "diffusion", "--config", str(unet), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # non-greedy: the two processes' log lines may reach stderr joined on one line
    logged = re.findall(r"scale_factor = ([0-9.]+) \(([^()]*)\)", done.stderr)
    assert len(logged) == 2 and logged[0] == logged[1], done.stderr[-2000:]
    weights = read_weights(tmp_path / "unet" / "diffusion_unet.pt", "diffusion_unet")
    assert f"{weights.scale_factor:.5f}" == logged[0][0]
    assert "x 2 processes" in weights.scale_factor_source
