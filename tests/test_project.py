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
    """configs/inference.json after tools/make_untrained_checkpoints.py, in a copy of the layout."""
    import json
    import shutil
    import subprocess
    import sys

    from maisi.data.io import read_volume

    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "inference.json", tmp_path / "configs" / "inference.json")
    tool = [sys.executable, str(REPO / "tools" / "make_untrained_checkpoints.py"),
            "--dest", str(tmp_path / "models" / "untrained" / "tiny-rflow")]  # fmt: skip
    subprocess.run(tool, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "maisi.infer", "--config", "configs/inference.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "configs" / "inference.json").read_text())
    image = read_volume(tmp_path / "output" / "sample_seed0_image.nii.gz")
    assert list(image.shape) == config["output_size"]
    assert abs(image.spacing[2] - config["spacing"][2]) < 1e-6
    assert (tmp_path / "output" / "sample_seed0_preview.png").is_file()
