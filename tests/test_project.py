"""The project's promises about itself: README commands, CI script."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks if "pip install" in b]


def test_readme_has_exactly_two_set_up_and_run_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("python -m maisi.infer --config configs/inference.json")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci


def test_the_default_main_job_runs_as_shipped(tmp_path):
    """configs/inference.json with the committed demo weights and mask: a CT, its mask, metadata, preview."""
    import json
    import subprocess
    import sys

    import numpy as np
    import SimpleITK as sitk

    from maisi.data.io import read_volume

    out = tmp_path / "output"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "maisi.infer",
            "--config",
            "configs/inference.json",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    mask = read_volume(REPO / "dataset" / "demo" / "chest_mask.nii.gz")
    image = read_volume(out / "sample_seed0_image.nii.gz")
    assert image.shape == mask.shape and np.allclose(image.affine, mask.affine, atol=1e-4)
    assert image.array.min() >= -1000 and image.array.max() <= 1000
    assert np.all(image.array[mask.array == 0] == -1000)
    assert np.array_equal(read_volume(out / "sample_seed0_label.nii.gz").array, mask.array)
    lungs = np.isin(mask.array, [28, 29, 30, 31, 32])
    assert np.median(image.array[lungs]) < -400  # trained weights: the lungs are air, not noise
    meta = json.loads((out / "sample_seed0.json").read_text())
    assert meta["quality_check"]["tries"] and meta["mask_fidelity"]["lung"] is not None
    # as the README says: the default seed passes the HU check on its first try (a bfloat16 decode did not)
    assert meta["quality_check"]["passed"] is True and len(meta["quality_check"]["tries"]) == 1, meta
    assert "HU check: 1 passed, 0 FAILED" in done.stderr.splitlines()[-1]
    assert sitk.ReadImage(str(out / "sample_seed0_preview.png")).GetNumberOfComponentsPerPixel() == 3
