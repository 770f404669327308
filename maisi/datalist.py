"""``python -m maisi.datalist``: build and validate KiTS-style datalists.

build     walk a folder of image/label pairs: dim and spacing from the headers, body regions from the
          labels, modality, seeded k-fold split
validate  check every entry (files, grids, labels, header facts, folds) and list all problems
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from maisi.cli import EXIT_INPUT, EXIT_OK, Command, add_subcommand, new_parser, run_subcommand, writes_nothing
from maisi.options import Modality
from maisi.run_paths import RunPaths

PROG = "maisi.datalist"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, "KiTS-style datalists for maisi.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = add_subcommand(sub, "build", help="build a datalist from a folder of image/label pairs")
    build.add_argument("--root", required=True, help="data folder")
    build.add_argument("--images", required=True, help="glob under --root, e.g. '*/imaging.nii.gz'")
    build.add_argument(
        "--labels", default=None, help="glob pairing by the '*' parts, e.g. '*/segmentation.nii.gz'"
    )
    build.add_argument("--output", required=True, help="datalist JSON to write (paths become relative to it)")
    build.add_argument("--num-folds", type=int, default=5, help="cases are split into this many folds")
    build.add_argument("--seed", type=int, default=0, help="seed of the fold split")
    build.add_argument("--modality", default="ct", choices=get_args(Modality), help="modality of every case")
    build.add_argument("--label-dict", default=None, help="default: MAISI's")
    val = add_subcommand(sub, "validate", help="check every entry of a datalist")
    val.add_argument("--datalist", required=True, help="the datalist JSON to check")
    val.add_argument("--root", default=None, help="data root (default: the datalist's folder)")
    val.add_argument("--num-folds", type=int, default=None, help="expected number of folds")
    val.add_argument("--label-dict", default=None, help="default: MAISI's")
    return parser


def cmd_build(args: argparse.Namespace) -> int:
    from maisi.data.datalist import build_datalist, write_datalist  # reads volumes: imported after parsing
    from maisi.labels import load_label_dict

    data = build_datalist(
        args.root,
        args.images,
        args.labels,
        args.output,
        load_label_dict(args.label_dict),
        num_folds=args.num_folds,
        seed=args.seed,
        modality=args.modality,
    )
    write_datalist(args.output, data)
    folds = sorted({e["fold"] for e in data["training"]})
    print(f"wrote {args.output}: {len(data['training'])} cases in folds {folds}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from maisi.data.datalist import read_datalist, validate_datalist  # reads volumes: imported after parsing
    from maisi.labels import load_label_dict

    data = read_datalist(args.datalist)
    root = Path(args.root) if args.root else Path(args.datalist).resolve().parent
    problems = validate_datalist(data, root, load_label_dict(args.label_dict), args.num_folds)
    if problems:
        print(f"{PROG}: error: {args.datalist}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_INPUT
    print(f"{args.datalist}: {len(data['training'])} cases, no problems")
    return EXIT_OK


def paths_build(args: argparse.Namespace) -> RunPaths:
    """Every file the globs match under --root (the datalist may live in --root, not on one of them)."""
    paths = RunPaths().read("--label-dict", args.label_dict)
    root = Path(args.root)
    for option, pattern in (("--images", args.images), ("--labels", args.labels)):
        try:
            matches = sorted(root.glob(pattern)) if pattern and root.is_dir() else []
        except ValueError:  # a pattern glob refuses: the run says so
            matches = []
        for path in matches:
            paths.read(f"{option} match", path)
    return paths.write("--output", args.output)


COMMANDS = {"build": Command(cmd_build, paths_build), "validate": Command(cmd_validate, writes_nothing)}


def main(argv: list[str] | None = None) -> int:
    return run_subcommand(PROG, build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
