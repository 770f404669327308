"""``python -m maisi.labels``: edit label dictionaries and prepare masks for MAISI.

add       put a new class into a free dummy slot (or a given free id); prints the id
remap     convert a mask from another vocabulary (e.g. TotalSegmentator) to MAISI ids
envelope  add the body label 200 to a mask from its CT (and, on request, the lungs from its air)
crop      cut a CT and its mask to a box around some labels (e.g. a lesion)
resample  bring a mask to a spacing and/or size (nearest neighbour, centred pad/crop), as maisi.infer does;
          refuses a volume whose values are not label ids in 0..255 (a CT)
show      print a label dictionary
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from maisi.atomic import write_json
from maisi.cli import EXIT_INPUT, EXIT_OK, Command, add_subcommand, new_parser, run_subcommand, writes_nothing
from maisi.data.io import check_output_path, read_mask, read_volume, write_volume, write_volumes
from maisi.errors import InputError
from maisi.labels import (
    BODY_LABEL,
    MAX_LABEL,
    add_class,
    label_dict_json,
    load_label_dict,
    not_label_values,
)
from maisi.labels.crop import crop_pair
from maisi.labels.envelope import (
    DEFAULT_OPENING_MM,
    DEFAULT_THRESHOLD_HU,
    LUNG_AIR_HU,
    LUNG_LABELS,
    label_body,
)
from maisi.labels.mapping import BUILTIN_ALIASES, builtin_mappings, load_mapping, remap
from maisi.run_paths import RunPaths

PROG = "maisi.labels"
log = logging.getLogger(PROG)
THRESHOLD_RANGE = (-1000.0, 0.0)  # HU: between air and soft tissue, or the envelope is not the body
MAX_OPENING_MM = 50.0  # a larger opening erases the body itself


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, "Label dictionaries and masks for MAISI.")
    sub = parser.add_subparsers(dest="command", required=True)

    add = add_subcommand(sub, "add", help="add a class to a label dictionary and print its id")
    add.add_argument("--name", required=True, help='class name, e.g. "kidney tumor"')
    add.add_argument(
        "--id",
        type=int,
        default=None,
        help="a free id or dummy-slot id (default: the first free dummy slot; id 2, once a body-region "
        "marker, only when no other is left)",
    )
    add.add_argument(
        "--host",
        nargs="+",
        default=None,
        metavar="NAME",
        help='for a tumour-like class: the class(es) it lies in, e.g. "liver" or the lung lobes; what '
        "guidance and the contrastive loss put in its place (the majority neighbour when several)",
    )
    add.add_argument("--label-dict", default=None, help="dictionary to extend (default: MAISI's)")
    add.add_argument(
        "--output", default=None, help="where to write (default: in place; required for MAISI's)"
    )

    rm = add_subcommand(sub, "remap", help="convert a mask to MAISI ids through a mapping")
    rm.add_argument("--mask", required=True, help="the mask to convert (NIfTI, NRRD, MHA or a DICOM folder)")
    rm.add_argument(
        "--mapping",
        required=True,
        help=f"built-in ({', '.join([*BUILTIN_ALIASES, *builtin_mappings()])}) or a mapping JSON",
    )
    rm.add_argument("--output", required=True, help="the mask in MAISI ids (never one of the inputs)")
    rm.add_argument("--label-dict", default=None, help="target dictionary (default: MAISI's)")
    rm.add_argument("--strict", action="store_true", help="fail (exit 2) if any class present has no target")

    env = add_subcommand(sub, "envelope", help="label the body (200) where the mask is background")
    env.add_argument("--image", required=True, help="the CT (HU) the mask belongs to")
    env.add_argument("--mask", required=True, help="its mask in MAISI ids, on the same grid")
    env.add_argument("--output", required=True, help="the mask with the body label 200 added")
    env.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD_HU,
        help=f"air threshold in HU, in [{THRESHOLD_RANGE[0]:g}, {THRESHOLD_RANGE[1]:g}] "
        "(default: %(default)g)",
    )
    env.add_argument(
        "--opening-mm",
        type=float,
        default=DEFAULT_OPENING_MM,
        help=f"table-removal opening radius in mm, 0 to {MAX_OPENING_MM:g}; 0 disables it "
        "(default: %(default)g)",
    )
    env.add_argument(
        "--lungs-from-hu",
        type=int,
        default=None,
        metavar="ID",
        help=f"label the lungs from the CT as ID instead of body: unlabelled air below {LUNG_AIR_HU:g} HU "
        "inside the body, in the largest connected air component (and a second one of at least a fifth of "
        "its size); smaller air pockets (bowel gas) stay body. For masks without lung labels; MAISI's lung "
        f"lobes are {', '.join(map(str, LUNG_LABELS))} (e.g. 28)",
    )

    cr = add_subcommand(sub, "crop", help="cut a CT and its mask to a box centred on some labels")
    cr.add_argument("--image", required=True, help="the CT")
    cr.add_argument("--mask", required=True, help="its mask, on the same grid")
    cr.add_argument(
        "--around", required=True, nargs="+", type=int, metavar="ID", help="label id(s) to centre on"
    )
    cr.add_argument(
        "--size-mm", required=True, nargs=3, type=float, metavar=("X", "Y", "Z"), help="box size in mm"
    )
    cr.add_argument("--output-image", required=True, help="the cropped CT")
    cr.add_argument("--output-mask", required=True, help="the cropped mask")

    rs = add_subcommand(sub, "resample", help="resample a mask (nearest) to a spacing and/or pad or crop it")
    rs.add_argument("--mask", required=True, help="the mask (NIfTI, NRRD, MHA or a DICOM folder)")
    rs.add_argument("--output", required=True, help="the resampled mask")
    rs.add_argument(
        "--spacing",
        nargs=3,
        type=float,
        default=None,
        metavar=("SX", "SY", "SZ"),
        help="target voxel size in mm, labels resampled by nearest neighbour (default: the mask's)",
    )
    rs.add_argument(
        "--size",
        nargs=3,
        type=int,
        default=None,
        metavar=("X", "Y", "Z"),
        help="target size in voxels: centred padding with background 0 or cropping, after the resampling "
        "(default: what the resampling gives)",
    )

    show = add_subcommand(sub, "show", help="print a label dictionary as 'id name' lines")
    show.add_argument("--label-dict", default=None, help="the dictionary to print (default: MAISI's)")
    return parser


def _finite(value: float, option: str, low: float, high: float, unit: str) -> None:
    """Refuse a NaN, infinite or out-of-range number given as ``option``."""
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(f"{option} {value:g}: must be a number in [{low:g}, {high:g}] {unit}")


def cmd_add(args: argparse.Namespace) -> int:
    if args.label_dict is None and args.output is None:
        raise InputError("--output is required when extending MAISI's packaged dictionary")
    option = "--output" if args.output else "--label-dict"  # without --output it writes in place
    output = check_output_path(args.output or args.label_dict, option, volume=False)
    label_dict = load_label_dict(args.label_dict)
    updated, label_id = add_class(label_dict, args.name, args.id, args.host)
    write_json(output, label_dict_json(updated))
    log.info("'%s' -> id %d, written to %s", args.name, label_id, output)
    print(label_id)
    return EXIT_OK


def cmd_remap(args: argparse.Namespace) -> int:
    inputs = {"--mask": args.mask, "--mapping": args.mapping, "--label-dict": args.label_dict}
    check_output_path(args.output, "--output", inputs)
    label_dict = load_label_dict(args.label_dict)
    mapping = load_mapping(args.mapping, label_dict)
    mask = read_mask(args.mask)
    try:
        remapped, report = remap(mask.array, mapping)
    except InputError as e:
        raise InputError(f"{args.mask}: {e}") from None
    for line in report.lines():
        print(line)
    if args.strict and not report.complete:
        print(
            f"{PROG}: error: {args.mask}: {len(report.unmapped) + len(report.unknown_ids)} class(es) present "
            "have no MAISI target (see UNMAPPED/UNKNOWN above); nothing written",
            file=sys.stderr,
        )
        return EXIT_INPUT
    write_volume(args.output, mask.with_array(remapped))
    if not report.complete:
        log.warning(
            "%d class(es) without a MAISI target were set to background; see the lines above",
            len(report.unmapped) + len(report.unknown_ids),
        )
    log.info("wrote %s", args.output)
    return EXIT_OK


def cmd_envelope(args: argparse.Namespace) -> int:
    _finite(args.threshold, "--threshold", *THRESHOLD_RANGE, "HU")
    _finite(args.opening_mm, "--opening-mm", 0.0, MAX_OPENING_MM, "mm")
    lung = args.lungs_from_hu
    if lung is not None and not (0 < lung <= MAX_LABEL and lung != BODY_LABEL):
        raise InputError(f"--lungs-from-hu {lung}: must be a label id in 1..{MAX_LABEL}, not {BODY_LABEL}")
    check_output_path(args.output, "--output", {"--image": args.image, "--mask": args.mask})
    ct, mask = read_volume(args.image), read_mask(args.mask)
    labelled, report = label_body(mask, ct, args.threshold, args.opening_mm, lung)
    write_volume(args.output, labelled)
    share, air = 100.0 * report.body_added / labelled.array.size, 100.0 * report.body_air_fraction
    print(
        f"added body label to {report.body_added} voxels ({share:.1f}% of the volume; "
        f"{air:.1f}% of them below {LUNG_AIR_HU:g} HU)"
    )
    if lung is not None:
        ml = report.lung_added * math.prod(labelled.spacing) / 1000.0
        print(
            f"labelled {report.lung_added} voxels ({ml:.0f} mL) of air in {report.lung_components} "
            f"component(s) as lung id {lung}"
        )
    if report.warning():
        log.warning("%s", report.warning())
    return EXIT_OK


def cmd_crop(args: argparse.Namespace) -> int:
    inputs = {"--image": args.image, "--mask": args.mask}
    check_output_path(args.output_image, "--output-image", inputs)
    check_output_path(args.output_mask, "--output-mask", {**inputs, "--output-image": args.output_image})
    for size in args.size_mm:
        _finite(size, "--size-mm", 0.0, math.inf, "mm")
    ct, mask = read_volume(args.image), read_mask(args.mask)
    try:
        ct_box, mask_box = crop_pair(ct, mask, args.around, tuple(args.size_mm))
    except InputError as e:
        raise InputError(f"{args.mask}: {e}") from None
    write_volumes([(args.output_image, ct_box), (args.output_mask, mask_box)])  # both or neither
    mm = [round(n * s, 1) for n, s in zip(mask_box.shape, mask_box.spacing)]
    print(f"cropped to {list(mask_box.shape)} voxels ({mm} mm) around labels {args.around}")
    return EXIT_OK


def cmd_resample(args: argparse.Namespace) -> int:
    from maisi.masks.database import label_counts
    from maisi.masks.resample import resample_mask  # MONAI's transforms: imported after parsing

    if args.spacing is None and args.size is None:
        raise InputError("give --spacing, --size or both")
    for value in args.spacing or ():
        _finite(value, "--spacing", 1e-3, 100.0, "mm")
    for value in args.size or ():
        if not 1 <= value <= 2048:
            raise InputError(f"--size {value}: must be a whole number in 1..2048")
    check_output_path(args.output, "--output", {"--mask": args.mask})
    mask = read_mask(args.mask)
    problem = not_label_values(mask.array)
    if problem:
        raise InputError(f"{args.mask}: {problem}; nothing written")
    out, record = resample_mask(mask, args.spacing, args.size)
    before = [round(s, 4) for s in mask.spacing]
    lost = sorted(set(label_counts(mask.array)[0].tolist()) - set(label_counts(out.array)[0].tolist()))
    write_volume(args.output, out)
    after = [round(s, 4) for s in out.spacing]
    print(f"{list(mask.shape)} at {before} mm -> {list(out.shape)} at {after} mm")
    if lost:
        log.warning("labels no longer present after resampling: %s", lost)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    label_dict = load_label_dict(args.label_dict)
    for name, label_id in sorted(label_dict.items(), key=lambda item: item[1]):
        host = label_dict.hosts.get(name)
        print(f"{label_id:3d} {name}" + (f" (host: {', '.join(host)})" if host else ""))
    return EXIT_OK


def paths_add(args: argparse.Namespace) -> RunPaths:
    if args.output is None:  # in place: the dictionary is rewritten on purpose
        return RunPaths().write("--label-dict", args.label_dict)
    return RunPaths().read("--label-dict", args.label_dict).write("--output", args.output)


def paths_remap(args: argparse.Namespace) -> RunPaths:
    mapping = args.mapping if Path(args.mapping).exists() else None  # else a built-in name
    paths = RunPaths().read("--mask", args.mask).read("--mapping", mapping)
    return paths.read("--label-dict", args.label_dict).write("--output", args.output)


def paths_envelope(args: argparse.Namespace) -> RunPaths:
    return RunPaths().read("--image", args.image).read("--mask", args.mask).write("--output", args.output)


def paths_crop(args: argparse.Namespace) -> RunPaths:
    paths = RunPaths().read("--image", args.image).read("--mask", args.mask)
    return paths.write("--output-image", args.output_image).write("--output-mask", args.output_mask)


def paths_resample(args: argparse.Namespace) -> RunPaths:
    return RunPaths().read("--mask", args.mask).write("--output", args.output)


COMMANDS = {
    "add": Command(cmd_add, paths_add),
    "remap": Command(cmd_remap, paths_remap),
    "envelope": Command(cmd_envelope, paths_envelope),
    "crop": Command(cmd_crop, paths_crop),
    "resample": Command(cmd_resample, paths_resample),
    "show": Command(cmd_show, writes_nothing),
}


def main(argv: list[str] | None = None) -> int:
    return run_subcommand(PROG, build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
