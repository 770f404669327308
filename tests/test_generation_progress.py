"""``--no-progress`` silences every progress bar of ``maisi.infer`` (the tiled decoder's, MONAI's sliding
window's and the denoising loop's), because every bar goes through :mod:`maisi.progress`."""

from __future__ import annotations

import json

import pytest

from maisi.infer import main

BAR_MARKS = ("%|", "it/s", "s/it")  # what a tqdm bar prints, whatever its description


def bars(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if any(m in line for m in BAR_MARKS)]


@pytest.mark.parametrize("method", ["tiled", "sliding_window"])
def test_no_progress_silences_every_bar_of_a_mask_mode_run(infer_config, tmp_path, method, capfd):
    config = infer_config(decoding={"method": method, "sw_roi_size": [4, 4, 4]}, num_samples=1)
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "shown")]) == 0
    shown = bars(capfd.readouterr().err)
    # the run has bars to silence: denoising and the decoder's own
    assert any("denoising" in line for line in shown), shown
    decoder = "tiled decoder" if method == "tiled" else "%|"
    assert any(decoder in line for line in shown if "denoising" not in line), shown

    assert main(["--config", str(config), "--output-dir", str(tmp_path / "quiet"), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert bars(err) == [], err
    assert json.loads((tmp_path / "quiet" / "sample_seed0.json").read_text())["seed"] == 0
