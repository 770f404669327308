"""tools/bench_mask_sizes.py: the size-control measurement of a mask generator.

Tiny random networks for the plumbing (loading the generator, snapping the request); a crafted generator
output (monkeypatched) whose liver grows or shrinks with the requested size, for what the measurement and
the order verdict must say.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi.checkpoints import save_checkpoint
from maisi.families.mask import get_mask_preset
from maisi.masks.networks import build_mask_network
from maisi.masks.sizes import build_size_reference, organ_volumes_ml, reference_json
from tests.conftest import write_config
from tools import bench_mask_sizes

MASK_PRESET = "tiny-mask-ddpm"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def random_generator_config(tmp_path_factory) -> Path:
    """An anatomy-size config whose mask generator is tiny, random and seeded (the CT part is never run)."""
    folder = tmp_path_factory.mktemp("bench_generator")
    preset = get_mask_preset(MASK_PRESET)
    torch.manual_seed(0)
    vae = save_checkpoint(
        folder / "vae.pt", build_mask_network(preset, "autoencoder"), preset, "mask_autoencoder"
    )
    unet = save_checkpoint(
        folder / "unet.pt",
        build_mask_network(preset, "diffusion_unet"),
        preset,
        "mask_diffusion_unet",
        scale_factor=1.0,
    )
    table = folder / "sizes.json"
    table.write_text(json.dumps([{"organ_size": [0.5] * 5 + [-1] * 5}]))
    volumes = np.ones((3, 10))
    volumes[:, 1] = [500.0, 1000.0, 1500.0]  # livers of the reference
    reference = folder / "reference.json"
    reference.write_text(json.dumps(reference_json(build_size_reference(volumes), "test")))
    data = {
        "preset": "tiny-rflow",
        "checkpoints": {"autoencoder": "a.pt", "diffusion_unet": "u.pt", "controlnet": "c.pt"},
        "anatomy": {
            "controllable_anatomy_size": [["liver", 0.5]],
            "mask_generator": {
                "preset": MASK_PRESET,
                "autoencoder": str(vae),
                "diffusion_unet": str(unet),
                "size_conditions": str(table),
                "size_reference": str(reference),
                "num_inference_steps": 1000,
            },
        },
        "output_size": [64, 64, 64],
        "spacing": [6.0, 6.0, 6.0],
        "device": "cpu",
    }
    return write_config(folder / "config.json", data)


def cube_liver(edge: int) -> np.ndarray:
    """A generator output on the tiny preset's grid: body with a cubic liver of ``edge`` voxels."""
    shape = get_mask_preset(MASK_PRESET).mask_shape
    mask = np.zeros(shape, dtype=np.int16)
    mask[4:-4, 4:-4, 4:-4] = 200
    lo = shape[0] // 2 - edge // 2
    mask[lo : lo + edge, lo : lo + edge, lo : lo + edge] = 1
    return mask


def fake_generator(monkeypatch, grows: bool, seen: list) -> None:
    """The liver's edge follows the conditioned liver slot (larger or smaller), plus one voxel per seed."""

    def fake(plan, seed, progress=False):
        liver = plan.snap.final[1]
        seen.append((liver, seed, plan.num_steps))
        edge = 6 + round(20 * (liver if grows else 1 - liver)) + seed
        return cube_liver(edge)

    monkeypatch.setattr(bench_mask_sizes, "sample_mask_labels", fake)


def test_measure_reports_each_requests_volumes_sizes_and_the_order(random_generator_config, monkeypatch):
    seen: list = []
    fake_generator(monkeypatch, grows=True, seen=seen)
    result = bench_mask_sizes.measure(
        random_generator_config, "liver", [0.2, 0.8], [0, 1], steps=5, scheduler="ddim"
    )
    # each request conditions the UNet on its liver size, every seed, with the steps asked for
    assert seen == [(0.2, 0, 5), (0.2, 1, 5), (0.8, 0, 5), (0.8, 1, 5)]
    assert result["steps"] == 5 and result["scheduler"] == "ddim" and result["seeds"] == [0, 1]
    small, large = result["requests"]
    spacing = [get_mask_preset(MASK_PRESET).spacing_mm] * 3
    for request, size in ((small, 0.2), (large, 0.8)):
        expected = [organ_volumes_ml(cube_liver(6 + round(20 * size) + s), spacing)[1] for s in (0, 1)]
        assert request["volumes_ml"] == pytest.approx(expected, abs=0.1)
        assert request["mean_ml"] == pytest.approx(np.mean(expected), abs=0.1)
        assert all(0 < s < 1 for s in request["sizes"])  # on the reference's percentile scale
    assert small["sizes"][0] < large["sizes"][0]
    assert result["mean_order_correct"] is True
    assert result["seed_order_correct"] == [True, True] and result["seed_pairs_correct"] == "2/2"


def test_a_generator_that_inverts_the_sizes_exits_1_with_the_numbers(
    random_generator_config, monkeypatch, tmp_path, capsys
):
    fake_generator(monkeypatch, grows=False, seen=[])
    out = tmp_path / "bench.json"
    argv = ["--config", str(random_generator_config), "--seeds", "0", "--steps", "3", "--scheduler", "ddim"]
    argv += ["--json", str(out)]
    assert bench_mask_sizes.main(argv) == 1
    printed = capsys.readouterr().out
    assert "order of the means correct: False" in printed and "per seed: 0/1" in printed
    result = json.loads(out.read_text())
    assert result["mean_order_correct"] is False
    assert result["requests"][0]["mean_ml"] > result["requests"][1]["mean_ml"]
