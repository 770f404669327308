"""Shared fixtures: tiny random-weight checkpoints and small synthetic label masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi.checkpoints import save_checkpoint
from maisi.data.io import Volume, write_volume
from maisi.families.ct import get_preset
from maisi.families.networks import build_network

REPO = Path(__file__).resolve().parents[1]
TINY_PRESETS = ("tiny-rflow", "tiny-ddpm")


def seeded_checkpoints(folder: Path, name: str) -> dict[str, Path]:
    """{part: path} of every part of preset ``name``: random weights drawn after ``torch.manual_seed(0)``,
    in our checkpoint format (the UNet's scale_factor 1.0)."""
    preset = get_preset(name)
    torch.manual_seed(0)
    return {
        part: save_checkpoint(
            folder / f"{part}.pt",
            build_network(preset, part),
            preset,
            part,
            scale_factor=1.0 if part == "diffusion_unet" else None,
        )
        for part in preset.parts
    }


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{preset: {part: path}} of seeded random-weight checkpoints in our format (scale_factor 1.0)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: seeded_checkpoints(root / name, name) for name in TINY_PRESETS}


@pytest.fixture(scope="session")
def tiny_mr_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{part: path} of seeded random-weight tiny-mr-rflow checkpoints: no ControlNet part (MR is
    image-only)."""
    return seeded_checkpoints(tmp_path_factory.mktemp("mr-checkpoints"), "tiny-mr-rflow")


def mr_infer_config(folder: Path, checkpoints: dict[str, Path], **changes) -> Path:
    """``folder / "infer.json"``: one 32 x 32 x 16 mri_t1 sample of tiny-mr-rflow (2 steps, CPU) into
    ``folder / "out"``, with ``changes`` applied at the top level."""
    data = {
        "preset": "tiny-mr-rflow",
        "checkpoints": {part: str(p) for part, p in checkpoints.items()},
        "output_size": [32, 32, 16],
        "spacing": [1.25, 1.0, 1.0],
        "modality": "mri_t1",
        "sampling": {"num_inference_steps": 2},
        "output": {"dir": str(folder / "out")},
        "device": "cpu",
        **changes,
    }
    return write_config(folder / "infer.json", data)


def mr_like(seed: int = 0, shape=(32, 32, 16)) -> np.ndarray:
    """Positive intensities with a long bright tail, like an MR volume (arbitrary units)."""
    rng = np.random.default_rng(seed)
    return (rng.gamma(2.0, 150.0, size=shape) + 20.0).astype(np.float32)


def phantom_mask(shape=(32, 32, 16)) -> np.ndarray:
    """A box of body (200) holding a liver (1) block and a lung-lobe (28) block; air (0) around it."""
    mask = np.zeros(shape, dtype=np.uint8)
    x, y, z = shape
    mask[2 : x - 2, 2 : y - 2, 1 : z - 1] = 200
    mask[4 : x // 2, 4 : y // 2, 2 : z // 2] = 1
    mask[x // 2 : x - 4, y // 2 : y - 4, z // 2 : z - 2] = 28
    return mask


@pytest.fixture
def mask_file(tmp_path) -> Path:
    """A phantom mask NIfTI at 2 x 2 x 3 mm with a non-trivial origin."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-30.0, 12.5, 100.0]
    return write_volume(tmp_path / "inputs" / "mask.nii.gz", Volume(phantom_mask(), affine))


def write_config(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


@pytest.fixture
def infer_config(tmp_path, tiny_checkpoints, mask_file):
    """Factory: a mask-mode infer config for a tiny preset, with top-level keys replaced by ``changes``."""

    def make(preset: str = "tiny-rflow", **changes) -> Path:
        ckpt = tiny_checkpoints.get(preset, tiny_checkpoints["tiny-rflow"])  # others fail before loading
        data = {
            "preset": preset,
            "checkpoints": {part: str(p) for part, p in ckpt.items()},
            "mask": str(mask_file),
            "sampling": {"num_inference_steps": 3},
            "output": {"dir": str(tmp_path / "out")},
            "quality_check": {"max_tries": 1},  # random weights fail it; retries are tested on their own
            "device": "cpu",
        }
        data.update(changes)
        return write_config(tmp_path / "config.json", {k: v for k, v in data.items() if v != "<drop>"})

    return make


DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def real_cases(tmp_path_factory) -> Path:
    """A KiTS-style folder of 3 real-CT cases (TotalSegmentator example, labels remapped to MAISI ids)."""
    from maisi.data.io import read_mask, read_volume
    from maisi.labels import load_label_dict
    from maisi.labels.mapping import load_mapping, remap

    root = tmp_path_factory.mktemp("cases")
    ct = read_volume(DATA / "totalseg_example_ct_sm.nii.gz")
    seg = read_mask(DATA / "totalseg_example_seg.nii.gz")
    maisi_ids, _ = remap(seg.array, load_mapping("totalsegmentator", load_label_dict()))
    for i in range(3):
        write_volume(root / f"case{i}" / "imaging.nii.gz", ct)
        write_volume(root / f"case{i}" / "segmentation.nii.gz", seg.with_array(maisi_ids))
    return root


@pytest.fixture(scope="session")
def encoded_cases(real_cases, tiny_checkpoints, tmp_path_factory) -> Path:
    """The real cases encoded with the tiny-rflow VAE: returns the latent datalist (folds 0, 1, 2)."""
    from maisi.data.datalist import build_datalist, write_datalist
    from maisi.encode import main as encode_main
    from maisi.labels import load_label_dict

    folder = tmp_path_factory.mktemp("encoded")
    datalist = folder / "ct_datalist.json"
    write_datalist(
        datalist,
        build_datalist(
            real_cases, "*/imaging.nii.gz", "*/segmentation.nii.gz", datalist, load_label_dict(), num_folds=3
        ),
    )
    config = write_config(
        folder / "encode.json",
        {
            "preset": "tiny-rflow",
            "autoencoder": str(tiny_checkpoints["tiny-rflow"]["autoencoder"]),
            "datalist": str(datalist),
            "output_dir": str(folder / "emb"),
            "tiling": {"method": "full"},
            "device": "cpu",
        },
    )
    assert encode_main(["--config", str(config)]) == 0
    return folder / "emb" / "datalist.json"


@pytest.fixture(scope="session")
def active_unet(tmp_path_factory) -> Path:
    """A tiny-rflow UNet checkpoint whose zero-initialised layers are filled in, as after training.

    A fresh MONAI UNet outputs exactly 0 (its output convolution starts at zero), so nothing upstream of
    it, a ControlNet included, would receive a gradient.
    """
    preset = get_preset("tiny-rflow")
    torch.manual_seed(1)
    unet = build_network(preset, "diffusion_unet")
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return save_checkpoint(
        tmp_path_factory.mktemp("active") / "unet.pt", unet, preset, "diffusion_unet", scale_factor=1.0
    )
