"""Benchmark the training data path: steps/s and peak memory on many synthetic volumes, per loader setting.

Writes ``--volumes`` synthetic CT images (``--size``^3, int16 NIfTI) and as many latents (``--latent``^3)
into a temporary folder, then trains the autoencoder and the diffusion UNet (preset ``tiny-rflow``) through
``python -m maisi.train``, each setting in a fresh process whose memory is sampled every 50 ms: the peak of
the summed RSS of the process and its DataLoader workers, and the peak of their summed PSS (shared pages
counted once: forked workers share the parent's memory). Steps/s is the training loop's own figure (reading
the images held in memory happens before it; ``start`` is the rest of the wall time). ``--old-tree DIR`` adds
runs of another checkout (``git archive <commit> | tar -x -C DIR``) with its default settings. Linux only.

    python tools/bench_train_data.py --volumes 200 --size 64 --latent 16 --steps 40 [--old-tree /tmp/old]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_train import make_latents

from maisi.data.datalist import write_datalist
from maisi.data.io import Volume, write_volume

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"(\d+) steps in ([\d.]+) s \(([\d.]+) steps/s")
PAGE = os.sysconf("SC_PAGE_SIZE")


def make_cts(folder: Path, count: int, size: int) -> Path:
    """``count`` CT-like volumes, air around an ellipsoid of noisy soft tissue; returns their datalist."""
    rng = np.random.default_rng(0)
    axes = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    entries = []
    for i in range(count):
        radii = rng.uniform(0.6, 0.95, size=(3, 1, 1, 1))
        body = ((axes / radii) ** 2).sum(0) < 1
        hu = np.where(body, rng.normal(40, 80, body.shape), -1000).astype(np.int16)
        write_volume(folder / f"ct{i:04d}.nii.gz", Volume(hu, np.diag([1.5, 1.5, 1.5, 1.0])))
        entries.append({"image": f"ct{i:04d}.nii.gz", "fold": 0})
    return write_datalist(folder / "ct.json", {"training": entries})


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def _memory(pids: list[int]) -> tuple[int, int]:
    """Summed (RSS, PSS) in bytes of ``pids`` (processes that have gone count 0)."""
    rss = pss = 0
    for pid in pids:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return rss, pss


def run(stage: str, config: dict, folder: Path, tree: Path) -> str:
    """Train in a fresh process (``tree`` on its path), sampling its memory; one line of results."""
    path = folder / f"{stage}_{len(list(folder.glob('*.cfg.json')))}.cfg.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log = folder / "log.txt"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "maisi.train", stage, "--config", str(path)],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        peak_rss = peak_pss = 0
        while child.poll() is None:
            rss, pss = _memory(_tree(child.pid))
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    text = log.read_text()
    match = RATE.search(text)
    if child.returncode or not match:
        return f"failed ({child.returncode}): {text.strip().splitlines()[-1] if text.strip() else ''}"
    steps_s, loop_s = float(match.group(3)), float(match.group(2))
    return (
        f"{steps_s:6.2f} steps/s   peak RSS {peak_rss / 2**20:6.0f} MiB   "
        f"peak PSS {peak_pss / 2**20:6.0f} MiB   start {wall - loop_s:5.1f} s   wall {wall:5.1f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=200, help="synthetic volumes (default 200)")
    parser.add_argument("--size", type=int, default=64, help="CT edge in voxels (default 64)")
    parser.add_argument("--latent", type=int, default=16, help="latent edge in voxels (default 16)")
    parser.add_argument("--patch", type=int, default=32, help="autoencoder patch edge (default 32)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers of the streamed runs (default 2)"
    )
    parser.add_argument(
        "--old-tree", type=Path, help="another checkout to run with its defaults (default: none)"
    )
    parser.add_argument("--stages", nargs="+", default=["autoencoder", "diffusion"], help="stages to run")
    args = parser.parse_args()
    settings = [
        ("held, in-process (default)", {"cache_rate": 1.0, "num_workers": 0}),
        ("read per draw, in-process", {"cache_rate": 0.0, "num_workers": 0}),
        (f"read per draw, {args.workers} workers", {"cache_rate": 0.0, "num_workers": args.workers}),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        datalists = {
            "autoencoder": make_cts(folder, args.volumes, args.size),
            "diffusion": make_latents(folder, "tiny-rflow", (args.latent,) * 3, args.volumes),
        }
        print(
            f"{args.volumes} CT {args.size}^3 and latents {args.latent}^3 written in "
            f"{time.perf_counter() - t0:.0f} s; tiny-rflow, batch {args.batch}, {args.steps} steps, "
            f"patch {args.patch}^3, {os.cpu_count()} CPUs"
        )
        for stage in args.stages:
            base = {
                "preset": "tiny-rflow",
                "datalist": str(datalists[stage]),
                "steps": args.steps,
                "batch_size": args.batch,
                "device": "cpu",
                "tensorboard": False,
                "checkpoint_every": 10**6,
                "validate_every": 10**6,
                "autoencoder": {"patch_size": [args.patch] * 3, "adversarial_weight": 0},
            }
            runs = [(f"old tree ({args.old_tree})", base, args.old_tree)] if args.old_tree else []
            runs += [(name, {**base, "loader": loader}, REPO) for name, loader in settings]
            for i, (name, config, tree) in enumerate(runs):
                config = {**config, "output_dir": str(folder / f"run_{stage}_{i}")}
                print(f"{stage:<12} {name:<34} {run(stage, config, folder, tree)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
