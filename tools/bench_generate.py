"""Benchmark generation: overhead of our sampling loop, and time to a decoded CT per sampler.

1. Loop overhead: per-step time of ``maisi.sampling.denoise`` against a plain loop that calls the same
   MONAI networks (UNet + ControlNet) and the same MONAI scheduler (``maisi.sampling.make_scheduler``
   builds it with MAISI's arguments) directly, MAISI-style. Best of many short
   rounds, alternating which loop runs first (shared CPUs are noisy; noise only adds time).
2. Time to a decoded CT for DDPM-1000, DDIM-50 and rectified-flow-30 at full step counts: sampling is run
   in full when it takes at most ``--max-run-s``; otherwise the measured per-step time is multiplied by
   the step count (the table says which). Decoding uses the exact tiled decoder.

3. ``--compare``: one sample, (a) MAISI's way against (b) ours with the defaults, each variant in its own
   subprocess (a clean peak RSS): seconds per denoising step (ControlNet + UNet), end-to-end seconds (mask
   bit-planes, the timed steps, decode, HU), peak RSS, and the PSNR of each final HU image against (a).
   (a) = MAISI's loop written against MONAI (float32, eager, the ControlNet's mask embedding every step)
   and MAISI's decode (MONAI ``SlidingWindowInferer``, Gaussian, at MAISI's roi/overlap for the size; a
   latent no larger than the roi is decoded in one pass, as MAISI's ``dynamic_infer`` does). (b) =
   ``maisi.generation.plan``'s networks and defaults (:mod:`maisi.acceleration`, precision ``auto``, tiled
   decode within 1024 MiB). Extra variants: ``ours-fp32``, ``ours-channels-last``, ``ours-compile``,
   ``ours-nocache``. A warm-up step (not timed; compilation happens there) precedes the timed steps.

Random weights throughout (timing does not depend on them).

    python tools/bench_generate.py                              # tiny/small presets, CPU, ~5-10 minutes
    python tools/bench_generate.py --sizes 256 256 128 --presets maisi-ct-rflow --max-run-s 0
    python tools/bench_generate.py --compare                    # maisi-ct-rflow 256x256x128, 3 steps
    python tools/bench_generate.py --compare --variants maisi ours ours-compile --steps 2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from maisi.acceleration import Acceleration, accelerate
from maisi.conditioning import Conditions, binarize_labels
from maisi.device import autocast, autocast_dtype, resolve_device
from maisi.families.ct import COMPATIBLE_SAMPLERS, get_preset
from maisi.families.networks import RuntimeOptions, build_network
from maisi.intensity import unit_to_hu
from maisi.sampling import DEFAULT_STEPS, denoise, make_scheduler
from maisi.vae.codec import decode


@torch.no_grad()
def plain_loop(unet, controlnet, scheduler, noise, steps, inputs, control, generator) -> torch.Tensor:
    """MAISI's sampling loop written directly against MONAI."""
    if isinstance(scheduler, RFlowScheduler):
        scheduler.set_timesteps(steps, device=noise.device, input_img_size_numel=math.prod(noise.shape[2:]))
    else:
        scheduler.set_timesteps(steps, device=noise.device)
    timesteps = scheduler.timesteps
    next_timesteps = torch.cat(
        (timesteps[1:], torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device))
    )
    x = noise
    for t, next_t in zip(timesteps, next_timesteps):
        tt = torch.full((1,), float(t), device=noise.device)
        down, mid = controlnet(
            x=x,
            timesteps=tt,
            controlnet_cond=control,
            conditioning_scale=1.0,
            class_labels=inputs.get("class_labels"),
        )
        out = unet(
            x=x,
            timesteps=tt,
            **inputs,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )
        if isinstance(scheduler, RFlowScheduler):
            x = scheduler.step(out, t, x, next_t)[0]
        elif isinstance(scheduler, DDPMScheduler):
            x = scheduler.step(out, t, x, generator=generator)[0]
        else:
            x = scheduler.step(out, t, x)[0]
    return x


class Setup:
    """Random-weight networks of a preset, a noise latent, a label mask and the conditioning inputs."""

    def __init__(self, preset_name: str, size: tuple[int, int, int], device: torch.device) -> None:
        self.preset = get_preset(preset_name)
        torch.manual_seed(0)
        self.unet, self.controlnet, self.vae = (
            build_network(self.preset, p).to(device).eval()
            for p in ("diffusion_unet", "controlnet", "autoencoder")
        )
        f = self.preset.vae_factor
        self.noise = torch.randn(1, self.preset.latent_channels, *(s // f for s in size), device=device)
        labels = torch.randint(0, 133, (1, 1, *size), generator=torch.Generator().manual_seed(0))
        self.control = binarize_labels(labels).to(device)
        self.inputs = Conditions((1.5, 1.5, 2.0), "chest", "abdomen").network_inputs(self.preset, 1, device)
        self.device = device

    def ours(self, sampler: str, steps: int) -> float:
        t0 = time.perf_counter()
        denoise(
            self.unet,
            make_scheduler(self.preset.schedule, sampler),
            self.noise,
            steps,
            self.inputs,  # type: ignore[arg-type]
            controlnet=self.controlnet,
            control=self.control,
            generator=self._generator(),
            progress=False,
        )
        return time.perf_counter() - t0

    def plain(self, sampler: str, steps: int) -> float:
        t0 = time.perf_counter()
        plain_loop(
            self.unet,
            self.controlnet,
            make_scheduler(self.preset.schedule, sampler),  # MONAI's, with MAISI's arguments
            self.noise,
            steps,
            self.inputs,
            self.control,
            self._generator(),
        )
        return time.perf_counter() - t0

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(1)


def overhead(setup: Setup, sampler: str, steps: int, rounds: int) -> tuple[float, float]:
    """Best per-step seconds of (plain, ours) over ``rounds`` alternating rounds of ``steps`` steps."""
    setup.ours(sampler, 1), setup.plain(sampler, 1)  # warm-up (allocator, oneDNN primitives)
    plain, ours = [], []
    for r in range(rounds):
        pair = [(plain, setup.plain), (ours, setup.ours)]
        for store, run in pair if r % 2 == 0 else pair[::-1]:
            store.append(run(sampler, steps) / steps)
    return min(plain), min(ours)


# --- (a) MAISI's way vs (b) ours, one subprocess per variant ------------------------------------------------

# MAISI's decode settings per output size (its configs/config_infer_*.json): latent roi and overlap.
MAISI_DECODE = {(256, 256, 128): ((96, 96, 96), 0.25), (512, 512, 512): ((80, 80, 80), 0.4)}
VARIANTS = ("maisi", "ours", "ours-fp32", "ours-channels-last", "ours-compile", "ours-nocache")


def maisi_decode(vae, latents: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """MAISI's decode: MONAI SlidingWindowInferer at its settings, one pass when the latent fits the roi."""
    from monai.inferers import SlidingWindowInferer

    roi, overlap = MAISI_DECODE.get(tuple(size), ((80, 80, 80), 0.4))
    if math.prod(latents.shape[2:]) <= math.prod(roi):
        return vae.decode_stage_2_outputs(latents)
    inferer = SlidingWindowInferer(
        roi_size=[min(r, s) for r, s in zip(roi, latents.shape[2:])],
        sw_batch_size=1,
        overlap=overlap,
        mode="gaussian",
        sw_device=latents.device,
        device=torch.device("cpu"),
    )
    return inferer(latents, vae.decode_stage_2_outputs)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["peak_cuda_gib"] = out["peak_cuda_decode_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def run_variant(variant: str, args: argparse.Namespace, hu_path: Path | None) -> dict:
    """One sample of ``variant`` in this process; returns its timings and peak memory."""
    device = resolve_device(args.device)
    preset = get_preset(args.preset)
    size = tuple(args.size)
    torch.manual_seed(0)
    unet, controlnet, vae = (
        build_network(preset, part, RuntimeOptions.for_device(device)).to(device).eval()
        for part in ("diffusion_unet", "controlnet", "autoencoder")
    )
    ours = variant != "maisi"
    dtype = None
    if ours:
        acceleration = Acceleration.for_run("auto", device)
        if variant == "ours-compile":
            acceleration = Acceleration(compile=True)
        elif variant == "ours-channels-last":
            acceleration = Acceleration(channels_last=True)
        elif variant == "ours-nocache":
            acceleration = Acceleration(cache_condition=False)
        unet, controlnet = accelerate(unet, controlnet, device, acceleration)
        dtype = None if variant == "ours-fp32" else autocast_dtype("auto", device, cpu_bfloat16=True)
    elif device.type == "cuda":
        dtype = torch.float16  # MAISI runs its loop under torch.amp.autocast("cuda")
    # the decode as maisi.generation.plan runs it: float32 on CPU under "auto" (Models.decode_dtype)
    decode_dtype = autocast_dtype("auto", device) if ours and variant != "ours-fp32" else dtype
    f = preset.vae_factor
    noise = torch.randn(
        1, preset.latent_channels, *(s // f for s in size), generator=torch.Generator().manual_seed(0)
    )
    labels = torch.randint(0, 133, (1, 1, *size), generator=torch.Generator().manual_seed(0))
    inputs = Conditions((1.5, 1.5, 4.0), "chest", "abdomen").network_inputs(preset, 1, device)

    def sample(steps: int, control: torch.Tensor) -> torch.Tensor:
        scheduler = make_scheduler(preset.schedule, "rflow")
        if not ours:
            with autocast(device, dtype):
                return plain_loop(unet, controlnet, scheduler, noise.to(device), steps, inputs, control, None)
        return denoise(
            unet,
            scheduler,
            noise.to(device),
            steps,
            inputs,  # type: ignore[arg-type]
            controlnet=controlnet,
            control=control,
            autocast_dtype=dtype,
            progress=False,
        )

    control = binarize_labels(labels).to(device)
    t0 = _sync(device)
    sample(args.warmup, control)  # not timed: allocator, oneDNN primitives, compilation
    warmup_s = _sync(device) - t0
    del control
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = _sync(device)
    control = binarize_labels(labels).to(device)
    t1 = _sync(device)
    latents = sample(args.steps, control)
    t2 = _sync(device)
    del control
    stages = {}
    if device.type == "cuda":  # peak allocated per stage: sampling, then decoding
        stages["peak_cuda_sampling_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    if ours:
        image = decode(
            vae, latents, 1.0, method="tiled", memory_budget_bytes=1024 << 20, autocast_dtype=decode_dtype
        )
    else:
        with autocast(device, dtype):
            image = maisi_decode(vae, latents, size).float().cpu()
    t3 = _sync(device)
    hu = unit_to_hu(image[0, 0].numpy())
    t4 = _sync(device)
    if hu_path is not None:
        np.save(hu_path, hu)
    return {
        "variant": variant,
        "warmup_s": warmup_s,
        "per_step_s": (t2 - t1) / args.steps,
        "sampling_s": t2 - t1,
        "decode_s": t3 - t2,
        "end_to_end_s": t4 - t0,
        "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
        **peak_memory_gib(device),
        **stages,
    }


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB of two HU images over the [-1000, 1000] range."""
    mse = float(np.mean((reference.astype(np.float64) - image) ** 2))
    return math.inf if mse == 0 else 20 * math.log10(2000.0 / math.sqrt(mse))


def compare(args: argparse.Namespace) -> int:
    """Run each variant in its own subprocess and print the table with ratios against (a)."""
    print(
        f"(a) MAISI's way vs (b) ours: {args.preset}, image {args.size} (latent "
        f"{[s // 4 for s in args.size]}), {args.steps} timed steps after {args.warmup} warm-up, random "
        f"weights, device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            hu = Path(tmp) / f"{variant}.npy"
            cmd = [sys.executable, __file__, "--variant", variant, "--hu-out", str(hu)]
            cmd += ["--preset", args.preset, "--size", *map(str, args.size), "--device", args.device]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"variant {variant} failed:\n{done.stderr[-3000:]}")
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["hu"] = hu
            rows.append(row)
            print(f"  {variant}: done ({row['end_to_end_s']:.1f} s end to end)", flush=True)
        reference = np.load(rows[0]["hu"])
        for row in rows:
            row["psnr"] = psnr(reference, np.load(row["hu"]))
    base = rows[0]
    mem = "peak_cuda_gib" if "peak_cuda_gib" in base else "peak_rss_gib"
    print(
        f"\n{'variant':<20}{'dtype':<10}{'warm-up s':>10}{'s/step':>8}{'decode s':>10}{'end-to-end s':>14}"
        f"{'peak GiB':>10}{'speed-up':>10}{'peak x':>8}{'PSNR dB':>9}"
    )
    if "peak_cuda_sampling_gib" in base:
        for row in rows:
            row["peak_cuda_gib"] = max(row["peak_cuda_gib"], row["peak_cuda_sampling_gib"])
    for row in rows:
        print(
            f"{row['variant']:<20}{row['dtype']:<10}{row['warmup_s']:>10.1f}{row['per_step_s']:>8.2f}"
            f"{row['decode_s']:>10.1f}{row['end_to_end_s']:>14.1f}{row[mem]:>10.2f}"
            f"{base['end_to_end_s'] / row['end_to_end_s']:>10.2f}{row[mem] / base[mem]:>8.2f}"
            f"{row['psnr']:>9.1f}"
        )
    if "peak_cuda_sampling_gib" in base:
        print(f"\n{'variant':<20}{'sampling s':>11}{'peak GiB':>10}{'decode s':>10}{'peak GiB':>10}")
        for row in rows:
            print(
                f"{row['variant']:<20}{row['sampling_s']:>11.1f}{row['peak_cuda_sampling_gib']:>10.2f}"
                f"{row['decode_s']:>10.1f}{row['peak_cuda_decode_gib']:>10.2f}"
            )
    print(
        "peak = "
        + ("torch.cuda.max_memory_allocated" if mem == "peak_cuda_gib" else "peak RSS of the subprocess")
        + f"; speed-up and peak x against {base['variant']}; PSNR of the final HU image against "
        f"{base['variant']} (targets: ours >= 1.5x end to end, peak <= 0.5x, PSNR >= 40 dB)"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-ddpm", "tiny-rflow", "small-rflow"])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[64, 64, 64, 128, 128, 64],
        help="image sizes, three numbers each (multiples of the preset's spatial multiple)",
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="steps per overhead round; --compare: timed steps"
    )
    parser.add_argument(
        "--rounds", type=int, default=12, help="overhead rounds (the best is kept: noise only adds)"
    )
    parser.add_argument(
        "--max-run-s", type=float, default=60.0, help="run sampling in full up to this estimate"
    )
    parser.add_argument("--budget-mb", type=int, default=256, help="tiled decode memory budget (MiB)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compare", action="store_true", help="(a) MAISI's way vs (b) ours, see above")
    parser.add_argument("--variants", nargs="+", default=["maisi", "ours"], choices=VARIANTS)
    parser.add_argument("--preset", default="maisi-ct-rflow", help="--compare: the preset")
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 128], help="--compare: image size")
    parser.add_argument("--warmup", type=int, default=1, help="--compare: untimed warm-up steps")
    parser.add_argument(
        "--variant", choices=VARIANTS, help=argparse.SUPPRESS
    )  # the subprocess of one variant
    parser.add_argument("--hu-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args.variant, args, args.hu_out), default=str))
        return 0
    if args.compare:
        if args.variants[0] != "maisi":
            args.variants = ["maisi", *[v for v in args.variants if v != "maisi"]]
        return compare(args)
    device = resolve_device(args.device)
    sizes = [tuple(args.sizes[i : i + 3]) for i in range(0, len(args.sizes) - 2, 3)]
    print(
        f"generation benchmark, device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; random weights; mask mode (UNet + ControlNet)"
    )
    over, totals = [], []
    for name in args.presets:
        for size in sizes:
            setup = Setup(name, size, device)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            decode(setup.vae, setup.noise, 1.0, method="tiled", memory_budget_bytes=args.budget_mb << 20)
            decode_s = time.perf_counter() - t0
            for sampler in COMPATIBLE_SAMPLERS[setup.preset.schedule.kind]:
                # DDPM runs all 1000 steps or none (MONAI's scheduler cannot stride): its per-step cost is
                # timed on DDIM, the same networks and loop with another scheduler step
                timed = "ddim" if sampler == "ddpm" else sampler
                plain, ours = overhead(setup, timed, args.steps, args.rounds)
                over.append((name, sampler, size, plain, ours))
                steps = DEFAULT_STEPS[sampler]
                if ours * steps <= args.max_run_s:
                    sampling, how = setup.ours(sampler, steps), "measured"
                else:
                    sampling, how = ours * steps, f"{steps} x per-step"
                totals.append((name, sampler, steps, size, ours, sampling, decode_s, how))
                print(f"  {name} {sampler} {size}: done", flush=True)
    print(
        "\nsampling-loop overhead: per step, best of "
        f"{args.rounds} rounds of {args.steps} steps (target ours/plain <= 1.05)"
    )
    print(f"{'preset':<14}{'sampler':<8}{'image':<16}{'plain ms':>10}{'ours ms':>10}{'ours/plain':>12}")
    for name, sampler, size, plain, ours in over:
        print(
            f"{name:<14}{sampler:<8}{str(list(size)):<16}{plain * 1e3:>10.1f}{ours * 1e3:>10.1f}"
            f"{ours / plain:>12.3f}"
        )
    ratios = [o / p for *_, p, o in over]
    mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"geometric mean {mean:.3f} -> target {'met' if mean <= 1.05 else 'MISSED'}; "
        f"worst row {max(ratios):.3f} "
        "(rows scatter on both sides of 1: on shared CPUs that spread is timing noise)"
    )
    print("\ntime to a decoded CT (full step counts; 'N x per-step' = measured per-step time x N, not run)")
    print(
        f"{'preset':<14}{'sampler':<8}{'steps':>6}  {'image':<16}{'ms/step':>9}{'sampling s':>12}"
        f"{'decode s':>10}{'total s':>10}  how"
    )
    for name, sampler, steps, size, per_step, sampling, decode_s, how in totals:
        print(
            f"{name:<14}{sampler:<8}{steps:>6}  {str(list(size)):<16}{per_step * 1e3:>9.1f}{sampling:>12.1f}"
            f"{decode_s:>10.2f}{sampling + decode_s:>10.1f}  {how}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
