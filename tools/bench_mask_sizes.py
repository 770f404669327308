"""Measure the size control of a mask generator: ask for one organ at several sizes, report what comes out.

    python tools/bench_mask_sizes.py                                   # the demo generator, liver 0.2 vs 0.8
    python tools/bench_mask_sizes.py --seeds 0 1 2 3 --scheduler ddpm --steps 1000 --json runs/sizes.json

For each requested size and seed the generator of ``--config`` (``$.anatomy.mask_generator``; default
``configs/inference_anatomy_size.json``, with the demo mask weights) samples a mask exactly as
``maisi.infer`` does (snap to the size table, the config's sampler, tiled decode, MAISI's post-processing) on
its own grid; the organ's volume (mL) and its size on the generator's size reference (the percentile
scale) are reported per seed and on average, and whether larger requests gave larger organs: on the means,
and seed by seed (a seed starts from the same noise).
No CT is generated. Exit 0 when the means order correctly, 1 when they do not (the numbers are printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maisi.config.loader import load_config  # noqa: E402
from maisi.masks.generation import plan_mask_generation, sample_mask_labels  # noqa: E402
from maisi.masks.postprocess import postprocess_generated_mask  # noqa: E402
from maisi.masks.sizes import SIZE_SLOTS, organ_volumes_ml, size_of_volume  # noqa: E402


def measure(
    config_path: Path,
    organ: str,
    sizes: list[float],
    seeds: list[int],
    steps: int | None,
    scheduler: str | None = None,
) -> dict:
    """Generate one mask per (size, seed) and measure ``organ`` in it.

    Args:
        config_path: an inference config with ``$.anatomy.mask_generator``.
        organ: a size slot, e.g. ``"liver"``.
        sizes: the requested sizes, each in [0, 1].
        seeds: one mask per seed and size.
        steps: sampler steps (None: the config's).
        scheduler: ``"ddpm"`` or ``"ddim"`` (None: the config's).

    Returns:
        ``{"organ", "steps", "requests": [{"size", "volumes_ml", "sizes", "mean_ml", "mean_size",
        "seconds"}], "mean_order_correct", "seed_order_correct": [per seed], "seed_pairs_correct"}``.
    """
    config = load_config(config_path, "infer")
    slot = SIZE_SLOTS.index(organ)
    device = torch.device("cpu")
    generator = config.anatomy.mask_generator
    if scheduler is not None:
        generator = dataclasses.replace(generator, scheduler=scheduler)
    if steps is not None:
        generator = dataclasses.replace(generator, num_inference_steps=steps)
    requests = []
    for size in sizes:
        anatomy = dataclasses.replace(
            config.anatomy, controllable_anatomy_size=((organ, float(size)),), mask_generator=generator
        )
        plan = plan_mask_generation(dataclasses.replace(config, anatomy=anatomy), device)
        spacing = [plan.preset.spacing_mm] * 3
        volumes, achieved = [], []
        started = time.perf_counter()
        for seed in seeds:
            labels = sample_mask_labels(plan, seed)
            cleaned, _ = postprocess_generated_mask(labels, plan.target_tumour)
            volume = float(organ_volumes_ml(cleaned, spacing)[slot])
            volumes.append(round(volume, 1))
            known = plan.reference is not None and len(plan.reference.get(organ, ())) > 0
            achieved.append(round(size_of_volume(organ, volume, plan.reference), 3) if known else None)
        requests.append(
            {
                "size": float(size),
                "conditioning": list(plan.snap.final),
                "volumes_ml": volumes,
                "sizes": achieved,
                "mean_ml": round(float(np.mean(volumes)), 1),
                "mean_size": round(float(np.mean(achieved)), 3) if None not in achieved else None,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    by_size = sorted(requests, key=lambda r: r["size"])
    means = [r["mean_ml"] for r in by_size]
    per_seed = [
        all(a["volumes_ml"][i] < b["volumes_ml"][i] for a, b in zip(by_size, by_size[1:]))
        for i in range(len(seeds))
    ]
    return {
        "config": str(config_path),
        "organ": organ,
        "seeds": seeds,
        "scheduler": generator.scheduler,
        "steps": generator.steps,
        "requests": requests,
        "mean_order_correct": all(a < b for a, b in zip(means, means[1:])),
        "seed_order_correct": per_seed,
        "seed_pairs_correct": f"{sum(per_seed)}/{len(seeds)}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "inference_anatomy_size.json")
    parser.add_argument("--organ", default="liver", choices=SIZE_SLOTS)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.2, 0.8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the config's)")
    parser.add_argument("--scheduler", choices=["ddpm", "ddim"], default=None, help="default: the config's")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = measure(args.config, args.organ, args.sizes, args.seeds, args.steps, args.scheduler)
    print(f"{args.organ}, {result['scheduler']} {result['steps']} steps, seeds {args.seeds} ({args.config})")
    for r in result["requests"]:
        print(
            f"  asked {r['size']:.2f}: mean {r['mean_ml']:7.1f} mL, size {r['mean_size']}  "
            f"per seed {r['volumes_ml']} mL / {r['sizes']}  ({r['seconds']} s)"
        )
    print(
        f"order of the means correct: {result['mean_order_correct']}; "
        f"per seed: {result['seed_pairs_correct']} {result['seed_order_correct']}"
    )
    if args.json:
        from maisi.atomic import write_json

        write_json(args.json, result)
    return 0 if result["mean_order_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
