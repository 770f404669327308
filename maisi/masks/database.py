"""Mask databases in MAISI's candidate-mask format: load, check, index, summarise.

A database is a JSON list with one object per mask, exactly the layout of MAISI's released
``candidate_masks_flexible_size_and_spacing_{3000,4000}.json``::

    [{"pseudo_label_filename": "case1/mask.nii.gz", "label_list": [1, 3, 200], "dim": [512, 512, 256],
      "spacing": [0.8, 0.8, 1.5], "top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 0, 1, 0]}, ...]

Mask paths are relative to a mask root: the database file's folder unless given (MAISI's are relative to
the folder its mask zip was extracted to). ``index`` adds per entry ``label_voxels`` and
``label_volumes_ml`` (per label id), ``sha256``, ``file_size`` and ``file_mtime_ns``; MAISI's files lack
them and load unchanged. Body regions missing from an entry (optional in MAISI v2) are derived from its
``label_list`` with MAISI's marker organs, which is all MAISI itself looks at.

``index`` refuses blank masks (every voxel 0: the CT would be air everywhere) and masks still in
TotalSegmentator ids (no body label 200 and holding MAISI's unused ``dummy`` slots) unless told
``allow_no_body``. An entry of an older database whose ``label_list`` is empty is skipped with a warning
naming it, not refused: one blank entry must not make the rest of a released database (thousands of
entries, not the user's to edit) unusable, and a skipped entry can never be retrieved.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maisi.atomic import write_json
from maisi.conditioning import BODY_REGIONS, body_region_from_mask
from maisi.config.loader import read_json
from maisi.config.schema import json_path, load_schema, schema_errors
from maisi.data.datalist import one_hot
from maisi.data.io import Volume, read_mask
from maisi.distributed import Ranks, gather
from maisi.errors import ConfigError, InputError, VolumeError
from maisi.files import file_sha256
from maisi.labels import BODY_LABEL, is_dummy, labels_not_in_dict, load_label_dict
from maisi.progress import progress_bar

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SPACING_RTOL = 1e-3  # header spacings are stored rounded; a grid "differs" beyond this
ORTHOGONAL_TOL = 1e-3  # |cos| between voxel axes above which a grid counts as sheared


class DatabaseError(InputError):
    """A database file is unreadable or invalid; ``problems`` lists every one, each with its JSON path."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path, self.problems = str(path), list(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"invalid mask database {path} ({len(self.problems)} problem(s)):\n  {lines}")


@dataclass(frozen=True)
class MaskEntry:
    """One mask of a database: the record as stored, and what retrieval needs from it.

    Attributes:
        index: position in the database list (for messages: ``$[index]``).
        record: the JSON object as in the file (extra fields kept, written back unchanged).
        label_ids: MAISI ids present (background 0 excluded).
        dim: size in voxels (x, y, z).
        spacing: voxel size in mm, positive.
        regions: (top, bottom) indices into :data:`maisi.conditioning.BODY_REGIONS`, or None when the
            mask holds no marker organ of any region.
    """

    index: int
    record: dict[str, Any] = field(repr=False)
    label_ids: frozenset[int]
    dim: tuple[int, int, int]
    spacing: tuple[float, float, float]
    regions: tuple[int, int] | None

    @property
    def path(self) -> str:
        """The mask path as stored (relative to the mask root)."""
        return self.record["pseudo_label_filename"]

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        """Field of view in mm per axis (dim x spacing)."""
        return tuple(d * s for d, s in zip(self.dim, self.spacing))  # type: ignore[return-value]

    def covers(self, region: int) -> bool:
        """Whether body region ``region`` (an index) lies within the entry's [top, bottom]."""
        return self.regions is not None and self.regions[0] <= region <= self.regions[1]


@dataclass(frozen=True)
class MaskDatabase:
    """A loaded database: where it came from, where its masks live, and its entries in file order."""

    path: Path
    mask_root: Path
    entries: tuple[MaskEntry, ...]

    def mask_path(self, entry: MaskEntry) -> Path:
        """Absolute path of an entry's mask file."""
        return self.mask_root / entry.path


def _one_hot_index(values: list[float], where: str, problems: list[str]) -> int | None:
    hot = [i for i, v in enumerate(values) if v != 0]
    if len(hot) != 1:
        problems.append(
            f"{where}: got {json.dumps(values)}, expected a one-hot list of 4 (one non-zero value)"
        )
        return None
    return hot[0]


def _entry(index: int, record: dict[str, Any], problems: list[str]) -> MaskEntry | None:
    """A schema-valid record -> MaskEntry; semantic problems (one-hot regions, their order) are appended."""
    where = json_path([index])
    labels = frozenset(int(v) for v in record["label_list"]) - {0}
    if ("top_region_index" in record) != ("bottom_region_index" in record):
        problems.append(f"{where}: top_region_index and bottom_region_index must be given together")
        return None
    if "top_region_index" in record:
        top = _one_hot_index(record["top_region_index"], f"{where}.top_region_index", problems)
        bottom = _one_hot_index(record["bottom_region_index"], f"{where}.bottom_region_index", problems)
        if top is None or bottom is None:
            return None
        if top > bottom:
            problems.append(
                f"{where}: top region '{BODY_REGIONS[top]}' lies below bottom region '{BODY_REGIONS[bottom]}'"
            )
            return None
        regions: tuple[int, int] | None = (top, bottom)
    else:
        derived = body_region_from_mask(np.asarray(sorted(labels), dtype=np.int64))
        regions = (BODY_REGIONS.index(derived[0]), BODY_REGIONS.index(derived[1])) if derived else None
    dim = tuple(int(d) for d in record["dim"])
    spacing = tuple(abs(float(s)) for s in record["spacing"])
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        shown = "[" + ", ".join(str(float(s)) for s in record["spacing"]) + "]"
        problems.append(f"{where}.spacing: got {shown}, expected 3 finite non-zero voxel sizes in mm")
        return None
    return MaskEntry(index, record, labels, dim, spacing, regions)  # type: ignore[arg-type]


def parse_database(data: Any, source: str | Path) -> list[MaskEntry]:
    """Check a parsed database (schema, one-hot regions, duplicate paths); every problem is reported at once.

    Raises:
        DatabaseError: listing each problem with its JSON path.
    """
    problems = schema_errors(data, load_schema("mask_database"))
    if problems:
        raise DatabaseError(source, problems)
    entries, seen = [], {}
    for i, record in enumerate(data):
        path = record["pseudo_label_filename"]
        if path in seen:
            problems.append(f"{json_path([i, 'pseudo_label_filename'])}: '{path}' is also in $[{seen[path]}]")
        seen.setdefault(path, i)
        entry = _entry(i, record, problems)
        if entry is not None and not entry.label_ids:
            log.warning(
                "%s %s (%s): holds no label (label_list %s); skipped: a blank mask would give a CT of air "
                "everywhere (re-run maisi.masks index, which refuses blank masks)",
                source,
                json_path([i]),
                path,
                json.dumps(record["label_list"]),
            )
        elif entry is not None:
            entries.append(entry)
    if problems:
        raise DatabaseError(source, problems)
    return entries


def _read_json(path: Path) -> Any:
    """The database's JSON through the shared reader (binary files, NaN literals ... refused by name)."""
    try:
        return read_json(path)
    except ConfigError as e:
        raise DatabaseError(path, e.errors) from None


def load_database(
    path: str | Path, mask_root: str | Path | None = None, check_files: bool = True
) -> MaskDatabase:
    """Load and check a mask database (ours or MAISI's released file, unchanged).

    Args:
        path: the database JSON.
        mask_root: folder the mask paths are relative to; None: the database's folder.
        check_files: refuse a database naming mask files that do not exist (all listed).

    Raises:
        DatabaseError: unreadable or invalid JSON, or missing mask files.
    """
    path = Path(path)
    root = Path(mask_root) if mask_root is not None else path.parent
    entries = parse_database(_read_json(path), path)
    if check_files:
        if not root.is_dir():
            raise DatabaseError(
                path, [f"mask root {root} is not a folder (give the folder the masks were extracted to)"]
            )
        missing = [
            f"{json_path([e.index, 'pseudo_label_filename'])}: mask file not found: {root / e.path}"
            for e in entries
            if not (root / e.path).exists()
        ]
        if missing:
            raise DatabaseError(path, missing)
    return MaskDatabase(path, root, tuple(entries))


def read_entry_mask(db: MaskDatabase, entry: MaskEntry, verify_sha256: bool = True) -> Volume:
    """Read an entry's mask and refuse it when it is not what the database says.

    Checks the grid (dim and spacing, in RAS order) and, where the entry records one, the SHA-256.

    Raises:
        VolumeError: unreadable, not integer, on another grid than its entry, or changed since indexed.
    """
    path = db.mask_path(entry)
    where = f"{db.path} {json_path([entry.index])}"
    volume = read_mask(path)
    if volume.shape != entry.dim or not np.allclose(volume.spacing, entry.spacing, rtol=SPACING_RTOL):
        raise VolumeError(
            f"{path}: grid {list(volume.shape)} at {np.round(volume.spacing, 4).tolist()} mm differs from "
            f"its database entry {where} (dim {list(entry.dim)}, spacing {list(entry.spacing)}); "
            "re-run maisi.masks index"
        )
    if verify_sha256 and "sha256" in entry.record and file_sha256(path) != entry.record["sha256"]:
        raise VolumeError(
            f"{path}: file changed since it was indexed ({where}.sha256); re-run maisi.masks index"
        )
    return volume


# ----------------------------------------------------------------------------------------------- indexing


def grid_problems(volume: Volume) -> list[str]:
    """Why a mask's grid is unfit for a database (empty when fit): non-finite, degenerate or sheared axes."""
    affine = volume.affine
    if not np.all(np.isfinite(affine)):
        return ["its affine holds non-finite values"]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing < 1e-6):
        return [f"zero voxel spacing {np.round(spacing, 6).tolist()}"]
    problems = []
    axes = affine[:3, :3] / spacing
    cosines = np.abs(axes.T @ axes - np.eye(3))
    if cosines.max() > ORTHOGONAL_TOL:
        problems.append("its voxel axes are not orthogonal (a sheared grid)")
    if min(volume.shape) < 2:
        problems.append(f"size {list(volume.shape)} has an axis of a single voxel (not a 3D volume)")
    return problems


def label_counts(array: np.ndarray, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Label ids present and their voxel counts.

    Labels in 0..65535 are counted with ``np.bincount`` over chunks of the array in its memory order (a
    view, no copy of an F-ordered NIfTI array; each chunk's int64 cast stays small): 0.3 s for a
    512 x 512 x 256 mask where ``np.unique`` sorts for 6 s and a whole-array bincount takes 7 s.
    Other labels fall back to ``np.unique``.
    """
    if array.dtype.kind not in "iu" or not array.size or int(array.min()) < 0 or int(array.max()) >= 65536:
        return np.unique(array, return_counts=True)
    flat = array.ravel(order="K")
    counts = np.zeros(int(flat.max()) + 1, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start : start + chunk], minlength=counts.size)
    ids = np.flatnonzero(counts)
    return ids, counts[ids]


def vocabulary_problems(
    ids: Sequence[int], label_dict: dict[str, int], allow_no_body: bool = False
) -> list[str]:
    """Why labels ``ids`` (background included or not) are not a mask in MAISI ids (empty when they are).

    Refused: no label at all (a blank mask), ids not in ``label_dict``, and, unless ``allow_no_body``, a mask
    without the body label that holds MAISI's unused ``dummy`` slots: the mark of TotalSegmentator ids
    (its kidney, spleen ... ids are MAISI's dummy slots 2, 16, 18, 20, 21).
    """
    present = sorted({int(i) for i in ids} - {0})
    if not present:
        return [
            "holds no label (every voxel is 0, background); a blank mask would give a CT of air everywhere"
        ]
    unknown = labels_not_in_dict(np.asarray(present), label_dict)
    if unknown:
        return [f"labels not in the label dictionary: {unknown[:20]} (remap it to MAISI ids)"]
    dummies = {i: n for n, i in label_dict.items() if is_dummy(n)}
    held = [f"'{dummies[i]}' ({i})" for i in present if i in dummies]
    if held and BODY_LABEL not in present and not allow_no_body:
        return [
            f"no body label {BODY_LABEL} and it holds MAISI's unused slots {', '.join(held)}: it looks like "
            "TotalSegmentator ids, not MAISI ids, and would be indexed with wrong organs and body regions; "
            "convert it (python -m maisi.labels remap --mask MASK --mapping totalsegmentator --output OUT) "
            "or pass --allow-no-body if its ids are MAISI's"
        ]
    return []


def describe_mask(
    path: str | Path, relative_path: str, label_dict: dict[str, int], allow_no_body: bool = False
) -> dict[str, Any]:
    """A database record for one mask file (reads the voxels: ``label_list`` needs them).

    Raises:
        InputError: unreadable, not integer, an odd grid, blank, labels that are not in ``label_dict``, or
            (unless ``allow_no_body``) what looks like TotalSegmentator ids (:func:`vocabulary_problems`).
    """
    path = Path(path)
    stat = path.stat()
    sha = file_sha256(path)
    volume = read_mask(path)
    problems = grid_problems(volume)
    ids, counts = label_counts(volume.array)
    problems += vocabulary_problems(ids, label_dict, allow_no_body)
    if problems:
        raise VolumeError(f"{path}: " + "; ".join(problems))
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    present = [(int(i), int(c)) for i, c in zip(ids, counts) if i != 0]
    record: dict[str, Any] = {
        "pseudo_label_filename": relative_path,
        "label_list": [i for i, _ in present],
        "dim": list(volume.shape),
        "spacing": [round(float(s), 6) for s in volume.spacing],
    }
    regions = body_region_from_mask(ids)
    if regions is not None:  # MAISI v2 makes these optional; without marker organs there is no region
        record["top_region_index"], record["bottom_region_index"] = one_hot(regions[0]), one_hot(regions[1])
    record["label_voxels"] = {str(i): c for i, c in present}
    record["label_volumes_ml"] = {str(i): round(c * voxel_ml, 3) for i, c in present}
    record.update(sha256=sha, file_size=stat.st_size, file_mtime_ns=stat.st_mtime_ns)
    return record


@dataclass(frozen=True)
class _Task:
    path: str
    relative: str
    previous: dict[str, Any] | None
    label_dict: dict[str, int]
    allow_no_body: bool = False


@dataclass(frozen=True)
class _Outcome:
    relative: str
    record: dict[str, Any] | None
    error: str | None = None
    kept: bool = False


def _unchanged(path: Path, previous: dict[str, Any] | None) -> bool:
    """An earlier record still describes the file: same size, mtime and SHA-256 (hashed last: it reads it)."""
    if previous is None or "sha256" not in previous:
        return False
    stat = path.stat()
    if previous.get("file_size") != stat.st_size or previous.get("file_mtime_ns") != stat.st_mtime_ns:
        return False
    return file_sha256(path) == previous["sha256"]


def _index_one(task: _Task) -> _Outcome:
    """Worker: keep an unchanged record or describe the file; failures become a reason, never an exception."""
    path = Path(task.path)
    try:
        previous = task.previous
        if _unchanged(path, previous) and not vocabulary_problems(
            previous["label_list"], task.label_dict, task.allow_no_body
        ):
            return _Outcome(task.relative, previous, kept=True)
        record = describe_mask(path, task.relative, task.label_dict, task.allow_no_body)
        return _Outcome(task.relative, record)
    except InputError as e:
        return _Outcome(task.relative, None, str(e))
    except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the others
        return _Outcome(task.relative, None, f"{path}: cannot index ({type(e).__name__}: {e})")


def _run(tasks: list[_Task], workers: int, show_progress: bool) -> list[_Outcome]:
    if workers <= 1 or len(tasks) <= 1:
        return [_index_one(t) for t in progress_bar(tasks, desc="indexing", enabled=show_progress)]
    # fork where available: workers inherit the imported modules (spawn would re-import torch in each)
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        chunk = max(1, len(tasks) // (workers * 8))
        outcomes = pool.map(_index_one, tasks, chunksize=chunk)
        return list(progress_bar(outcomes, total=len(tasks), desc="indexing", enabled=show_progress))


def _is_mask_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(MASK_SUFFIXES) and not path.name.startswith(".tmp-")


def find_mask_files(sources: Sequence[str | Path]) -> list[Path]:
    """Mask files named by folders (searched recursively) or glob patterns (``**`` allowed), sorted, unique.

    Raises:
        InputError: a source that names nothing, listing every such source.
    """
    found: dict[Path, None] = {}
    empty = []
    for source in sources:
        source_path = Path(source)
        if source_path.is_dir():
            matches = [p for p in source_path.rglob("*") if _is_mask_file(p)]
        else:
            matches = [Path(p) for p in glob.glob(str(source), recursive=True) if _is_mask_file(Path(p))]
        if not matches:
            empty.append(str(source))
        found.update((p.resolve(), None) for p in sorted(matches))
    if empty:
        raise InputError(
            f"no mask file ({', '.join(MASK_SUFFIXES)}) matches {', '.join(repr(s) for s in empty)}"
        )
    return sorted(found)


def _check_output(output: Path) -> None:
    """Refuse an output that cannot be written, before any work."""
    if output.is_dir():
        raise InputError(f"--output {output} is a folder; give the database file name (e.g. masks.json)")
    folder = output.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the database {output}: {existing or folder} is not a writable folder")


@dataclass(frozen=True)
class IndexReport:
    """What an index run did. ``records`` is the database, sorted by path; ``bad`` is (file, reason)."""

    records: list[dict[str, Any]]
    indexed: int
    kept: int
    dropped: list[str]
    bad: list[tuple[str, str]]
    seconds: float


def build_database(
    sources: Sequence[str | Path],
    output: str | Path,
    mask_root: str | Path | None = None,
    label_dict: dict[str, int] | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    ranks: Ranks | None = None,
    show_progress: bool = False,
    allow_no_body: bool = False,
) -> IndexReport:
    """Index mask files into database records, updating the database at ``output`` if it exists.

    Entries of an existing database whose file is unchanged (size, mtime, SHA-256) are kept as they are,
    new files are described, and entries whose file is gone are dropped. Under torchrun every rank
    describes its share (with ``workers`` local processes each) and every rank gets the full result.

    Args:
        sources: folders and/or glob patterns of masks in MAISI ids.
        output: the database file (read if present; written by :func:`index_masks`, not here).
        mask_root: folder the stored paths are relative to; None: ``output``'s folder.
        label_dict: the ids masks may hold; None: MAISI's dictionary.
        workers: local worker processes.
        skip_bad: leave bad masks out (listed in the report) instead of refusing.
        ranks: torchrun ranks (None: one process).
        show_progress: a progress bar (rank 0).
        allow_no_body: index masks without the body label that hold MAISI's dummy slots (refused by
            default: the mark of masks still in TotalSegmentator ids).

    Raises:
        InputError: sources matching nothing, an unwritable output or an invalid existing database; and,
            without ``skip_bad``, any mask that is unreadable, not integer, on an odd grid, blank, holding
            unknown labels or still in TotalSegmentator ids (all listed).
    """
    start = time.perf_counter()
    ranks = ranks or Ranks()
    output = Path(output)
    root = Path(mask_root) if mask_root is not None else output.parent
    label_dict = label_dict if label_dict is not None else load_label_dict()
    if mask_root is not None and not root.is_dir():
        raise InputError(f"--mask-root {root} is not a folder")
    _check_output(output)
    files = find_mask_files(sources)
    previous = {}
    if output.exists():  # restart: an invalid existing database is refused, not overwritten
        previous = {e.path: e.record for e in load_database(output, root, check_files=False).entries}
    tasks = []
    for file in files:
        relative = Path(os.path.relpath(file, root.resolve())).as_posix()
        tasks.append(_Task(str(file), relative, previous.get(relative), label_dict, allow_no_body))
    mine = _run(ranks.shard(tasks), workers, show_progress and ranks.is_main)
    outcomes = [o for share in gather(mine, ranks) for o in share]
    bad = sorted((o.relative, o.error or "") for o in outcomes if o.record is None)
    if bad and not skip_bad:
        lines = "\n  ".join(reason for _, reason in bad)
        raise InputError(
            f"{len(bad)} of {len(tasks)} mask(s) cannot be indexed (nothing written; --skip-bad leaves "
            f"them out):\n  {lines}"
        )
    records = sorted(
        (o.record for o in outcomes if o.record is not None), key=lambda r: r["pseudo_label_filename"]
    )
    current = {t.relative for t in tasks}
    return IndexReport(
        records=records,
        indexed=sum(o.record is not None and not o.kept for o in outcomes),
        kept=sum(o.kept for o in outcomes),
        dropped=sorted(p for p in previous if p not in current),
        bad=bad,
        seconds=time.perf_counter() - start,
    )


def write_database(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Check records against the database format and write them atomically."""
    parse_database(records, f"{path} (about to be written)")
    return write_json(path, records)


def index_masks(sources: Sequence[str | Path], output: str | Path, **options: Any) -> IndexReport:
    """:func:`build_database`, then write the database (rank 0 only). Options as for build_database."""
    report = build_database(sources, output, **options)
    ranks = options.get("ranks") or Ranks()
    if ranks.is_main:
        write_database(output, report.records)
    return report


# ----------------------------------------------------------------------------------------------- summary


def _range(values: list[tuple[float, ...]]) -> dict[str, list[float]] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"min": np.round(array.min(axis=0), 4).tolist(), "max": np.round(array.max(axis=0), 4).tolist()}


def summarise(db: MaskDatabase, label_dict: dict[str, int] | None = None) -> dict[str, Any]:
    """Entries, classes (entries holding each, with names), region spans, dim / spacing / FOV ranges."""
    names = {i: n for n, i in (label_dict if label_dict is not None else load_label_dict()).items()}
    classes: dict[int, int] = {}
    for entry in db.entries:
        for label in entry.label_ids:
            classes[label] = classes.get(label, 0) + 1
    regions: dict[str, int] = {}
    for entry in db.entries:
        span = (
            "no marker organ"
            if entry.regions is None
            else "-".join(dict.fromkeys(BODY_REGIONS[i] for i in entry.regions))
        )
        regions[span] = regions.get(span, 0) + 1
    return {
        "database": str(db.path),
        "mask_root": str(db.mask_root),
        "entries": len(db.entries),
        "classes": [
            {"id": i, "name": names.get(i, "(not in the label dictionary)"), "entries": n}
            for i, n in sorted(classes.items())
        ],
        "regions": dict(sorted(regions.items(), key=lambda item: -item[1])),
        "dim": _range([e.dim for e in db.entries]),
        "spacing_mm": _range([e.spacing for e in db.entries]),
        "fov_mm": _range([e.fov_mm for e in db.entries]),
    }
