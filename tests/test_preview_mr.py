"""``maisi.infer`` writes the preview of an MR sample in the MR window (its own 0.5-99.5 percentiles), not in
the CT (HU) windows that would show it white."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from maisi import infer
from maisi.data.io import read_volume
from maisi.preview import PREVIEW_WINDOWS, preview_picture
from tests.conftest import mr_infer_config


def test_infer_writes_mr_previews_in_the_mr_window(tiny_mr_checkpoints, tmp_path):
    config = mr_infer_config(tmp_path, tiny_mr_checkpoints)
    assert infer.main(["--config", str(config), "--no-progress"]) == 0
    image = read_volume(tmp_path / "out" / "sample_seed0_image.nii.gz")
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "sample_seed0_preview.png")))
    np.testing.assert_array_equal(png, preview_picture(image, modality="mri_t1"))
    as_ct = preview_picture(image, windows=PREVIEW_WINDOWS)
    assert png.shape[0] < as_ct.shape[0]  # one row, not the soft-tissue and lung rows of a CT
    assert len(np.unique(png)) > 50 and (png == 255).mean() < 0.02
