"""Benchmark mask decoding: MAISI's way (the full 125-channel logits, then argmax) vs ours (per-tile argmax).

Released mask-VAE architecture (``maisi-mask-ddpm``), seeded random weights, one seeded latent. Every variant
runs in a fresh process (peak RSS of that process; on CUDA ``torch.cuda.max_memory_allocated``). MAISI's
settings: ``SlidingWindowInferer`` roi [96, 96, 96] latent voxels, overlap 0.6667, Gaussian blending, over the
full logits; MAISI's ``dynamic_infer`` runs the network directly when the latent fits in one roi, which a
64^3 latent does, so that row is the untiled pass (with MAISI's num_splits 8; 1 for latents under 32 voxels,
where MONAI's splits get thinner than the kernel). Label agreement = fraction of equal voxels against the
first variant (the untiled argmax when it ran).

    python tools/bench_mask_decode.py                    # 64^3 latent -> 256^3 mask (MAISI's needs ~20 GB)
    python tools/bench_mask_decode.py --latent 32 32 32     # quick run
    python tools/bench_mask_decode.py --latent 64 64 64 --skip-maisi --budgets-mb 256 1024
    python tools/bench_mask_decode.py --latent 32 32 32 --stored   # also ours with every layer stored
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9


def variants(args: argparse.Namespace) -> list[dict]:
    out: list[dict] = []
    if not args.skip_maisi:
        for spec in args.sw:
            roi, overlap = spec.split(":")
            whole = all(int(roi) >= s for s in args.latent)
            name = "MAISI untiled (roi covers latent)" if whole else f"MAISI sw roi {roi} ov {overlap}"
            out.append({"name": name, "method": "maisi", "roi": int(roi), "overlap": float(overlap)})
    for mb in args.budgets_mb:
        for stream in (True, False) if args.stored else (True,):
            name = f"ours {'streamed' if stream else 'stored'} levels {mb} MiB"
            out.append({"name": name, "method": "ours", "budget": mb << 20, "stream": stream})
    return out


def worker(variant: dict, folder: Path, device_name: str) -> None:
    """Decode once in this (fresh) process; print one JSON line of measurements."""
    from maisi.device import resolve_device
    from maisi.families.mask import get_mask_preset
    from maisi.families.networks import RuntimeOptions
    from maisi.masks.decode import argmax_labels, decode_mask_labels
    from maisi.masks.networks import build_mask_network
    from maisi.vae.codec import decode

    device = resolve_device(device_name)  # type: ignore[arg-type]
    preset = get_mask_preset(variant["preset"])
    vae = build_mask_network(preset, "autoencoder", RuntimeOptions(use_flash_attention=False))
    vae.load_state_dict(torch.load(folder / "vae.pt", weights_only=True))
    vae = vae.to(device).eval()
    if variant["method"] == "maisi" and variant["small"]:  # MONAI's splits would be thinner than the kernel
        for module in vae.modules():
            if hasattr(module, "num_splits"):
                module.num_splits = 1
    z = torch.load(folder / "latent.pt", weights_only=True).to(device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if variant["method"] == "maisi":
        roi = tuple(min(variant["roi"], s) for s in z.shape[2:])  # as MAISI's dynamic_infer
        logits = decode(vae, z, 1.0, method="sliding_window", roi_size=roi, overlap=variant["overlap"])
        labels = argmax_labels(logits)
        del logits
    else:
        labels = decode_mask_labels(
            vae, z, 1.0, memory_budget_bytes=variant["budget"], stream_levels=variant["stream"]
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save(labels, folder / f"out_{variant['id']}.pt")
    print(json.dumps({"wall_s": wall, "peak": peak, "base": base}))


def run_variant(variant: dict, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(variant), "--folder", str(folder)]
    done = subprocess.run([*cmd, "--device", args.device], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="maisi-mask-ddpm")
    parser.add_argument("--latent", type=int, nargs=3, default=[64, 64, 64], help="latent size x y z")
    parser.add_argument("--budgets-mb", type=int, nargs="+", default=[1024], help="tiled budgets (MiB)")
    parser.add_argument(
        "--sw", nargs="*", default=["96:0.6667"], help="MAISI's windows as roi:overlap (latent voxels)"
    )
    parser.add_argument("--skip-maisi", action="store_true", help="ours only (MAISI's needs the full logits)")
    parser.add_argument("--stored", action="store_true", help="also ours with every layer stored whole")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker), Path(args.folder), args.device)
        return 0

    from maisi.families.mask import get_mask_preset
    from maisi.masks.networks import build_mask_network

    preset = get_mask_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        torch.save(build_mask_network(preset, "autoencoder").state_dict(), folder / "vae.pt")
        torch.save(torch.randn(1, preset.latent_shape[0], *args.latent), folder / "latent.pt")
        rows = []
        for i, variant in enumerate(variants(args)):
            variant.update(id=i, preset=preset.name, small=min(args.latent) < 32)
            rows.append({**variant, **run_variant(variant, folder, args)})
            print(f"  {variant['name']}: done", file=sys.stderr, flush=True)
        ref = next((r for r in rows if "error" not in r), None)
        ref_labels = torch.load(folder / f"out_{ref['id']}.pt", weights_only=True) if ref else None
        for row in rows:
            if "error" not in row and ref_labels is not None:
                labels = torch.load(folder / f"out_{row['id']}.pt", weights_only=True)
                row["agreement"] = (labels == ref_labels).double().mean().item()
    report(rows, args, preset.name, ref)
    return 0


def report(rows: list[dict], args: argparse.Namespace, preset: str, ref: dict | None) -> None:
    memory = "peak CUDA allocated" if args.device == "cuda" else "peak process RSS"
    size = [4 * s for s in args.latent]
    print(
        f"mask decode, preset {preset}, latent {args.latent} -> labels {size}, device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"memory = {memory}; agreement = fraction of voxels equal to '{ref['name'] if ref else '-'}'")
    first = next((r for r in rows if "error" not in r), None)
    print(f"{'variant':40s} {'time s':>8s} {'peak GB':>8s} {'t ratio':>8s} {'mem ratio':>9s} {'agree':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:40s} failed: {r['error']}")
            continue
        t_ratio = r["wall_s"] / first["wall_s"] if first else float("nan")
        m_ratio = r["peak"] / first["peak"] if first else float("nan")
        print(
            f"{r['name']:40s} {r['wall_s']:8.2f} {r['peak'] / GB:8.2f} {t_ratio:8.2f} {m_ratio:9.2f} "
            f"{r.get('agreement', float('nan')):9.6f}"
        )


if __name__ == "__main__":
    sys.exit(main())
