"""Measure the mask stage's peak memory against its estimate (maisi.masks.memory).

Per mask preset, in a fresh process: random seeded mask networks, then one mask made as ``maisi.infer`` makes
it (DDPM on the latent, the tiled per-tile-argmax decode, channel -> MAISI id, MAISI's post-processing). On
the CPU the measure is the peak RSS over the RSS after loading the networks (the estimate's terms without the
weights); on CUDA ``torch.cuda.max_memory_allocated`` over the allocated weights. The ratio
estimate / measured is what ``check_memory`` relies on: it must stay at most 1 (a lower bound).

    python tools/bench_mask_memory.py                                    # tiny and demo presets, 3 steps
    python tools/bench_mask_memory.py --presets maisi-mask-ddpm --steps 1   # minutes on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

MB = 1e6


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(preset_name: str, steps: int, device_name: str) -> None:
    """Make one mask in this (fresh) process; print one JSON line of measurements."""
    from maisi.device import resolve_device
    from maisi.families.mask import get_mask_preset
    from maisi.families.networks import RuntimeOptions
    from maisi.masks.generation import MaskGenerationPlan, sample_mask_labels
    from maisi.masks.memory import estimate_mask_memory
    from maisi.masks.networks import MaskNetworks, build_mask_network
    from maisi.masks.postprocess import postprocess_generated_mask
    from maisi.masks.sizes import SizeSnap

    device = resolve_device(device_name)  # type: ignore[arg-type]
    preset = get_mask_preset(preset_name)
    runtime = RuntimeOptions.for_device(device)
    torch.manual_seed(0)
    nets = MaskNetworks(
        build_mask_network(preset, "autoencoder", runtime).eval().to(device),
        build_mask_network(preset, "diffusion_unet", runtime).eval().to(device),
        1.0,
    )
    sizes = (0.5,) * 5 + (-1.0,) * 5
    plan = MaskGenerationPlan(
        preset,
        nets,
        (),
        SizeSnap(0, 0.0, sizes, sizes),
        (),
        None,
        {},
        (1, 1, 1),
        (1.0, 1.0, 1.0),
        steps,
        device,
    )
    estimate = estimate_mask_memory(plan)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_now()
    labels = sample_mask_labels(plan, seed=0)
    postprocess_generated_mask(labels, None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        estimated = estimate.device_bytes - estimate.parts["weights"]
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        estimated = estimate.host_bytes - estimate.parts["weights"]
    print(json.dumps({"measured": peak - before, "estimated": estimated, "parts": estimate.parts}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-mask-ddpm", "demo-mask-ddpm"])
    parser.add_argument("--steps", type=int, default=3, help="DDPM steps (memory does not grow with them)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.device)
        return 0
    memory = "peak CUDA allocated" if args.device == "cuda" else "peak RSS"
    print(
        f"mask stage memory, device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {platform.processor() or platform.machine()}; measured = {memory} over the loaded networks"
    )
    print(f"{'preset':18s} {'measured MB':>12s} {'estimate MB':>12s} {'ratio':>6s}  terms (MB)")
    for name in args.presets:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--steps",
            str(args.steps),
            "--device",
            args.device,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name:18s} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        terms = ", ".join(f"{k} {v / MB:.0f}" for k, v in row["parts"].items())
        ratio = row["estimated"] / row["measured"]
        print(f"{name:18s} {row['measured'] / MB:12.0f} {row['estimated'] / MB:12.0f} {ratio:6.2f}  {terms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
