"""``maisi.infer`` writes the preview of an MR sample in the MR window (its own 0.5-99.5 percentiles), not in
the CT (HU) windows that would show it white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from maisi import infer
from maisi.checkpoints import save_checkpoint
from maisi.data.io import read_volume
from maisi.networks import build_network, get_preset
from maisi.preview import PREVIEW_WINDOWS, preview_picture
from tests.conftest import write_config

TINY_MR = "tiny-mr-rflow"


def _checkpoints(root: Path) -> dict[str, str]:
    preset = get_preset(TINY_MR)
    torch.manual_seed(0)
    return {
        part: str(
            save_checkpoint(
                root / f"{part}.pt",
                build_network(preset, part),
                preset,
                part,
                scale_factor=1.0 if part == "diffusion_unet" else None,
            )
        )
        for part in preset.parts
    }


def test_infer_writes_mr_previews_in_the_mr_window(tmp_path):
    config = write_config(
        tmp_path / "infer.json",
        {
            "preset": TINY_MR,
            "checkpoints": _checkpoints(tmp_path),
            "output_size": [32, 32, 16],
            "spacing": [1.25, 1.0, 1.0],
            "modality": "mri_t1",
            "sampling": {"num_inference_steps": 2},
            "output": {"dir": str(tmp_path / "out")},
            "device": "cpu",
        },
    )
    assert infer.main(["--config", str(config), "--no-progress"]) == 0
    image = read_volume(tmp_path / "out" / "sample_seed0_image.nii.gz")
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "sample_seed0_preview.png")))
    np.testing.assert_array_equal(png, preview_picture(image, modality="mri_t1"))
    as_ct = preview_picture(image, windows=PREVIEW_WINDOWS)
    assert png.shape[0] < as_ct.shape[0]  # one row, not the soft-tissue and lung rows of a CT
    assert len(np.unique(png)) > 50 and (png == 255).mean() < 0.02
