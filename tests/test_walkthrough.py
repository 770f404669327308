"""The new-tumour-class walkthrough script, end to end with a couple of training steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from maisi.data.io import Volume, read_mask, read_volume, write_volume
from maisi.labels import load_label_dict

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def tumour_in_the_right_lung(dest: Path) -> Path:
    """A 1-valued ball (radius 3 voxels in-plane, 1 slice either side) in the right lung of slicerio's
    chest."""
    seg = read_mask(DATA / "slicerio_Segmentation.seg.nrrd")
    lung = np.argwhere(seg.array == 5)  # right lung
    centre = lung[len(lung) // 2]
    x, y, z = np.ogrid[: seg.shape[0], : seg.shape[1], : seg.shape[2]]
    ball = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= 9) & (np.abs(z - centre[2]) <= 1)
    return write_volume(dest, Volume(ball.astype(np.uint8), seg.affine))


def test_walkthrough_adds_the_class_finetunes_and_generates(tmp_path, tiny_checkpoints):
    work = tmp_path / "walk"
    env = {
        **os.environ,
        "WORK": str(work),
        "STEPS": "2",
        "INFER_STEPS": "3",
        "DEVICE": "cpu",
        "PYTHON": sys.executable,
        "CT": str(DATA / "slicerio_CTChest4.nrrd"),
        "TUMOUR": str(tumour_in_the_right_lung(tmp_path / "t.nii.gz")),
        "MODELS": str(tiny_checkpoints["tiny-rflow"]["autoencoder"].parent),
        "OMP_NUM_THREADS": "2",
    }
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "walkthrough_new_class.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    labels = load_label_dict(work / "label_dict.json")
    new_id = labels["nsclc tumor"]
    assert {i: n for n, i in load_label_dict().items()}[new_id].startswith("dummy")  # it took a dummy slot
    config = json.loads((work / "controlnet.json").read_text())
    assert config["controlnet"]["weighted_loss_label"] == [new_id] and config["steps"] == 2
    assert (work / "controlnet" / "controlnet.pt").is_file()
    meta_path = Path(done.stdout.strip().splitlines()[-1])
    meta = json.loads(meta_path.read_text())
    assert meta["checkpoints"]["controlnet"]["path"] == str(work / "controlnet" / "controlnet.pt")
    mask = read_mask(meta_path.with_name("lung1_nsclc_seed0_label.nii.gz"))
    ct = read_volume(meta_path.with_name("lung1_nsclc_seed0_image.nii.gz"))
    # the 192 x 192 x 160 mm box around the tumour, at the walkthrough's 2 x 2 x 2.5 mm
    assert ct.shape == mask.shape == (96, 96, 64) and np.allclose(ct.spacing, (2.0, 2.0, 2.5))
    assert set(np.unique(mask.array)) == {0, new_id, 200}  # the tumour kept its new id through every step


def test_walkthrough_without_maisi_says_what_to_activate(tmp_path):
    env = {
        **os.environ,
        "WORK": str(tmp_path / "walk"),
        "PYTHON": "/bin/false",
    }  # an interpreter lacking maisi
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "walkthrough_new_class.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "cannot import maisi" in done.stderr and ".venv/bin/activate" in done.stderr
    assert "Traceback" not in done.stderr
