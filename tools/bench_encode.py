"""Benchmark pre-encoding: whole-volume versus tiled, same CT and weights, each in a fresh process.

Builds a CT of the requested size from the real TotalSegmentator example (resized with MONAI), writes a
random-weight VAE of the chosen preset, runs ``maisi.encode`` once per mode and prints wall time, peak
memory (process RSS on CPU, CUDA allocated on GPU) and the ratios against the whole-volume baseline.

    python tools/bench_encode.py --size 256 256 128 --preset maisi-ct-rflow
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
from monai.transforms import Resize

from maisi.checkpoints import save_checkpoint
from maisi.data.datalist import write_datalist
from maisi.data.io import Volume, read_volume, write_volume
from maisi.families.ct import get_preset
from maisi.families.networks import build_network

REPO = Path(__file__).resolve().parents[1]
SOURCE_CT = REPO / "tests" / "data" / "totalseg_example_ct_sm.nii.gz"
SUMMARY = re.compile(r"peak memory ([\d.]+) GB")


def make_inputs(folder: Path, size: tuple[int, int, int], preset_name: str) -> None:
    ct = read_volume(SOURCE_CT)
    resized = Resize(spatial_size=size, mode="trilinear")(
        torch.from_numpy(ct.array.astype(np.float32))[None]
    )[0]
    spacing = np.asarray(ct.spacing) * np.asarray(ct.shape) / np.asarray(size)
    write_volume(
        folder / "case" / "ct.nii.gz", Volume(resized.numpy().astype(np.int16), np.diag([*spacing, 1.0]))
    )
    write_datalist(folder / "datalist.json", {"training": [{"image": "case/ct.nii.gz"}]})
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    save_checkpoint(folder / "vae.pt", build_network(preset, "autoencoder"), preset, "autoencoder")


def run_mode(folder: Path, preset: str, tiling: dict, device: str) -> dict[str, float]:
    name = tiling["method"] + ("" if tiling["method"] == "full" else f"_{tiling['roi_size'][0]}")
    config = {
        "preset": preset,
        "autoencoder": "vae.pt",
        "datalist": "datalist.json",
        "output_dir": f"out_{name}",
        "tiling": tiling,
        "device": device,
    }
    (folder / f"{name}.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "maisi.encode", "--config", str(folder / f"{name}.json")],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    match = SUMMARY.search(done.stderr)
    if done.returncode != 0 or not match:
        return {
            "name": name,
            "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
        }
    return {"name": name, "wall_s": wall, "peak_gb": float(match.group(1))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 128])
    parser.add_argument("--preset", default="maisi-ct-rflow")
    parser.add_argument("--roi", type=int, nargs="+", default=[128, 64], help="tile sizes (cubes) to compare")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_inputs(folder, tuple(args.size), args.preset)
        modes = [{"method": "full"}] + [
            {"method": "sliding_window", "roi_size": [r] * 3, "overlap": args.overlap} for r in args.roi
        ]
        rows = [run_mode(folder, args.preset, m, args.device) for m in modes]
    base = rows[0]
    print(f"encode {args.size} CT, preset {args.preset}, torch threads {torch.get_num_threads()}")
    print(f"{'mode':<22}{'wall s':>10}{'peak GB':>10}{'time x':>10}{'memory x':>10}")
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<22} failed: {row['error']}")
            continue
        ratios = (
            ("", "")
            if "error" in base
            else (f"{row['wall_s'] / base['wall_s']:.2f}", f"{row['peak_gb'] / base['peak_gb']:.2f}")
        )
        print(f"{row['name']:<22}{row['wall_s']:>10.1f}{row['peak_gb']:>10.2f}{ratios[0]:>10}{ratios[1]:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
