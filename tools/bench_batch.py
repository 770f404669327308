"""Many masks on one machine: 1 process x 2 threads against ``torchrun --nproc_per_node=2`` x 1 thread.

Runs the batch config (``configs/inference_batch.json``: 4 masks x 2 seeds = 8 samples) both ways, each into a
fresh output folder, ``--reps`` times alternating, and prints samples per minute (wall clock of the whole
command, imports included: what a user waits for) and the load average at the start and the end::

    python tools/bench_batch.py [--config configs/inference_batch.json] [--steps 10] [--reps 1]
        [--nproc 2] [--threads 2]

``--steps`` overrides the config's number of denoising steps (0: the config's); every sample has one try of
the HU check, so both ways do the same work.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_config(source: Path, steps: int | None, folder: Path) -> tuple[Path, int]:
    """``source`` with absolute paths, one HU-check try, no previews, (``steps``) fewer steps; and the
    number of samples it asks for."""
    data = json.loads(source.read_text())
    base = source.parent.resolve()
    data["checkpoints"] = {k: str((base / v).resolve()) for k, v in data["checkpoints"].items() if v}
    data["masks"] = [str((base / m).resolve()) for m in data["masks"]]
    data["quality_check"] = {**data.get("quality_check", {}), "max_tries": 1}
    if steps is not None:
        data["sampling"] = {**data.get("sampling", {}), "num_inference_steps": steps}
    data["output"] = {**data.get("output", {}), "preview": False}
    path = folder / "config.json"
    path.write_text(json.dumps(data, indent=2))
    masks = sum(len(glob.glob(m)) for m in data["masks"])
    return path, masks * data.get("num_samples", 1)


def run(cmd: list[str], out: Path) -> float:
    """Wall seconds of ``cmd`` (exit 0 or 1: a sample failing its HU check is still generated)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run(cmd + ["--output-dir", str(out)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "inference_batch.json")
    parser.add_argument(
        "--steps", type=int, default=10, help="denoising steps (default: 10; 0: the config's)"
    )
    parser.add_argument("--reps", type=int, default=1, help="repetitions of each way (default: 1)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the single process (default: 2)")
    args = parser.parse_args()

    print(
        f"{args.config.name}, steps {args.steps or 'as configured'}, {args.reps} repetition(s), "
        f"{os.cpu_count()} CPUs, load average at start " + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        config, samples = bench_config(args.config, args.steps or None, Path(tmp))
        single = [sys.executable, "-m", "maisi.infer", "--config", str(config), "--no-progress"]
        ways = {
            f"1 process x {args.threads} threads": single + ["--threads", str(args.threads)],
            f"torchrun {args.nproc} processes x 1 thread": [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={args.nproc}",
                "-m",
                "maisi.infer",
                "--config",
                str(config),
                "--no-progress",
                "--threads",
                "1",
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for rep in range(args.reps):
            order = list(ways) if rep % 2 == 0 else list(reversed(ways))
            for name in order:
                seconds = run(ways[name], Path(tmp) / "out")
                times[name].append(seconds)
                print(
                    f"rep {rep} {name}: {seconds:.1f} s, {samples / seconds * 60:.2f} samples/min, "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    print()
    print("| way | samples | wall s (each rep) | samples per minute (best) |")
    print("|---|---|---|---|")
    for name, values in times.items():
        each = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {samples} | {each} | {samples / min(values) * 60:.2f} |")
    print("load average at end " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
