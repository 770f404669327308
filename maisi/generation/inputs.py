"""The inputs of a generation job: one config, or many masks ($.masks, $.datalist), each run as mask mode.

A job of many masks becomes one single-mask config per mask (the batch keys cleared), plus a file-name stem
per mask that is unique within the job. Expanding reads no volume (the checks of the masks themselves are
:func:`maisi.generation.plan.plan_generation`'s) and imports no torch.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from maisi.config import InferConfig
from maisi.files import why_absent

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
GLOB_CHARS = re.compile(r"[*?\[]")
UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")  # what $.output.prefix allows


@dataclass(frozen=True)
class GenerationInput:
    """One input of a job: the config it runs with and the stem of its samples' file names.

    Attributes:
        config: the job's config, with ``mask`` set to this input's mask and the batch keys cleared (a
            job of one input: the job's config itself).
        stem: unique within the job; None for a job of one input (its samples keep the names
            ``<prefix>_seed<N>``).
        source: where the job's config names this input, for messages (e.g. ``$.masks[1] ('a/*.nii.gz')``).
    """

    config: InferConfig
    stem: str | None
    source: str


def expand_inputs(config: InferConfig) -> tuple[list[GenerationInput], list[str]]:
    """The job's inputs, in a fixed order: listed paths and glob matches (sorted) in the order of $.masks,
    or the datalist's selected cases in its order; a mask named twice is used once.

    Returns:
        The inputs found, and the problems: every pattern that matches nothing, every listed file that does
        not exist, every selected datalist case without a label, a fold without cases.

    Raises:
        InputError: the datalist cannot be read (or is not a datalist).
    """
    if not config.is_batch:
        return [GenerationInput(config, None, "$.mask" if config.mask else "$")], []
    found, problems = _from_masks(config) if config.masks is not None else _from_datalist(config)
    unique: dict[object, tuple[Path, str]] = {}
    for path, source in found:  # one file under two names (symlinks, hard links) is one input
        try:
            st = path.stat()
            identity: object = (st.st_dev, st.st_ino)
        except OSError:
            identity = os.path.realpath(path)
        unique.setdefault(identity, (path, source))
    paths = [p for p, _ in unique.values()]
    inputs = [
        GenerationInput(dataclasses.replace(config, mask=str(path), masks=None, datalist=None), stem, source)
        for (path, source), stem in zip(unique.values(), unique_stems(paths))
    ]
    return inputs, problems


def _from_masks(config: InferConfig) -> tuple[list[tuple[Path, str]], list[str]]:
    assert config.masks is not None
    found: list[tuple[Path, str]] = []
    problems = []
    for i, entry in enumerate(config.masks):
        source = f"$.masks[{i}] ({entry})"
        if GLOB_CHARS.search(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                problems.append(f"$.masks[{i}]: the pattern '{entry}' matches no file")
            found += [(Path(m), source) for m in matches]
        elif not os.path.exists(entry):
            problems.append(f"$.masks[{i}]: {entry}: file {why_absent(entry)}")
        else:
            found.append((Path(entry), source))
    return found, problems


def _from_datalist(config: InferConfig) -> tuple[list[tuple[Path, str]], list[str]]:
    from maisi.data.datalist import data_root, read_datalist

    spec = config.datalist
    assert spec is not None
    entries = read_datalist(spec.path)["training"]
    root = data_root(spec.path, spec.data_root)
    chosen = [(i, e) for i, e in enumerate(entries) if spec.fold is None or e.get("fold") == spec.fold]
    if not chosen:
        folds = sorted({e["fold"] for e in entries if "fold" in e})
        return [], [f"$.datalist.fold: no case of {spec.path} is in fold {spec.fold} (its folds: {folds})"]
    found: list[tuple[Path, str]] = []
    problems = []
    for i, entry in chosen:
        case = f"{spec.path} $.training[{i}] (image {entry['image']})"
        if not entry.get("label"):
            problems.append(f"{case}: has no label to generate from")
            continue
        path = root / entry["label"]
        if not path.exists():
            problems.append(f"{case}: label {path}: file {why_absent(path)}")
            continue
        found.append((path, case))
    return found, problems


def base_stem(path: Path) -> str:
    """A mask's file name without its volume extension (a DICOM folder: its name), made file-name safe."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return UNSAFE.sub("_", name).strip("_") or "mask"


def unique_stems(paths: list[Path]) -> list[str]:
    """One stem per path, distinct: the file name's stem; where two collide, their folder names are put in
    front, one level at a time (``case_00000_segmentation``); where that cannot tell them apart, a number."""
    depth = [0] * len(paths)

    def stem(i: int) -> str:
        parents = paths[i].parent.parts[len(paths[i].parent.parts) - depth[i] :] if depth[i] else ()
        return "_".join([*(UNSAFE.sub("_", p).strip("_") for p in parents), base_stem(paths[i])])

    while True:
        names = [stem(i) for i in range(len(paths))]
        clashing = _clashes(names)
        growable = [i for i in clashing if depth[i] < len(paths[i].parent.parts) - 1]  # not the root "/"
        if not growable:
            break
        for i in growable:
            depth[i] += 1
    taken, seen = set(names), set()
    for i, name in enumerate(names):
        if name in seen:  # the first keeps the name, the others are numbered
            k = 2
            while f"{name}-{k}" in taken:
                k += 1
            names[i] = f"{name}-{k}"
            taken.add(names[i])
        seen.add(names[i])
    return names


def _clashes(names: list[str]) -> list[int]:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [i for i, n in enumerate(names) if counts[n] > 1]
