"""Torch threads on a shared machine: ``--threads 1``, ``2`` and ``auto`` on the quick-start generation.

Each variant runs ``python -m maisi.infer`` in a fresh process (the import counted in "wall", not in
"generate", which is the sample's own ``timings_s.total``), interleaved: every repetition runs every variant
in a rotated order, once on the machine as it is and once beside ``--busy`` busy-looping processes this
script starts (and stops) itself. Prints a table (min / median / max of the repetitions), the ratio of auto
to the best fixed choice (by median) in both conditions, and the load average at the start and the end::

    python tools/bench_threads.py [--config configs/inference.json] [--reps 3] [--steps 10] [--busy 2]
        [--variants 1 2 auto 2+active]

With more than one thread maisi sets ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep while they wait instead
of spinning) unless the environment sets it; ``2+active`` is 2 threads with ``OMP_WAIT_POLICY=ACTIVE``
(always spinning), ``2+passive`` says PASSIVE explicitly. ``--steps`` overrides the config's number of
denoising steps (the quick start's 30 take minutes per run with 2 spinning threads on loaded cores).
Every variant generates the same sample (seed 0, one try).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _busy_loop() -> None:
    while True:
        pass


def start_busy(count: int) -> list[multiprocessing.Process]:
    """``count`` processes that keep one core each busy until stopped."""
    procs = [multiprocessing.Process(target=_busy_loop, daemon=True) for _ in range(count)]
    for p in procs:
        p.start()
    return procs


def stop_busy(procs: list[multiprocessing.Process]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.join()


def bench_config(source: Path, steps: int | None, folder: Path) -> Path:
    """``source`` with absolute paths, one try of the HU check and (``steps``) fewer steps, in ``folder``."""
    data = json.loads(source.read_text())
    base = source.parent.resolve()
    data["checkpoints"] = {k: str((base / v).resolve()) for k, v in data["checkpoints"].items() if v}
    for key in ("mask", "label_dict"):
        if data.get(key):
            data[key] = str((base / data[key]).resolve())
    if "masks" in data:
        data["masks"] = [str((base / m).resolve()) for m in data["masks"]]
    data["quality_check"] = {**data.get("quality_check", {}), "max_tries": 1}
    if steps is not None:
        data["sampling"] = {**data.get("sampling", {}), "num_inference_steps": steps}
    data["output"] = {**data.get("output", {}), "preview": False}
    path = folder / "config.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def run_variant(config: Path, variant: str, out: Path) -> dict:
    """One generation with ``variant`` threads in a fresh process: wall seconds, the sample's own
    generation seconds and the threads it recorded."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    threads, _, policy = variant.partition("+")
    if policy:  # e.g. "2+active": OpenMP threads spin while they wait, as OMP_WAIT_POLICY=ACTIVE
        env["OMP_WAIT_POLICY"] = policy.upper()
    cmd = [sys.executable, "-m", "maisi.infer", "--config", str(config), "--output-dir", str(out)]
    cmd += ["--threads", threads, "--no-progress", "--device", "cpu"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: the sample failed its HU check, it was still generated
        raise SystemExit(f"{variant}: exit {done.returncode}\n{done.stderr[-3000:]}")
    meta = json.loads(next(out.glob("*_seed0.json")).read_text())
    return {"wall": wall, "generate": meta["timings_s"]["total"], "reason": meta["threads"]["reason"]}


def summary(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "inference.json")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every variant (default: 3)")
    parser.add_argument(
        "--steps", type=int, default=10, help="denoising steps (default: 10; 0: the config's)"
    )
    parser.add_argument("--busy", type=int, default=2, help="busy-looping processes of the loaded condition")
    parser.add_argument("--variants", nargs="+", default=["1", "2", "auto"])
    args = parser.parse_args()

    conditions = ["as is", f"+{args.busy} busy"]
    results: dict[tuple[str, str], list[dict]] = {(c, v): [] for c in conditions for v in args.variants}
    load_start = os.getloadavg()
    print(
        f"config {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}, "
        f"steps {args.steps or 'as configured'}, {args.reps} repetitions, {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable), load average at start "
        + " ".join(f"{x:.1f}" for x in load_start),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        config = bench_config(args.config, args.steps or None, Path(tmp))
        for rep in range(args.reps):
            for condition in conditions:
                busy = start_busy(args.busy) if condition != "as is" else []
                try:
                    if busy:
                        time.sleep(2)  # the busy loops running before the variants start
                    shift = rep % len(args.variants)
                    for variant in args.variants[shift:] + args.variants[:shift]:
                        out = Path(tmp) / f"out_{rep}_{len(busy)}_{variant}"
                        result = run_variant(config, variant, out)
                        results[(condition, variant)].append(result)
                        print(
                            f"rep {rep} {condition:>8} threads {variant:>9}: wall {result['wall']:6.1f} s, "
                            f"generate {result['generate']:6.1f} s ({result['reason']}), "
                            f"load {os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
                finally:
                    stop_busy(busy)
    load_end = os.getloadavg()
    print()
    print(
        "| condition | threads | chosen (last run) | generate s min / median / max "
        "| wall s min / median / max |"
    )
    print("|---|---|---|---|---|")
    for condition in conditions:
        for variant in args.variants:
            rows = results[(condition, variant)]
            generate, wall = summary([r["generate"] for r in rows]), summary([r["wall"] for r in rows])
            print(f"| {condition} | {variant} | {rows[-1]['reason']} | {generate} | {wall} |")
    print()
    for condition in conditions:
        fixed = [v for v in args.variants if v != "auto"]
        for measure in ("generate", "wall"):
            medians = {
                v: statistics.median(r[measure] for r in results[(condition, v)]) for v in args.variants
            }
            best = min(fixed, key=lambda v: medians[v])
            ratio = medians["auto"] / medians[best] if "auto" in medians else float("nan")
            print(
                f"{condition}: auto / best fixed ({best}) by median {measure} = {ratio:.2f}"
                f" {'(within 1.1x)' if ratio <= 1.1 else '(NOT within 1.1x)'}"
            )
    print("load average at end " + " ".join(f"{x:.1f}" for x in load_end))
    return 0


if __name__ == "__main__":
    sys.exit(main())
