"""``python -m maisi.download``: fetch released weights (MAISI CT and MR, the seeds' LDMs), verified.

    python -m maisi.download --variant rflow-ct|ddpm-ct|rflow-mr|rflow-mr-brain|brats-2d|brats-3d|cxr
        --dest models/maisi
        [--base-url URL] [--cache-dir DIR] [--force] [--allow-unverified] [--weights-only]
        [--with-mask-archive] [-v]

The MR variants (``rflow-mr``: ``autoencoder_v2.pt`` + ``diff_unet_3d_rflow-mr.pt`` from
nvidia/NV-Generate-MR; ``rflow-mr-brain``: the CT ``autoencoder_v1.pt`` +
``diff_unet_3d_rflow-mr-brain_v1.pt`` from nvidia/NV-Generate-MR-Brain) have weights only. With the CT
weights come MAISI's mask-database files
(``datasets/candidate_masks_flexible_size_and_spacing_<N>.json``,
``datasets/all_anatomy_size_conditions.json``; ``--weights-only`` skips them), saved under
``<dest>/datasets/``. ``--with-mask-archive`` adds the masks themselves (a zip of several GB), verified like
every file and then extracted safely and atomically (:mod:`maisi.archive`) into
``<dest>/datasets/all_masks_flexible_size_and_spacing_4000/``, the folder the database's paths are relative to
(``anatomy.mask_root``).

Transfers are huggingface_hub's ``hf_hub_download``: its cache (``--cache-dir``, default the Hugging Face
cache), its in-run retry and resume of a broken transfer, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` (the default
``--base-url``) and its token (``HF_TOKEN`` or ``hf auth login``), which is sent to huggingface.co only, never
to a mirror.
The files of a variant (``maisi/resources/released_weights.json``) are saved flat in ``--dest`` (the seeds'
LDM variants ``brats-2d``, ``brats-3d`` and ``cxr``, whose bundles share file names, in a subfolder each).

Trust. Every file is checked against a SHA-256 before it appears in ``--dest`` (hard link or copy from the
cache to a temporary name, hashed, renamed) and again, by hashing its bytes, each time a later run reuses it
(one that fails is moved aside as ``<name>.corrupt``, said in one message, and fetched again):
  - a pin in the manifest (sha256 + size, with its source) when a published record of the file exists; then
    the host does not matter, plain http included;
  - otherwise the lock file ``<dest>/maisi-weights.lock.json``: on first download the SHA-256 the hub
    announces for the LFS file (``X-Linked-Etag``) is accepted, only over HTTPS or from a loopback host, and
    recorded; later runs and reuses must match it (trust on first use). A host that later announces another
    hash is refused. Where the release publishes an MD5 only (the MONAI bundles' ``large_files.yml``;
    ``published_md5`` in the manifest), the first download must also match it, before it is installed, and
    the SHA-256 of those bytes is recorded in the lock file, whatever the host announces.
With no hash at all (a non-LFS file) the file is refused unless ``--allow-unverified`` (its computed hash is
then recorded). The transfer stops once the body passes the expected size (see :func:`_bounded_bar`).

Exit codes (the :mod:`maisi.cli` contract):
  0  every file of the variant is in ``--dest`` and verified (downloaded now or already there)
  2  something you must fix (InputError): ``--dest``/``--cache-dir`` not writable or too small, a plain-http
     ``--base-url`` that would have to supply a checksum, a file the host does not have (404: check
     ``--base-url``) or refuses (401/403: accept the licence, log in), no checksum without
     ``--allow-unverified``, ``HF_HUB_OFFLINE`` set and a file neither in ``--dest`` nor in the cache, an
     unreadable lock file
  1  a runtime failure, worth retrying (RunFailure): the host cannot be reached (the other files are not
     tried), a server error, a broken transfer, a body longer than expected, a checksum mismatch (the download
     is deleted), a host that now serves another file than the pin or the lock file says
With several failures the exit code is 2 only if all of them are of the exit-2 kind.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from tqdm.auto import tqdm

import maisi
from maisi.archive import extract_archive
from maisi.atomic import write_json
from maisi.cli import EXIT_OK, Command, new_parser, run_command, setup_cli
from maisi.errors import InputError, RunFailure
from maisi.files import ChecksumMismatch, check_file, check_md5, install_verified, require_free_space
from maisi.progress import shown
from maisi.resources import load_json
from maisi.run_paths import RunPaths

PROG = "maisi.download"
MANIFEST = "released_weights.json"
CORRUPT_SUFFIX = ".corrupt"  # a --dest file that fails its hash is renamed <name>.corrupt
LOCK_NAME = "maisi-weights.lock.json"
DEFAULT_BASE_URL = "https://huggingface.co"
HUB_HOSTS = ("huggingface.co", "hf.co")  # the only hosts that get the user's token
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
EXTRACTION = " (extraction)"  # an archive that was fetched but could not be extracted

log = logging.getLogger(__name__)


class HostUnreachable(RunFailure):
    """The host could not be reached at all; the remaining files are not tried."""


class BodyTooLong(RunFailure):
    """The host sent more bytes than the file may have; the transfer was stopped."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a variant, as the manifest lists it."""

    repo: str
    path: str
    save_as: str | None = None  # where in --dest (relative); None: flat, under its base name

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def local(self) -> str:
        return self.save_as or self.name

    @property
    def key(self) -> str:
        return f"{self.repo}/{self.path}"

    def url(self, base_url: str, revision: str = "main") -> str:
        return hf_hub_url(self.repo, self.path, revision=revision, endpoint=base_url.rstrip("/"))


@dataclass(frozen=True)
class Expected:
    """What the file's bytes must be, and who says so (shown in messages)."""

    sha256: str
    size: int | None
    source: str
    pinned: bool = False  # True: the manifest's pin; False: the lock file or the host (trust on first use)


@dataclass(frozen=True)
class PublishedMd5:
    """An MD5 the release publishes for a file (no SHA-256 published): checked on first download."""

    md5: str
    source: str


@dataclass
class Summary:
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, Exception]] = field(default_factory=list)
    not_tried: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- manifest and lock file


def load_manifest() -> dict[str, Any]:
    """The packaged manifest (tests replace this function)."""
    return load_json(MANIFEST)


def variant_files(
    manifest: dict[str, Any], variant: str, *, datasets: bool = False, mask_archive: bool = False
) -> list[RemoteFile]:
    """The weights of ``variant``, then (if asked) its mask-database files, then its mask archive."""
    entry = manifest["variants"][variant]
    chosen = [*entry["files"], *(entry.get("datasets", []) if datasets else [])]
    if mask_archive and "mask_archive" in entry:
        chosen.append(entry["mask_archive"])
    return [RemoteFile(f["repo"], f["path"], f.get("save_as")) for f in chosen]


def manifest_pins(manifest: dict[str, Any]) -> dict[str, Expected]:
    """``repo/path`` -> pin; a malformed pin is a packaging bug, hence ValueError (exit 1)."""
    pins = {}
    for key, pin in manifest.get("pins", {}).items():
        sha, size = pin.get("sha256"), pin.get("size")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise ValueError(f"{MANIFEST}: pin {key}: sha256 must be 64 lower-case hex digits, got {sha!r}")
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise ValueError(f"{MANIFEST}: pin {key}: size must be a positive integer or null, got {size!r}")
        pins[key] = Expected(sha, size, f"the SHA-256 pinned in {MANIFEST}", pinned=True)
    return pins


def manifest_md5s(manifest: dict[str, Any]) -> dict[str, PublishedMd5]:
    """``repo/path`` -> published MD5; a malformed entry is a packaging bug, hence ValueError (exit 1)."""
    out = {}
    for key, entry in manifest.get("published_md5", {}).items():
        if key.startswith("_"):  # a comment
            continue
        md5 = entry.get("md5")
        if not isinstance(md5, str) or not _HEX32.fullmatch(md5):
            raise ValueError(
                f"{MANIFEST}: published_md5 {key}: md5 must be 32 lower-case hex digits, got {md5!r}"
            )
        out[key] = PublishedMd5(md5, f"the MD5 published in {entry['source']}")
    return out


class Lock:
    """``<dest>/maisi-weights.lock.json``: hashes accepted on first download (trust on first use)."""

    def __init__(self, dest: Path):
        self.path = dest / LOCK_NAME
        self.files: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return
        try:
            self.files = dict(json.loads(self.path.read_text())["files"])
            bad = [k for k, v in self.files.items() if not _HEX64.fullmatch(str(v.get("sha256")))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(
                f"cannot read the lock file {self.path} ({err}); restore it, or delete it to accept "
                "the hashes the host announces again (trust on first use)"
            ) from None
        if bad:
            raise InputError(f"{self.path}: no valid sha256 for {', '.join(bad)}; fix or delete that entry")

    def expected(self, file: RemoteFile) -> Expected | None:
        entry = self.files.get(file.key)
        if entry is None:
            return None
        return Expected(
            entry["sha256"],
            entry.get("size"),
            f"the SHA-256 recorded in {self.path} on {entry.get('recorded')}",
        )

    def record(self, file: RemoteFile, sha256: str, size: int, revision: str | None, source: str) -> None:
        """Add ``file``'s hash and rewrite the lock file atomically."""
        self.files[file.key] = {
            "sha256": sha256,
            "size": size,
            "revision": revision,
            "source": source,
            "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        note = (
            "Written by python -m maisi.download: SHA-256 of released weights that no pin in its manifest "
            "covers, accepted on first download (trust on first use). Every later run verifies against it; "
            "delete an entry only when you trust a new version of that file."
        )
        write_json(
            self.path, {"_comment": note, "format_version": 1, "files": dict(sorted(self.files.items()))}
        )


# ---------------------------------------------------------------- who may say what


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8, ::1
    except ValueError:
        return False


def may_announce_hash(base_url: str) -> bool:
    """A hash the host announces is taken only over HTTPS, or from this machine (the tests' fake hub)."""
    return urlsplit(base_url).scheme == "https" or is_loopback(base_url)


def token_for(base_url: str) -> bool | None:
    """None: huggingface_hub sends the user's token (HF_TOKEN, hf auth login); False: no token, to a
    mirror."""
    host = (urlsplit(base_url).hostname or "").lower()
    return None if any(host == h or host.endswith("." + h) for h in HUB_HOSTS) else False


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE``, read now (huggingface_hub reads it once, when imported)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


# ---------------------------------------------------------------- the host


@dataclass(frozen=True)
class Announced:
    sha256: str | None  # None: no SHA-256 (a non-LFS file's ETag is a git SHA-1)
    size: int | None
    revision: str | None  # the commit the host resolved "main" to


def announce(file: RemoteFile, base_url: str) -> Announced:
    """What the host says about ``file`` (a HEAD of the resolve URL; network and HTTP errors pass up)."""
    meta = get_hf_file_metadata(file.url(base_url), token=token_for(base_url), endpoint=base_url.rstrip("/"))
    etag = (meta.etag or "").lower()
    return Announced(etag if _HEX64.fullmatch(etag) else None, meta.size, meta.commit_hash)


def _explain(err: Exception, file: RemoteFile, base_url: str, dest: Path) -> InputError | RunFailure:
    """A network or HTTP error as one line saying what happened and what to do."""
    url = file.url(base_url)
    folder = (dest / file.local).parent
    by_hand = f"download {file.name} by hand from {file.url(DEFAULT_BASE_URL)} and put it in {folder}"
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        what = f"{url} answered HTTP {err.response.status_code}"
        if err.response.status_code == 404:
            return InputError(f"{what}: the file is not there; check --base-url, or {by_hand}")
        if err.response.status_code in (401, 403):
            return InputError(
                f"{what}: the repository may be gated; accept its licence on the model page and log "
                f"in (HF_TOKEN or hf auth login), or {by_hand}"
            )
        return RunFailure(f"{what}; try again later, or {by_hand}")
    folder = PurePosixPath(file.path).parent
    page = f"{DEFAULT_BASE_URL}/{file.repo}/tree/main/{folder}"
    return HostUnreachable(
        f"cannot reach {urlsplit(url).netloc} ({url}: {err}); check your connection or proxy, "
        f"or download the files by hand from {page} and put them in {dest}"
    )


def _bounded_bar(name: str, limit: int | None) -> type[tqdm]:
    """A progress-bar class for ``hf_hub_download(tqdm_class=...)`` that ends the transfer past ``limit``
    bytes.

    Why a progress bar: huggingface_hub's plain-HTTP download (``http_get``) compares the size only after
    reading the whole body, but it reports every chunk it reads (``DOWNLOAD_CHUNK_SIZE``, 10 MiB) to its bar
    before writing it. Raising here stops the read at ``limit`` plus at most one chunk; the chunk is not
    written and huggingface_hub deletes its temporary file. Xet downloads (bars made with a ``bar_format``)
    are left alone: hf_xet rebuilds the file from content-hashed chunks, so no server-chosen body length is
    involved.
    """

    class Bounded(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            self._bounded = limit is not None and "bar_format" not in kwargs
            self._received = int(kwargs.get("initial") or 0)
            # no bar with --no-progress (maisi.progress), nor when not on a terminal
            kwargs["disable"] = kwargs.get("disable") if shown() else True
            kwargs["leave"] = False
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            self._received += int(n or 0)
            if self._bounded and self._received > limit:
                raise BodyTooLong(
                    f"{name}: the host sent more than the {limit} bytes the file has; stopped reading "
                    "and discarded the download"
                )
            return super().update(n)

    return Bounded


# ---------------------------------------------------------------- one file


@dataclass
class Job:
    """What every file of a run shares."""

    dest: Path
    base_url: str
    cache_dir: Path
    force: bool
    allow_unverified: bool
    offline: bool
    pins: dict[str, Expected]
    lock: Lock
    md5s: dict[str, PublishedMd5] = field(default_factory=dict)

    def md5(self, file: RemoteFile) -> PublishedMd5 | None:
        """The published MD5 that still has to be checked: only while no SHA-256 covers the file."""
        return self.md5s.get(file.key) if self.expected(file) is None else None

    def expected(self, file: RemoteFile) -> Expected | None:
        return self.pins.get(file.key) or self.lock.expected(file)


def md5_verified_copy(final: Path, md5: PublishedMd5) -> str | None:
    """Why ``final`` need not be fetched (its bytes match the published MD5), or None after saying why not."""
    try:
        check_md5(final, md5.md5)
    except ChecksumMismatch as err:
        print(
            f"{final.name}: present, but its md5 {err.actual} is not {md5.source} ({md5.md5}); downloading it"
        )
        return None
    return f"already present, verified against {md5.source}"


def verified_copy(final: Path, expected: Expected) -> str | None:
    """Why ``final`` need not be fetched (its bytes hash to ``expected``), or None after moving it aside as
    ``<name>.corrupt`` (replacing an older one) and saying so in one message."""
    try:
        check_file(final, expected.sha256, expected.size)
    except ChecksumMismatch as err:
        aside = final.with_name(final.name + CORRUPT_SUFFIX)
        os.replace(final, aside)  # never left in --dest under its name, even when the download fails
        if _all_zero(aside):
            why = "every byte is zero (an incomplete or pre-allocated file), so it is not the file "
            why += f"{expected.source} names"
        else:
            why = f"its {err.what} {err.actual} is not {expected.source} ({err.expected})"
        print(f"{final.name}: present, but {why}; moved aside as {aside.name}, downloading it again")
        return None
    return f"already present, verified against {expected.source}"


def _all_zero(path: Path, chunk: int = 1 << 20) -> bool:
    """Whether every byte of ``path`` is zero (an empty file counts: nothing there)."""
    with path.open("rb") as f:
        while block := f.read(chunk):
            if block.count(0) != len(block):
                return False
    return True


def _contradiction(file: RemoteFile, url: str, expected: Expected, announced: Announced) -> RunFailure | None:
    """The host now announces other bytes than the pin or the lock file: refuse before downloading."""
    if announced.sha256 in (None, expected.sha256) and announced.size in (None, expected.size):
        return None
    if expected.pinned:
        advice = f"update {MANIFEST} once you trust the new file"
    else:
        advice = "if you trust the new file, delete its entry from the lock file and run again"
    return RunFailure(
        f"{url} now serves a different {file.name} (sha256 {announced.sha256}, {announced.size} bytes) "
        f"than {expected.source} ({expected.sha256}, {expected.size} bytes); {advice}"
    )


def _check_space(job: Job, file: RemoteFile, size: int) -> None:
    """Refuse a transfer the cache (and --dest, when a hard link is impossible) cannot hold."""
    require_free_space(job.cache_dir, size, f"{file.name} (in the download cache)")
    if os.stat(job.cache_dir).st_dev != os.stat(job.dest).st_dev:
        require_free_space(job.dest, size, file.name)


def download(job: Job, file: RemoteFile, limit: int | None, local_only: bool) -> Path:
    """The file in huggingface_hub's cache, fetched unless cached (errors become InputError/RunFailure)."""
    try:
        path = hf_hub_download(
            file.repo,
            file.path,
            cache_dir=job.cache_dir,
            endpoint=job.base_url.rstrip("/"),
            token=token_for(job.base_url),
            force_download=job.force and not local_only,
            local_files_only=local_only,
            library_name="maisi",
            library_version=maisi.__version__,
            tqdm_class=_bounded_bar(file.name, limit),
        )
    except LocalEntryNotFoundError as err:
        if local_only:
            raise  # the caller knows why it was local only
        raise RunFailure(f"{file.name}: {err} (is --base-url {job.base_url} a Hugging Face Hub?)") from None
    except HfHubHTTPError as err:
        raise _explain(err, file, job.base_url, job.dest) from None
    except (httpx2.TransportError, OSError) as err:  # the transfer broke off after huggingface_hub's retries
        raise RunFailure(f"{file.name}: transfer failed ({err}); nothing was kept, run again") from None
    return Path(path)


def install(blob: Path, final: Path, expected: Expected | None, md5: PublishedMd5 | None = None) -> str:
    """Verify the cached ``blob`` into ``final`` (its published MD5 first, if any); a wrong blob is deleted
    from the cache (ChecksumMismatch)."""
    try:
        if md5 is not None:
            check_md5(blob, md5.md5)
        return install_verified(
            blob, final, expected.sha256 if expected else None, expected.size if expected else None
        )
    except ChecksumMismatch:
        Path(os.path.realpath(blob)).unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise


def _mismatch(final: Path, expected: Expected | PublishedMd5, err: ChecksumMismatch) -> RunFailure:
    return RunFailure(
        f"checksum mismatch for {final.name}: expected {err.what} {err.expected} ({expected.source}), "
        f"got {err.actual} (corrupted transfer or a changed file on the host); the download was "
        "deleted, run again"
    )


def _ask_host(
    file: RemoteFile, job: Job, expected: Expected | None
) -> tuple[Announced | None, Exception | None]:
    """What the host announces (None offline), or why it could not be asked while a cached copy may still
    do."""
    if job.offline:
        return None, None
    try:
        announced = announce(file, job.base_url)
    except HfHubHTTPError as err:
        raise _explain(err, file, job.base_url, job.dest) from None
    except httpx2.TransportError as err:
        if expected is None:  # nothing to verify a cached copy against
            raise _explain(err, file, job.base_url, job.dest) from None
        return None, err
    if expected is not None and (
        refusal := _contradiction(file, file.url(job.base_url), expected, announced)
    ):
        raise refusal
    return announced, None


def _fetch_and_install(
    file: RemoteFile, job: Job, expected: Expected | None, limit: int | None, unreachable: Exception | None
) -> str:
    """Through huggingface_hub's cache into ``--dest``, verified; returns the SHA-256 installed."""
    final, local_only, md5 = job.dest / file.local, job.offline or unreachable is not None, job.md5(file)
    cached = not job.force and isinstance(
        try_to_load_from_cache(file.repo, file.path, cache_dir=job.cache_dir), str
    )
    if not local_only and not cached and limit is not None:
        _check_space(job, file, limit)
    try:
        return install(download(job, file, limit, local_only), final, expected, md5)
    except LocalEntryNotFoundError:
        if unreachable is not None:
            raise _explain(unreachable, file, job.base_url, job.dest) from None
        raise InputError(
            f"HF_HUB_OFFLINE is set and {file.name} is neither in {job.dest} nor in the download cache "
            f"{job.cache_dir}; unset HF_HUB_OFFLINE, or download it by hand from "
            f"{file.url(DEFAULT_BASE_URL)} and put it in {final.parent}"
        ) from None
    except ChecksumMismatch as err:
        if not cached or local_only:
            raise _mismatch(final, md5 if err.what == "md5" else expected, err) from None
        # The cached copy was damaged (it may be a hard link of a --dest file changed in place): fetch it
        # anew.
        print(
            f"{file.name}: the copy in the download cache is damaged ({err.what} {err.actual}); "
            "fetching it again"
        )
    try:
        return install(download(job, file, limit, local_only), final, expected, md5)
    except ChecksumMismatch as err:
        raise _mismatch(final, md5 if err.what == "md5" else expected, err) from None


def fetch_one(file: RemoteFile, job: Job) -> str:
    """Make ``dest/NAME`` the verified file; returns "downloaded" or why it was skipped."""
    final, expected, md5 = job.dest / file.local, job.expected(file), job.md5(file)
    if not job.force and final.is_file() and expected and (reason := verified_copy(final, expected)):
        return reason
    if not job.force and final.is_file() and md5 and (reason := md5_verified_copy(final, md5)):
        job.lock.record(file, check_file(final, None), final.stat().st_size, None, md5.source)
        return f"{reason}, SHA-256 recorded in {LOCK_NAME}"
    announced, unreachable = _ask_host(file, job, expected)
    first_use = expected is None and announced is not None and announced.sha256 is not None
    if first_use:  # trust on first use: only from HTTPS or loopback hosts (check_transport)
        source = f"the SHA-256 {urlsplit(job.base_url).netloc} announced (X-Linked-Etag)"
        expected = Expected(announced.sha256, announced.size, source)
        if not job.force and final.is_file() and not md5 and (reason := verified_copy(final, expected)):
            job.lock.record(file, expected.sha256, final.stat().st_size, announced.revision, source)
            return f"{reason}, recorded in {LOCK_NAME}"
    if expected is None and md5 is None and not job.allow_unverified:
        where = f"{file.url(job.base_url)} announced none" if announced else "HF_HUB_OFFLINE is set"
        raise InputError(
            f"no checksum for {file.name}: {MANIFEST} pins none, {LOCK_NAME} has none and {where}; "
            "pass --allow-unverified to accept the file unverified"
        )
    limit = (expected.size if expected else None) or (announced.size if announced else None)
    digest = _fetch_and_install(file, job, expected, limit, unreachable)
    if expected is None or first_use:
        source = expected.source if expected else "unverified: accepted with --allow-unverified"
        source = f"{md5.source}, checked; {source}" if md5 else source
        job.lock.record(file, digest, final.stat().st_size, announced.revision if announced else None, source)
    return "downloaded"


# ---------------------------------------------------------------- a variant, the CLI


def fetch_files(files: list[RemoteFile], job: Job) -> Summary:
    summary = Summary()
    for i, file in enumerate(files):
        try:
            outcome = fetch_one(file, job)
        except (InputError, RunFailure) as err:
            summary.failed.append((file.local, err))
            print(f"{PROG}: {file.local}: {err}", file=sys.stderr)
            if isinstance(err, HostUnreachable):
                summary.not_tried = [f.local for f in files[i + 1 :]]
                break
            continue
        (summary.downloaded if outcome == "downloaded" else summary.skipped).append(file.local)
        print(f"{file.local}: {outcome}")
    return summary


def extract_mask_archive(manifest: dict[str, Any], variant: str, job: Job, summary: Summary) -> None:
    """Unpack the verified mask archive where MAISI's database expects its masks (``extract_to``)."""
    entry = manifest["variants"][variant].get("mask_archive")
    if entry is None:  # the MR variants have no mask database
        print(f"{variant} has no mask archive: --with-mask-archive fetched nothing more")
        return
    file = RemoteFile(entry["repo"], entry["path"], entry.get("save_as"))
    if file.local not in summary.downloaded + summary.skipped:
        return  # not fetched: already reported
    target, sha256 = job.dest / entry["extract_to"], job.expected(file).sha256
    try:
        outcome = extract_archive(job.dest / file.local, target, sha256)
    except (InputError, RunFailure) as err:
        summary.failed.append((file.local + EXTRACTION, err))
        print(f"{PROG}: {file.local}: {err}", file=sys.stderr)
        return
    print(f"{file.local}: {outcome}")


def _final_error(summary: Summary, total: int) -> InputError | RunFailure:
    message = (
        f"{len(summary.failed)} of {total} file(s) failed ({', '.join(name for name, _ in summary.failed)})"
    )
    if summary.not_tried:
        message += f", {len(summary.not_tried)} not tried ({', '.join(summary.not_tried)})"
    message += "; see above"
    only_input = all(isinstance(err, InputError) for _, err in summary.failed)
    return InputError(message) if only_input else RunFailure(message)


def writable_folder(folder: str | Path, option: str) -> Path:
    """Create ``folder`` and prove it writable now, not after a 2 GB transfer."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise InputError(
            f"cannot write to {option} {folder}: {err.strerror or err}; choose another folder"
        ) from None
    return folder


def check_transport(
    files: list[RemoteFile],
    job_pins: dict[str, Expected],
    lock: Lock,
    base_url: str,
    md5s: dict[str, PublishedMd5] | None = None,
) -> None:
    """Refuse a plain-http host that would have to supply a checksum (any proxy on the way could change
    both); a published MD5 is checked whatever the host announces."""
    covered = {**job_pins, **(md5s or {})}
    unpinned = [f.name for f in files if f.key not in covered and lock.expected(f) is None]
    if unpinned and not may_announce_hash(base_url):
        raise InputError(
            f"--base-url {base_url} is plain http and {', '.join(unpinned)} would be verified against "
            "the hash that host announces; use an https mirror (plain http is accepted only for "
            "loopback hosts, or for files pinned in the manifest)"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, "Download released weights (MAISI CT or MR, the seeds' LDMs), verified.")
    parser.add_argument(
        "--variant", required=True, choices=sorted(load_manifest()["variants"]), help="which released model"
    )
    parser.add_argument("--dest", default="models/maisi", help="folder for the files")
    parser.add_argument(
        "--base-url",
        default=os.environ.get("HF_ENDPOINT", DEFAULT_BASE_URL),
        help="Hugging Face Hub or mirror serving {base_url}/{repo}/resolve/{revision}/{path} "
        f"($HF_ENDPOINT, else {DEFAULT_BASE_URL})",
    )
    parser.add_argument(
        "--cache-dir",
        default=constants.HF_HUB_CACHE,
        help="huggingface_hub's download cache (from HF_HUB_CACHE/HF_HOME)",
    )
    parser.add_argument(
        "--force", action="store_true", help="download again even if verified files are present"
    )
    parser.add_argument(
        "--allow-unverified",
        action="store_true",
        help="accept a file for which neither the manifest, the lock file nor the host gives a "
        "checksum (its computed hash is recorded in the lock file)",
    )
    parser.add_argument(
        "--weights-only", action="store_true", help="skip MAISI's mask-database files (datasets/*.json)"
    )
    parser.add_argument(
        "--with-mask-archive",
        action="store_true",
        help="also fetch the masks of the database (a zip of several GB) and extract them into "
        "DEST/datasets/all_masks_flexible_size_and_spacing_4000",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest()
    files = variant_files(
        manifest, args.variant, datasets=not args.weights_only, mask_archive=args.with_mask_archive
    )
    pins, md5s = manifest_pins(manifest), manifest_md5s(manifest)
    dest = Path(args.dest)
    lock = Lock(dest)  # read (and checked) before anything is created
    check_transport(files, pins, lock, args.base_url, md5s)
    dest, cache_dir = writable_folder(dest, "--dest"), writable_folder(args.cache_dir, "--cache-dir")
    pages = sorted({f"{DEFAULT_BASE_URL}/{f.repo}" for f in files})  # an MR variant's files span repositories
    licence = manifest["variants"][args.variant].get("licence", manifest["licence"])
    print(f"Licence: {licence}: {', '.join(pages)}")
    job = Job(
        dest, args.base_url, cache_dir, args.force, args.allow_unverified, offline_mode(), pins, lock, md5s
    )
    summary = fetch_files(files, job)
    if args.with_mask_archive:
        extract_mask_archive(manifest, args.variant, job, summary)
    total = len(files)  # a failed extraction counts as its archive's failure
    line = (
        f"{args.variant} -> {dest}: {len(summary.downloaded)} downloaded, {len(summary.skipped)} skipped "
        f"(already present), {len(summary.failed)} failed"
    )
    print(line + (f", {len(summary.not_tried)} not tried" if summary.not_tried else ""))
    if summary.failed:
        raise _final_error(summary, total)
    return EXIT_OK


def paths(args: argparse.Namespace) -> RunPaths:
    """Reads only what it downloads; writes into --dest (and the download cache)."""
    return RunPaths().write_into("--dest", args.dest).write_into("--cache-dir", args.cache_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli(args)
    return run_command(PROG, Command(run, paths), args)


if __name__ == "__main__":
    sys.exit(main())
