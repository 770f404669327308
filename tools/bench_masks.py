"""Benchmark ``maisi.masks index``: masks per second on synthetic masks, and what each field costs to read.

Writes N synthetic label masks (uint8, MAISI ids: a body box holding organ blocks at seeded positions) of
the requested size, then times, per mask:

- header only (``read_geometry``): enough for ``dim`` and ``spacing``;
- SHA-256 of the file: what a restart reads to keep an unchanged entry;
- full read + label counts (``read_mask``, one ``np.bincount`` pass): what ``label_list``, the regions
  and the voxel counts need;
- ``index`` from scratch with 1..W local workers, and a restart over the unchanged masks.

``label_list`` needs every voxel, so a fresh index cannot be header-only; a restart is (it hashes the
files and reads no voxels).

    python tools/bench_masks.py --num 16 --size 256 256 128 --workers 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from maisi.data.io import Volume, read_geometry, read_mask, write_volume
from maisi.files import file_sha256
from maisi.masks.database import build_database, label_counts, write_database

ORGANS = (1, 3, 4, 5, 14, 28, 30, 62, 93)  # liver, spleen, pancreas, kidneys, lung lobes, colon, femur


def synthetic_mask(size: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A body box (200) holding one block per organ at a seeded position (compressible, not trivial)."""
    mask = np.zeros(size, dtype=np.uint8)
    margin = [max(1, s // 10) for s in size]
    mask[tuple(slice(m, s - m) for m, s in zip(margin, size))] = 200
    for label in ORGANS:
        extent = [max(2, s // 6) for s in size]
        start = [int(rng.integers(m, max(m + 1, s - m - e))) for m, s, e in zip(margin, size, extent)]
        mask[tuple(slice(a, a + e) for a, e in zip(start, extent))] = label
    return mask


def make_masks(folder: Path, num: int, size: tuple[int, int, int], spacing: float, suffix: str) -> list[Path]:
    rng = np.random.default_rng(0)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return [
        write_volume(folder / f"mask_{i:04d}.{suffix}", Volume(synthetic_mask(size, rng), affine))
        for i in range(num)
    ]


def per_second(files: list[Path], work: Callable[[Path], object]) -> float:
    start = time.perf_counter()
    for path in files:
        work(path)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num", type=int, default=16, help="number of masks")
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 128], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic spacing in mm")
    parser.add_argument("--format", default="nii.gz", choices=("nii.gz", "nii", "nrrd", "mha"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    args = parser.parse_args()
    size = tuple(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = make_masks(folder / "masks", args.num, size, args.spacing, args.format)
        megabytes = sum(p.stat().st_size for p in files) / len(files) / 1e6
        print(f"{args.num} masks of {list(size)} uint8 voxels ({args.format}, {megabytes:.2f} MB per file)")
        print(f"  header only (dim, spacing)          {per_second(files, read_geometry):8.1f} masks/s")
        print(f"  SHA-256 (restart check)             {per_second(files, file_sha256):8.1f} masks/s")
        full = per_second(files, lambda p: label_counts(read_mask(p).array))
        print(f"  full read + counts (label_list)     {full:8.1f} masks/s")
        database = folder / "db.json"
        for workers in args.workers:
            report = build_database([folder / "masks"], database, workers=workers)
            rate = report.indexed / report.seconds
            print(
                f"  index, {workers} worker(s)                 {rate:8.1f} masks/s ({report.seconds:.2f} s)"
            )
        write_database(database, report.records)
        restart = build_database([folder / "masks"], database, workers=1)
        assert restart.kept == args.num, "a restart over unchanged masks must keep every entry"
        print(f"  restart, unchanged (1 worker)       {args.num / restart.seconds:8.1f} masks/s")


if __name__ == "__main__":
    main()
