"""The project's promises about itself: README commands, CI script."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
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


def _imported_top_level_modules() -> set[str]:
    """Every top-level module that a module of maisi/ imports (absolute imports, at any depth of the file)."""
    names: set[str] = set()
    for path in (REPO / "maisi").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"maisi"}


def test_every_package_maisi_imports_is_declared():
    """An import that only works because another dependency happens to pull its package in (httpx2 through
    huggingface_hub) breaks when that dependency changes: each is a declared dependency of pyproject (or of
    an optional extra, for what maisi imports only when the extra's feature is used)."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    requirements = re.findall(r'^\s*"([^"]+)"', block.group(1), re.M)  # tomllib is Python 3.11+
    extras = re.search(r"^\[project\.optional-dependencies\](.*?)^\[", text, re.S | re.M)
    requirements += re.findall(r'"([^"]+)"', extras.group(1))  # an extra's package, imported lazily (text)
    declared = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: providers.get(module)
        for module in sorted(_imported_top_level_modules())
        if not {d.lower().replace("_", "-") for d in providers.get(module, [module])} & declared
    }
    assert not undeclared, f"imported by maisi/ but not in [project] dependencies: {undeclared}"
