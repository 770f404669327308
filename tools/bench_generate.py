"""Benchmark generation: overhead of our sampling loop, and time to a decoded CT per sampler.

1. Loop overhead: per-step time of ``maisi.sampling.denoise`` against a plain loop that calls the same
   MONAI networks (UNet + ControlNet) and a MONAI scheduler built directly, MAISI-style. Best of many short
   rounds, alternating which loop runs first (shared CPUs are noisy; noise only adds time).
2. Time to a decoded CT for DDPM-1000, DDIM-50 and rectified-flow-30 at full step counts: sampling is run
   in full when it takes at most ``--max-run-s``; otherwise the measured per-step time is multiplied by
   the step count (the table says which). Decoding uses the exact tiled decoder.

Random weights throughout (timing does not depend on them).

    python tools/bench_generate.py                              # tiny/small presets, CPU, ~5-10 minutes
    python tools/bench_generate.py --sizes 256 256 128 --presets maisi-ct-rflow --max-run-s 0
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from maisi.conditioning import Conditions, binarize_labels
from maisi.decoding import decode
from maisi.device import resolve_device
from maisi.networks import build_network, get_preset
from maisi.sampling import COMPATIBLE_SAMPLERS, DEFAULT_STEPS, denoise, make_scheduler


def plain_scheduler(sampler: str, preset):
    """The MONAI scheduler as MAISI's own scripts build it (no maisi code involved)."""
    s = preset.schedule
    if sampler == "rflow":
        return RFlowScheduler(
            num_train_timesteps=s.num_train_timesteps,
            use_discrete_timesteps=False,
            use_timestep_transform=True,
            sample_method="uniform",
        )
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    return cls(
        num_train_timesteps=s.num_train_timesteps,
        schedule=s.beta_schedule,
        beta_start=s.beta_start,
        beta_end=s.beta_end,
        clip_sample=False,
        prediction_type="epsilon",
    )


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
            plain_scheduler(sampler, self.preset),
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
    parser.add_argument("--steps", type=int, default=2, help="steps per overhead round")
    parser.add_argument(
        "--rounds", type=int, default=12, help="overhead rounds (the best is kept: noise only adds)"
    )
    parser.add_argument(
        "--max-run-s", type=float, default=60.0, help="run sampling in full up to this estimate"
    )
    parser.add_argument("--budget-mb", type=int, default=256, help="tiled decode memory budget (MiB)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
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
                plain, ours = overhead(setup, sampler, args.steps, args.rounds)
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
