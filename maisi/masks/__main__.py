"""``python -m maisi.masks``: mask databases in MAISI's candidate format.

    index  build or update a database from folders / globs of masks in MAISI ids (restartable;
           ``--workers N`` local processes, or ``torchrun --nproc_per_node=N -m maisi.masks index ...``)
    show   summarise a database: entries, classes, body regions, dim / spacing / FOV ranges
    query  print the masks a request would use (path, FOV, score terms), reproducibly for a seed
    sizes  add each case's size vector (``anatomy_size``, the mask diffusion stage's conditioning) to a
           datalist, ranked against a size reference (``--reference``) or one built from these masks
           (``--build-reference``)

Exit codes: 0 success, 2 bad input (one message naming the file, key or value; nothing written),
1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from maisi.cli import EXIT_OK, Command, add_subcommand, new_parser, run_subcommand, writes_nothing
from maisi.errors import InputError
from maisi.options import REGION_INDEX
from maisi.run_paths import RunPaths

PROG = "maisi.masks"
log = logging.getLogger(PROG)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, "Mask databases in MAISI's candidate format.")
    sub = parser.add_subparsers(dest="command", required=True)

    idx = add_subcommand(sub, "index", help="build or update a database from masks in MAISI ids")
    idx.add_argument("--masks", required=True, nargs="+", metavar="SRC", help="folders (recursive) or globs")
    idx.add_argument("--output", required=True, help="the database JSON (updated in place if it exists)")
    idx.add_argument(
        "--mask-root", default=None, help="folder mask paths are relative to (default: --output's)"
    )
    idx.add_argument(
        "--label-dict", default=None, help="ids the masks may hold (default: MAISI's dictionary)"
    )
    idx.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    idx.add_argument(
        "--skip-bad", action="store_true", help="list bad masks and leave them out (default: exit 2)"
    )
    idx.add_argument(
        "--allow-no-body",
        action="store_true",
        help="index masks without the body label 200 that hold MAISI's dummy slots (default: refused as "
        "masks still in TotalSegmentator ids; convert them with python -m maisi.labels remap)",
    )

    for name, text in (("show", "summarise a database"), ("query", "print the masks a request would use")):
        cmd = add_subcommand(sub, name, help=text)
        cmd.add_argument("--database", required=True, help="database JSON (ours or MAISI's released file)")
        cmd.add_argument(
            "--mask-root", default=None, help="folder mask paths are relative to (default: its own)"
        )
        cmd.add_argument("--label-dict", default=None, help="name -> id JSON (default: MAISI's dictionary)")
        cmd.add_argument("--json", action="store_true", help="print JSON instead of text")
        if name == "query":
            cmd.add_argument("--anatomy", nargs="+", default=[], metavar="NAME", help="label names to hold")
            cmd.add_argument(
                "--region",
                nargs="+",
                default=[],
                metavar="NAME",
                help=f"body regions ({', '.join(REGION_INDEX)})",
            )
            cmd.add_argument(
                "--output-size",
                required=True,
                nargs=3,
                type=int,
                metavar=("X", "Y", "Z"),
                help="output grid, voxels",
            )
            cmd.add_argument(
                "--spacing",
                required=True,
                nargs=3,
                type=float,
                metavar=("SX", "SY", "SZ"),
                help="output spacing, mm",
            )
            cmd.add_argument("--num", type=int, default=1, help="number of samples")
            cmd.add_argument(
                "--seed", type=int, default=0, help="seed of the draw among the best-ranked masks"
            )

    sizes = add_subcommand(sub, "sizes", help="add each case's 10-slot size vector to a datalist")
    sizes.add_argument("--datalist", required=True, help="KiTS-style datalist whose cases have labels")
    sizes.add_argument("--output", required=True, help="the datalist to write, each case with anatomy_size")
    sizes.add_argument(
        "--data-root", default=None, help="folder the datalist's paths are relative to (default: its own)"
    )
    ref = sizes.add_mutually_exclusive_group(required=True)
    ref.add_argument(
        "--reference", help="size reference JSON (sorted volumes in mL per slot) to rank against"
    )
    ref.add_argument(
        "--build-reference", metavar="OUT_JSON", help="build the reference from these masks and write it here"
    )
    return parser


def cmd_index(args: argparse.Namespace) -> int:
    import torch  # the library reads volumes and may run under torchrun: imported after parsing

    from maisi.distributed import finish, init_from_env
    from maisi.labels import load_label_dict
    from maisi.masks.database import index_masks

    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: expected at least 1")
    label_dict = load_label_dict(args.label_dict)
    ranks = init_from_env(torch.device("cpu"))
    try:
        report = index_masks(
            args.masks,
            args.output,
            mask_root=args.mask_root,
            label_dict=label_dict,
            workers=args.workers,
            skip_bad=args.skip_bad,
            allow_no_body=args.allow_no_body,
            ranks=ranks,
            show_progress=True,
        )
    finally:
        finish(ranks)
    if not ranks.is_main:
        return EXIT_OK
    for _, reason in report.bad:
        log.warning("skipped: %s", reason)
    done = report.indexed + report.kept
    rate = report.indexed / report.seconds if report.seconds > 0 else 0.0
    print(
        f"wrote {args.output}: {len(report.records)} entries ({report.indexed} indexed, "
        f"{report.kept} unchanged kept, {len(report.dropped)} gone dropped, {len(report.bad)} bad skipped) "
        f"in {report.seconds:.1f} s ({rate:.2f} indexed masks/s, {done} masks)"
    )
    return EXIT_OK


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"database  {summary['database']} (masks under {summary['mask_root']})")
    print(f"entries   {summary['entries']}")
    for key, unit in (("dim", "voxels"), ("spacing_mm", "mm"), ("fov_mm", "mm")):
        value = summary[key]
        if value:
            print(f"{key:<9} {value['min']} .. {value['max']} {unit}")
    print("regions   " + ", ".join(f"{span}: {n}" for span, n in summary["regions"].items()))
    print(f"classes   {len(summary['classes'])} (id, name, entries holding it)")
    for item in summary["classes"]:
        print(f"  {item['id']:3d} {item['name']:<40} {item['entries']}")


def cmd_show(args: argparse.Namespace) -> int:
    from maisi.labels import load_label_dict
    from maisi.masks.database import load_database, summarise

    label_dict = load_label_dict(args.label_dict)
    summary = summarise(load_database(args.database, args.mask_root), label_dict)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return EXIT_OK


def _candidate_json(sample: int | None, c: Any) -> dict[str, Any]:
    e = c.entry
    return {
        **({"sample": sample} if sample is not None else {}),
        "path": e.path,
        "rank": c.rank,
        "dim": list(e.dim),
        "spacing": list(e.spacing),
        "fov_mm": [round(v, 1) for v in e.fov_mm],
        "score": round(c.score, 4),
        "fov_term": round(c.fov_term, 4),
        "dim_term": round(c.dim_term, 4),
        "spacing_term": round(c.spacing_term, 4),
    }


def cmd_query(args: argparse.Namespace) -> int:
    from maisi.labels import load_label_dict
    from maisi.masks.database import load_database
    from maisi.masks.retrieval import select_masks

    for value in args.spacing:
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"--spacing {value:g}: expected 3 finite voxel sizes > 0 mm")
    label_dict = load_label_dict(args.label_dict)
    db = load_database(args.database, args.mask_root)
    selection = select_masks(
        db, args.anatomy, args.region, args.output_size, args.spacing, args.num, args.seed, label_dict
    )
    if args.json:
        print(json.dumps({"picks": [_candidate_json(i, c) for i, c in enumerate(selection.picks)]}, indent=2))
        return EXIT_OK
    fov = [round(n * s, 1) for n, s in zip(args.output_size, args.spacing)]
    print(
        f"request: anatomy {args.anatomy} within {args.region or 'any region'}, output {args.output_size} at "
        f"{args.spacing} mm (FOV {fov} mm), {args.num} sample(s), seed {args.seed}"
    )
    print(
        f"{selection.matched} of {len(db.entries)} entries pass the filter, {len(selection.ranked)} are "
        f"large enough; drawing from the best {selection.pool_size}"
    )
    for i, c in enumerate(selection.picks):
        e = c.entry
        print(
            f"sample {i}: {db.mask_path(e)}  rank {c.rank}/{len(selection.ranked)}  dim {list(e.dim)}  "
            f"spacing {[round(s, 3) for s in e.spacing]} mm  FOV {[round(v, 1) for v in e.fov_mm]} mm  "
            f"{c.why()}"
        )
    return EXIT_OK


def _case_volumes(data: dict[str, Any], root: Path) -> tuple[list[Any], list[str]]:
    """The 10 slot volumes (mL) of every case's label; every problem found (no label, missing, unreadable)."""
    from maisi.data.io import read_mask
    from maisi.masks.sizes import organ_volumes_ml

    volumes, problems = [], []
    for i, entry in enumerate(data["training"]):
        if not entry.get("label"):
            problems.append(f"$.training[{i}].label: the case has no label; sizes are measured on labels")
            continue
        path = root / entry["label"]
        if not path.is_file():
            problems.append(f"$.training[{i}].label: file not found: {path}")
            continue
        try:
            mask = read_mask(path)
        except InputError as e:
            problems.append(f"$.training[{i}].label: {e}")
            continue
        volumes.append(organ_volumes_ml(mask.array, mask.spacing))
    return volumes, problems


def cmd_sizes(args: argparse.Namespace) -> int:
    import os

    import numpy as np

    from maisi.atomic import write_json
    from maisi.data.datalist import data_root, read_datalist, write_datalist
    from maisi.masks.sizes import (
        SIZE_SLOTS,
        build_size_reference,
        load_size_reference,
        reference_json,
        size_of_volume,
    )

    output = Path(args.output)  # checked with every input by paths_sizes
    data = read_datalist(args.datalist)
    root = data_root(args.datalist, args.data_root)
    reference = load_size_reference(args.reference) if args.reference else None
    volumes, problems = _case_volumes(data, root)
    if problems:
        raise InputError(
            f"{args.datalist}: cannot measure sizes ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    if reference is None:
        reference = build_size_reference(np.stack(volumes))
    entries = []
    base = output.parent
    for i, (entry, case) in enumerate(zip(data["training"], volumes)):
        try:
            sizes = [size_of_volume(s, float(v), reference) for s, v in zip(SIZE_SLOTS, case)]
        except InputError as e:
            raise InputError(f"{args.reference}: case $.training[{i}] ({entry['label']}): {e}") from None
        moved = {  # paths stay right when the output datalist lives in another folder
            key: Path(os.path.relpath((root / entry[key]).resolve(), base.resolve())).as_posix()
            for key in ("image", "label")
            if entry.get(key)
        }
        entries.append({**entry, **moved, "anatomy_size": [round(v, 6) for v in sizes]})
    write_datalist(output, {**data, "training": entries})  # schema-checked before anything is written
    if args.build_reference:
        described = f"organ volumes (mL) of the {len(volumes)} labels of {args.datalist}"
        write_json(args.build_reference, reference_json(reference, described))
    present = {s: int(sum(1 for c in volumes if c[k] > 0)) for k, s in enumerate(SIZE_SLOTS)}
    print(
        f"wrote {output}: {len(entries)} cases with anatomy_size"
        + (
            f"; reference {args.build_reference}"
            if args.build_reference
            else f" (reference {args.reference})"
        )
    )
    print("cases holding each slot: " + ", ".join(f"{s} {n}" for s, n in present.items()))
    return EXIT_OK


def paths_index(args: argparse.Namespace) -> RunPaths:
    """The masks found (the database may live among them, not on one); --output is read and updated."""
    from maisi.masks.database import find_mask_files

    paths = RunPaths().read("--label-dict", args.label_dict)
    for path in find_mask_files(args.masks):
        paths.read("--masks", path)
    return paths.write("--output", args.output)


def paths_sizes(args: argparse.Namespace) -> RunPaths:
    """The datalist, its images and labels, the reference; the output datalist and reference."""
    from maisi.data.datalist import data_root, read_datalist

    paths = RunPaths().read("--datalist", args.datalist).read("--reference", args.reference)
    data = read_datalist(args.datalist)
    root = data_root(args.datalist, args.data_root)
    for i, entry in enumerate(data["training"]):
        for key in ("image", "label"):
            if isinstance(entry.get(key), str):
                paths.read(f"$.training[{i}].{key} of --datalist", root / entry[key])
    return paths.write("--output", args.output).write("--build-reference", args.build_reference)


COMMANDS = {
    "index": Command(cmd_index, paths_index),
    "show": Command(cmd_show, writes_nothing),
    "query": Command(cmd_query, writes_nothing),
    "sizes": Command(cmd_sizes, paths_sizes),
}


def main(argv: list[str] | None = None) -> int:
    return run_subcommand(PROG, build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
