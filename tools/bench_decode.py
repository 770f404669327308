"""Benchmark VAE decoding: untiled, MONAI sliding window at MAISI's settings, and the exact tiled decoder.

One latent and one set of (seeded random) weights; every variant runs in a fresh process so peak memories
do not mix (process peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). Errors are against
the untiled decode. Sliding windows follow MAISI's ``dynamic_infer``: a roi larger than the latent is
clipped to it, so a roi covering the whole latent is one whole-volume pass (the row says so and reuses
the untiled measurement instead of repeating it).

    python tools/bench_decode.py                                  # released VAE, 32^3 latent (128^3 CT)
    python tools/bench_decode.py --preset small-rflow --latent 64 64 32 --budgets-mb 64 1024
    python tools/bench_decode.py --device cuda --precision float32   # exactness on a GPU: no autocast,
                                                                     # no TF32

On CUDA, ``--precision auto`` decodes under float16 autocast like generation does, so every variant carries
float16 rounding (a few 1e-3 against the untiled pass) and only ``float32`` can check the 1e-3 error target.
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
    out: list[dict] = [{"name": "untiled", "method": "full"}]
    for spec in args.sw:
        roi, overlap = spec.split(":")
        clipped = [min(int(roi), s) for s in args.latent]
        out.append(
            {
                "name": f"sw roi {roi} ov {float(overlap):.2f}",
                "method": "sliding_window",
                "roi": clipped,
                "overlap": float(overlap),
                "whole": clipped == list(args.latent),
            }
        )
    for mb in args.budgets_mb:
        out.append({"name": f"tiled {mb} MiB", "method": "tiled", "budget": mb << 20})
        if args.device == "cuda":  # is the host round trip of every intermediate what costs the time there?
            out.append(
                {"name": f"tiled {mb} MiB on GPU", "method": "tiled", "budget": mb << 20, "on_device": True}
            )
    return out


def worker(variant: dict, folder: Path, preset_name: str, device_name: str, precision: str) -> None:
    """Decode once in this (fresh) process; print one JSON line of measurements."""
    from maisi.device import autocast, autocast_dtype, resolve_device
    from maisi.families.ct import get_preset
    from maisi.families.networks import RuntimeOptions, build_network
    from maisi.vae.codec import decode
    from maisi.vae.tiled import decode_tiled

    device = resolve_device(device_name)  # type: ignore[arg-type]
    if precision == "float32":  # TF32 convolutions would round like float16 does
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    vae = build_network(get_preset(preset_name), "autoencoder", RuntimeOptions.for_device(device))
    vae.load_state_dict(torch.load(folder / "vae.pt", weights_only=True))
    vae = vae.to(device).eval()
    z = torch.load(folder / "latent.pt", weights_only=True).to(device)
    calls = [0]
    vae.decoder.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    dtype = autocast_dtype(precision, device)  # type: ignore[arg-type]
    if variant.get("on_device"):  # intermediates kept in GPU memory instead of pinned host memory
        with torch.no_grad(), autocast(device, dtype):
            image = (
                decode_tiled(vae, z, memory_budget_bytes=variant["budget"], storage_device=device)
                .float()
                .cpu()
            )
    else:
        image = decode(
            vae,
            z,
            1.0,
            method=variant["method"],
            roi_size=tuple(variant.get("roi", (48, 48, 48))),
            overlap=variant.get("overlap", 0.6666),
            memory_budget_bytes=variant.get("budget"),
            autocast_dtype=dtype,
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save(image, folder / f"out_{variant['id']}.pt")
    print(json.dumps({"wall_s": wall, "peak": peak, "base": base, "windows": calls[0]}))


def run_variant(variant: dict, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(variant),
        "--folder",
        str(folder),
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="maisi-ct-rflow")
    parser.add_argument("--latent", type=int, nargs=3, default=[32, 32, 32], help="latent size x y z")
    parser.add_argument("--budgets-mb", type=int, nargs="+", default=[64, 1024], help="tiled budgets (MiB)")
    parser.add_argument(
        "--sw",
        nargs="*",
        default=["48:0.6666", "80:0.4", "24:0.6666"],
        help="sliding windows as roi:overlap (latent voxels); MAISI uses 48:0.6666 and 80:0.4",
    )
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="as the infer config's: auto is float16 autocast on CUDA, float32 on CPU",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker), Path(args.folder), args.preset, args.device, args.precision)
        return 0

    from maisi.families.ct import get_preset
    from maisi.families.networks import build_network

    preset = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        torch.save(build_network(preset, "autoencoder").state_dict(), folder / "vae.pt")
        torch.save(torch.randn(1, preset.latent_channels, *args.latent), folder / "latent.pt")
        rows = []
        for i, variant in enumerate(variants(args)):
            variant["id"] = i
            if variant.get("whole"):
                rows.append({**rows[0], **variant, "note": "roi >= latent: MAISI runs the untiled pass"})
                continue
            rows.append({**variant, **run_variant(variant, folder, args)})
            print(f"  {variant['name']}: done", file=sys.stderr, flush=True)
        ref = torch.load(folder / "out_0.pt", weights_only=True)
        for row in rows:
            path = folder / f"out_{row['id']}.pt"
            if "error" not in row and path.exists():
                out = torch.load(path, weights_only=True)
                diff = (out - ref).abs()
                row["max_err"], row["mean_err"] = diff.max().item(), diff.mean().item()
                row["clip_err"] = (out.clamp(0, 1) - ref.clamp(0, 1)).abs().max().item()
            elif "error" not in row:
                row["max_err"] = row["mean_err"] = row["clip_err"] = 0.0
    report(rows, args, preset.name, ref)
    return 0


def report(rows: list[dict], args: argparse.Namespace, preset: str, ref: torch.Tensor) -> None:
    base = rows[0]
    memory = "peak CUDA allocated" if args.device == "cuda" else "peak process RSS"
    size = [4 * s for s in args.latent]
    print(
        f"VAE decode, preset {preset}, latent {args.latent} -> image {size}, device {args.device}, "
        f"precision {args.precision}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"untiled output range [{ref.min().item():.3f}, {ref.max().item():.3f}], std {ref.std().item():.3f}; "
        f"memory = {memory} (before decode: {base.get('base', 0) / GB:.2f} GB)"
    )
    print(
        "errors vs untiled: raw decoder output (random weights: not confined to [0, 1]) and, 'clip', "
        "after the clip to [0, 1] that generation applies"
    )
    print(
        f"{'variant':<22}{'windows':>8}{'wall s':>9}{'peak GB':>9}{'max err':>10}{'mean err':>10}"
        f"{'clip max':>10}{'time x':>8}{'mem x':>7}  note"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<22} failed: {row['error']}")
            continue
        windows = "tiles" if row["method"] == "tiled" else row["windows"]
        print(
            f"{row['name']:<22}{windows:>8}{row['wall_s']:>9.1f}{row['peak'] / GB:>9.2f}"
            f"{row['max_err']:>10.2e}{row['mean_err']:>10.2e}{row['clip_err']:>10.2e}"
            f"{row['wall_s'] / base['wall_s']:>8.2f}{row['peak'] / base['peak']:>7.2f}  "
            f"{row.get('note', '')}"
        )
    ours = [r for r in rows if r["method"] == "tiled" and "error" not in r and not r.get("on_device")]
    on_gpu = [r for r in rows if r.get("on_device") and "error" not in r]
    sws = [
        r
        for r in rows
        if r["method"] == "sliding_window" and "error" not in r and abs(r["overlap"] - 0.6666) < 1e-3
    ]
    if not ours:
        return
    small = min(ours, key=lambda r: r["budget"])
    print("targets:")
    check = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    worst = max(r["max_err"] for r in ours)
    print(f"  max abs error of ours <= 1e-3: {worst:.2e} -> {check(worst <= 1e-3)}")
    print(
        f"  peak of ours (smallest budget) <= 0.5x untiled: {small['peak'] / base['peak']:.2f}x -> "
        f"{check(small['peak'] <= 0.5 * base['peak'])}"
    )
    slowest = max(r["wall_s"] for r in ours)
    print(
        f"  wall of ours <= 1.3x untiled: {slowest / base['wall_s']:.2f}x -> "
        f"{check(slowest <= 1.3 * base['wall_s'])}"
    )
    for sw in sws:
        print(
            f"  wall of ours <= 0.5x {sw['name']} ({sw['windows']} windows): "
            f"{slowest / sw['wall_s']:.2f}x -> "
            f"{check(slowest <= 0.5 * sw['wall_s'])}"
        )
    for r in on_gpu:
        print(
            f"  (not a target) {r['name']}: {r['wall_s'] / base['wall_s']:.2f}x untiled wall, "
            f"{r['peak'] / base['peak']:.2f}x its peak"
        )
    if args.device != "cuda":
        top = max(r["peak"] for r in ours)
        print(f"  CPU peak RSS of ours <= 4 GB: {top / GB:.2f} GB -> {check(top <= 4 * GB)}")


if __name__ == "__main__":
    raise SystemExit(main())
