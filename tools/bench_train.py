"""Benchmark training throughput: steps/s of each stage for a preset, through the public CLI.

Latent stages train on random latents of the given size (written with valid sidecars) and random label
masks; the autoencoder trains on patches of the real test CT. Each stage runs in a fresh process.

    python tools/bench_train.py --preset small-rflow --latent 32 32 32 --patch 64 64 64 --steps 6
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maisi.checkpoints import save_checkpoint
from maisi.data.datalist import write_datalist
from maisi.data.io import Volume, write_volume
from maisi.data.latents import write_latent, write_sidecar
from maisi.families.ct import get_preset
from maisi.families.networks import build_network
from maisi.files import file_sha256

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"(\d+) steps in ([\d.]+) s \(([\d.]+) steps/s")


def make_latents(folder: Path, preset_name: str, size: tuple[int, int, int], count: int = 2) -> Path:
    """``count`` random latents with valid sidecars, label masks, a datalist and a UNet (``unet.pt``)."""
    preset = get_preset(preset_name)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(count):
        latent = rng.standard_normal((preset.latent_channels, *size)).astype(np.float32)
        path = write_latent(folder / f"case{i}_emb.nii.gz", latent, np.eye(4) * 4)
        label = np.full([preset.vae_factor * s for s in size], 200, dtype=np.uint8)
        label[: label.shape[0] // 2] = 1
        write_volume(folder / f"case{i}_label.nii.gz", Volume(label, np.eye(4)))
        write_sidecar(
            path,
            {
                "latent_shape": list(latent.shape),
                "latent_sha256": file_sha256(path),
                "spacing": [1.5, 1.5, 1.5],
                "modality": "ct",
                "top_region_index": [0, 1, 0, 0],
                "bottom_region_index": [0, 0, 1, 0],
            },
        )
        entries.append({"image": path.name, "label": f"case{i}_label.nii.gz", "fold": i})
    write_datalist(folder / "latents.json", {"training": entries})
    torch.manual_seed(0)
    save_checkpoint(
        folder / "unet.pt",
        build_network(preset, "diffusion_unet"),
        preset,
        "diffusion_unet",
        scale_factor=1.0,
    )
    return folder / "latents.json"


def run_stage(folder: Path, stage: str, config: dict) -> str:
    path = folder / f"{stage}.json"
    path.write_text(json.dumps(config))
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "maisi.train", stage, "--config", str(path)], capture_output=True, text=True
    )
    match = RATE.search(done.stderr)
    if done.returncode or not match:
        return f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return (
        f"{float(match.group(3)):.3f} steps/s ({match.group(1)} steps in {match.group(2)} s; "
        f"wall {time.perf_counter() - t0:.0f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-rflow")
    parser.add_argument("--latent", type=int, nargs=3, default=[32, 32, 32])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stages", nargs="+", default=["autoencoder", "diffusion", "controlnet"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        latents = make_latents(folder, args.preset, tuple(args.latent))
        ct_list = folder / "ct.json"
        write_datalist(
            ct_list,
            {"training": [{"image": str(REPO / "tests/data/totalseg_example_ct_sm.nii.gz"), "fold": 0}]},
        )
        common = {
            "preset": args.preset,
            "output_dir": "",
            "steps": args.steps,
            "device": "auto",
            "tensorboard": False,
            "checkpoint_every": 10**6,
            "validate_every": 10**6,
        }
        configs = {
            "autoencoder": {**common, "datalist": str(ct_list), "autoencoder": {"patch_size": args.patch}},
            "diffusion": {**common, "datalist": str(latents)},
            "controlnet": {
                **common,
                "datalist": str(latents),
                "init": {"diffusion_unet": str(folder / "unet.pt")},
                "controlnet": {"weighted_loss": 100.0, "weighted_loss_label": [1]},
            },
        }
        print(
            f"preset {args.preset}, latent {args.latent}, patch {args.patch}, batch 1, torch threads "
            f"{torch.get_num_threads()}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
        )
        for stage in args.stages:
            config = dict(configs[stage], output_dir=str(folder / f"run_{stage}"))
            print(f"{stage:<12} {run_stage(folder, stage, config)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
