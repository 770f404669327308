"""``python -m maisi.download``: fetch the released MAISI CT weights into ``models/maisi``.

    python -m maisi.download --variant rflow-ct --dest models/maisi [--base-url URL] [--force] [-v]

What each variant needs is listed in ``maisi/resources/released_weights.json`` (Hugging Face repo, path, sha256,
size); a file is served at ``{base_url}/{repo}/resolve/main/{path}`` and saved flat in ``--dest`` under its base
name, where ``configs/inference_maisi_*_ct.json`` look for it.

Verification: against the manifest's sha256 when it pins one, otherwise against the SHA-256 the host announces
(Hugging Face: ``X-Linked-Etag``/``X-Linked-Size`` on its redirect of an LFS file; else an ``ETag`` that is 64 hex
digits). With neither, the file is refused unless ``--allow-unverified``. The bytes go to ``NAME.part`` (resumed
with a ``Range`` request on the next run), are hashed, and only a verified file is renamed (atomically) to
``NAME``; a ``NAME.sha256`` sidecar (``sha256sum -c`` format) then lets later runs skip it. ``--force`` fetches
everything again.

Environment: ``HF_ENDPOINT`` is the default ``--base-url`` (a mirror); ``HF_TOKEN`` is sent to huggingface.co only
(gated repositories); ``https_proxy``/``no_proxy`` are honoured by urllib.

Exit codes (the :mod:`maisi.cli` contract):
  0  every file of the variant is present and verified (downloaded now or skipped as already there)
  2  something you must fix (InputError): a bad ``--variant`` (argparse), a ``--dest`` that cannot be written or
     lacks the space, a file the host does not have (HTTP 404: check ``--base-url``) or refuses (401/403: accept
     the licence on the model page, set ``HF_TOKEN``), no checksum to verify against (``--allow-unverified``)
  1  a runtime failure, worth retrying (RunFailure): the host cannot be reached or times out, a server error,
     an interrupted transfer (the ``.part`` is kept: run again to resume), a checksum mismatch (the corrupt
     download is deleted: run again)
Files are fetched one after the other; a failure does not stop the others, except an unreachable host (the rest
would fail the same way). With several failures the exit code is 2 only if all of them are of the exit-2 kind.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit

from tqdm import tqdm

import maisi
from maisi.atomic import atomic_path
from maisi.checkpoints import file_sha256
from maisi.cli import EXIT_OK, run_guarded, setup_logging
from maisi.errors import InputError, RunFailure
from maisi.resources import load_json

PROG = "maisi.download"
MANIFEST = "released_weights.json"
DEFAULT_BASE_URL = "https://huggingface.co"
URL_TEMPLATE = "{base_url}/{repo}/resolve/main/{path}"
CHUNK = 1 << 20
TIMEOUT_S = 60.0  # per socket operation, not per file
MAX_REDIRECTS = 5
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REDIRECTS = (301, 302, 303, 307, 308)
# Errors of a connection: URLError (incl. HTTPError) when opening; the rest also while the bytes flow (reset,
# timed out, cut short). Disk errors (OSError of our own writes) are not among them: they keep their traceback.
_NET_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)

log = logging.getLogger(__name__)


class HostUnreachable(RunFailure):
    """The host could not be reached at all; the remaining files are not tried."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a variant, as the manifest lists it."""

    repo: str
    path: str
    sha256: str | None
    size: int | None

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def url(self, base_url: str) -> str:
        return URL_TEMPLATE.format(base_url=base_url.rstrip("/"), repo=self.repo, path=self.path)


@dataclass(frozen=True)
class Expected:
    """What the downloaded bytes must be; ``None`` where neither the manifest nor the host says."""

    sha256: str | None
    size: int | None


@dataclass
class Summary:
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, Exception]] = field(default_factory=list)
    not_tried: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- manifest


def load_manifest() -> dict[str, Any]:
    """The packaged manifest (tests replace this function)."""
    return load_json(MANIFEST)


def variant_files(manifest: dict[str, Any], variant: str) -> list[RemoteFile]:
    """The files of ``variant``; a malformed manifest is a packaging bug, hence ValueError (exit 1)."""
    entries = manifest["variants"][variant]["files"]
    files = [RemoteFile(f["repo"], f["path"], f.get("sha256"), f.get("size")) for f in entries]
    for f in files:
        if f.sha256 is not None and not _HEX64.fullmatch(f.sha256):
            raise ValueError(f"{MANIFEST}: {f.path}: sha256 must be 64 lower-case hex digits or null, got {f.sha256!r}")
        if f.size is not None and (not isinstance(f.size, int) or f.size <= 0):
            raise ValueError(f"{MANIFEST}: {f.path}: size must be a positive integer or null, got {f.size!r}")
    return files


# ---------------------------------------------------------------- HTTP


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hugging Face answers an LFS file with a 302 to its CDN and puts the checksum on that 302, so read it there."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        return None  # urllib then raises HTTPError carrying the 3xx headers


def _request(url: str, method: str = "GET", range_from: int = 0) -> urllib.request.Request:
    req = urllib.request.Request(url, method=method, headers={"User-Agent": f"maisi-download/{maisi.__version__}"})
    if range_from:
        req.add_header("Range", f"bytes={range_from}-")  # kept across redirects by urllib
    token, host = os.environ.get("HF_TOKEN"), urlsplit(url).hostname or ""
    if token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
        req.add_unredirected_header("Authorization", f"Bearer {token}")  # never forwarded to the CDN or a mirror
    return req


def _sha_from_etag(value: str | None) -> str | None:
    """``"<64 hex>"`` (possibly weak, ``W/"..."``) -> the hex digest; anything else (a git SHA-1) -> None."""
    if not value:
        return None
    value = value.strip().removeprefix("W/").strip('"').lower()
    return value if _HEX64.fullmatch(value) else None


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _announced(headers: Any, final: bool) -> Expected:
    """Checksum and size a response announces; Content-Length only counts on the final (non-redirect) answer."""
    sha = _sha_from_etag(headers.get("X-Linked-Etag")) or _sha_from_etag(headers.get("ETag"))
    size = _int_or_none(headers.get("X-Linked-Size"))
    if size is None and final:
        size = _int_or_none(headers.get("Content-Length"))
    return Expected(sha, size)


def probe(url: str) -> Expected:
    """HEAD ``url`` hop by hop and return what the host announces about the file (HTTPError/URLError pass up)."""
    opener = urllib.request.build_opener(_NoRedirect)
    for _ in range(MAX_REDIRECTS):
        try:
            with opener.open(_request(url, "HEAD"), timeout=TIMEOUT_S) as resp:
                log.debug("HEAD %s -> %s %s", url, resp.status, dict(resp.headers))
                return _announced(resp.headers, final=True)
        except urllib.error.HTTPError as err:
            if err.code not in _REDIRECTS or not err.headers.get("Location"):
                raise
            err.close()
            log.debug("HEAD %s -> %s %s", url, err.code, dict(err.headers))
            found = _announced(err.headers, final=False)
            if found.sha256:
                return found
            url = urljoin(url, err.headers["Location"])  # a renamed repo: follow
    raise RunFailure(f"more than {MAX_REDIRECTS} redirects from {url}")


def _explain(err: Exception, url: str, file: RemoteFile, dest: Path) -> InputError | RunFailure:
    """A network or HTTP error as one line saying what happened and what to do."""
    by_hand = f"download {file.name} by hand from {file.url(DEFAULT_BASE_URL)} and put it in {dest}"
    if isinstance(err, urllib.error.HTTPError):
        err.close()  # it holds the response's socket
        what = f"{url} answered HTTP {err.code} {err.reason}"
        if err.code == 404:
            return InputError(f"{what}: the file is not there; check --base-url, or {by_hand}")
        if err.code in (401, 403):
            return InputError(f"{what}: the repository may be gated; accept its licence on the model page and set "
                              f"HF_TOKEN, or {by_hand}")  # fmt: skip
        return RunFailure(f"{what}; try again later, or {by_hand}")
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    folder = PurePosixPath(file.path).parent
    page = f"{DEFAULT_BASE_URL}/{file.repo}/tree/main/{folder}" if str(folder) != "." else file.url(DEFAULT_BASE_URL)
    return HostUnreachable(f"cannot reach {urlsplit(url).netloc} ({url}: {reason}); check your connection or "
                           f"proxy, or download the files by hand from {page} and put them in {dest}")  # fmt: skip


# ---------------------------------------------------------------- local files


def prepare_dest(dest: str | Path) -> Path:
    """Create ``dest`` and prove it writable now, not after a 2 GB transfer."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest, prefix=".write-test-"):
            pass
    except OSError as err:
        raise InputError(f"cannot write to --dest {dest}: {err.strerror or err}; choose another folder") from None
    return dest


def _sidecar(final: Path) -> Path:
    return final.with_name(final.name + ".sha256")


def _read_sidecar(path: Path) -> str | None:
    try:
        words = path.read_text().split()
    except OSError:
        return None
    return words[0].lower() if words and _HEX64.fullmatch(words[0].lower()) else None


def _write_sidecar(final: Path, sha: str) -> None:
    with atomic_path(_sidecar(final)) as tmp:
        tmp.write_text(f"{sha}  {final.name}\n")  # `sha256sum -c NAME.sha256` checks it


def already_present(final: Path, expected: Expected) -> str | None:
    """Why ``final`` need not be fetched again, or None. A sidecar vouches for an earlier verification."""
    if not final.is_file() or (expected.size is not None and final.stat().st_size != expected.size):
        return None
    recorded = _read_sidecar(_sidecar(final))
    if recorded is not None and expected.sha256 in (None, recorded):
        return "already present, verified"
    if recorded is None and expected.sha256 is not None and file_sha256(final) == expected.sha256:
        _write_sidecar(final, expected.sha256)  # put there by hand: hashed once, trusted from now on
        return "already present, verified (checksum computed)"
    return None


def _check_space(dest: Path, part: Path, expected: Expected) -> None:
    if expected.size is None:
        return
    needed = expected.size - (part.stat().st_size if part.exists() else 0)
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise InputError(f"not enough space in {dest}: {part.name.removesuffix('.part')} needs {needed} more bytes, "
                         f"{free} free")  # fmt: skip


# ---------------------------------------------------------------- transfer


def _open_from(url: str, part: Path) -> tuple[http.client.HTTPResponse, str]:
    """GET ``url`` resuming after the bytes of ``part``; returns the response and the file mode to write with."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = urllib.request.urlopen(_request(url, range_from=offset), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        err.close()
        print(f"{part.name}: the host refused to resume at byte {offset}; starting again from zero")
        part.unlink()  # longer than the file: not a prefix of it
        return urllib.request.urlopen(_request(url), timeout=TIMEOUT_S), "wb"
    name = part.name.removesuffix(".part")
    if resp.status == 206:
        if offset and _range_start(resp) == offset:
            print(f"{name}: resuming at byte {offset}")
            return resp, "ab"
        resp.close()  # a range we did not ask for: useless, and the .part may not be a prefix either
        part.unlink(missing_ok=True)
        raise RunFailure(f"{url} answered a partial response that does not continue {part.name}; run again")
    if offset:
        print(f"{name}: the host ignored the resume request; starting again from zero")
    return resp, "wb"


def _range_start(resp: http.client.HTTPResponse) -> int | None:
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def fetch_to_part(url: str, part: Path, expected: Expected) -> None:
    """Stream ``url`` into ``part`` (appending when the host resumes); the .part survives an interruption."""
    if expected.size is not None and part.exists() and part.stat().st_size >= expected.size:
        if part.stat().st_size == expected.size:
            return  # complete already (an earlier run stopped before verifying)
        part.unlink()
    resp, mode = _open_from(url, part)
    with resp, open(part, mode) as out:
        start = out.tell()
        length = _int_or_none(resp.headers.get("Content-Length"))
        total = expected.size if expected.size is not None else (start + length if length is not None else None)
        name = part.name.removesuffix(".part")
        with tqdm(total=total, initial=start, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                  disable=None, leave=False) as bar:  # fmt: skip
            while block := resp.read(CHUNK):
                out.write(block)
                bar.update(len(block))
    if length is not None and part.stat().st_size < start + length:
        raise http.client.IncompleteRead(b"", start + length - part.stat().st_size)


def verify(part: Path, name: str, expected: Expected) -> str:
    """SHA-256 of the finished ``part``; a wrong size or checksum raises RunFailure (exit 1)."""
    size = part.stat().st_size
    if expected.size is not None and size < expected.size:
        raise RunFailure(f"{name}: transfer ended at {size} of {expected.size} bytes; run again to resume")
    if expected.size is not None and size > expected.size:
        part.unlink()
        raise RunFailure(f"{name}: got {size} bytes, the host announced {expected.size}; deleted it, run again")
    got = file_sha256(part)
    if expected.sha256 is not None and got != expected.sha256:
        part.unlink()
        raise RunFailure(f"checksum mismatch for {name}: expected sha256 {expected.sha256}, got {got} (corrupted "
                         "transfer or a changed file on the host); the download was deleted, run again")  # fmt: skip
    return got


def install(part: Path, final: Path, sha: str) -> None:
    """Rename the verified ``part`` onto ``final``; the sidecar comes last, so it never vouches for other bytes."""
    _sidecar(final).unlink(missing_ok=True)
    os.replace(part, final)
    _write_sidecar(final, sha)


# ---------------------------------------------------------------- one file, a variant


def expected_for(file: RemoteFile, url: str) -> Expected:
    """The manifest's pins, completed by what the host announces; a pin the host contradicts is an error."""
    if file.sha256 is not None and file.size is not None:
        return Expected(file.sha256, file.size)
    announced = probe(url)
    if file.sha256 is not None and announced.sha256 not in (None, file.sha256):
        raise RunFailure(f"{url} now serves a different {file.name} (sha256 {announced.sha256}) than the manifest "
                         f"pins ({file.sha256}); update {MANIFEST} once you trust the new file")  # fmt: skip
    return Expected(file.sha256 or announced.sha256, file.size if file.size is not None else announced.size)


def fetch_one(file: RemoteFile, dest: Path, base_url: str, force: bool, allow_unverified: bool) -> str:
    """Make ``dest/NAME`` the verified file; returns "downloaded" or why it was skipped."""
    url, final = file.url(base_url), dest / file.name
    part = final.with_name(final.name + ".part")
    try:
        expected = expected_for(file, url)
    except _NET_ERRORS as err:
        offline = _offline_skip(final, file)
        if offline and not force and not isinstance(err, urllib.error.HTTPError):
            return offline
        raise _explain(err, url, file, dest) from None
    if force:
        part.unlink(missing_ok=True)
    elif reason := already_present(final, expected):
        return reason
    if expected.sha256 is None and not allow_unverified:
        raise InputError(f"no checksum for {file.name}: {MANIFEST} pins none and {url} announced none; "
                         "pass --allow-unverified to accept the file unverified")  # fmt: skip
    _check_space(dest, part, expected)
    try:
        fetch_to_part(url, part, expected)
    except urllib.error.URLError as err:  # HTTPError included: no bytes came
        raise _explain(err, url, file, dest) from None
    except _NET_ERRORS as err:  # the host answered, then the transfer broke off
        got = part.stat().st_size if part.exists() else 0
        raise RunFailure(f"{file.name}: transfer interrupted at {got} bytes ({err!r}); run again to resume") from None
    install(part, final, verify(part, file.name, expected))
    return "downloaded"


def _offline_skip(final: Path, file: RemoteFile) -> str | None:
    """A file verified by an earlier run still counts when the host cannot be asked now."""
    recorded = _read_sidecar(_sidecar(final))
    if final.is_file() and recorded is not None and file.sha256 in (None, recorded):
        return "already present, verified earlier (host not reached)"
    return None


def fetch_variant(variant: str, dest: Path, base_url: str, force: bool, allow_unverified: bool) -> Summary:
    files, summary = variant_files(load_manifest(), variant), Summary()
    for i, file in enumerate(files):
        try:
            outcome = fetch_one(file, dest, base_url, force, allow_unverified)
        except (InputError, RunFailure) as err:
            summary.failed.append((file.name, err))
            print(f"{PROG}: {file.name}: {err}", file=sys.stderr)
            if isinstance(err, HostUnreachable):
                summary.not_tried = [f.name for f in files[i + 1 :]]
                break
            continue
        (summary.downloaded if outcome == "downloaded" else summary.skipped).append(file.name)
        print(f"{file.name}: {outcome}")
    return summary


def _final_error(summary: Summary, total: int) -> InputError | RunFailure:
    message = f"{len(summary.failed)} of {total} file(s) failed ({', '.join(name for name, _ in summary.failed)})"
    if summary.not_tried:
        message += f", {len(summary.not_tried)} not tried ({', '.join(summary.not_tried)})"
    message += "; see above"
    only_input = all(isinstance(err, InputError) for _, err in summary.failed)
    return InputError(message) if only_input else RunFailure(message)


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Download the released MAISI CT weights (verified).")
    parser.add_argument("--variant", required=True, choices=sorted(load_manifest()["variants"]))
    parser.add_argument("--dest", default="models/maisi", help="folder for the files (default: models/maisi)")
    parser.add_argument("--base-url", default=os.environ.get("HF_ENDPOINT", DEFAULT_BASE_URL),
                        help="host serving {base_url}/{repo}/resolve/main/{path} (default: $HF_ENDPOINT or "
                             f"{DEFAULT_BASE_URL})")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="download again even if verified files are present")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="accept a file for which neither the manifest nor the host gives a checksum")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (HTTP headers)")
    return parser


def run(args: argparse.Namespace) -> int:
    dest = prepare_dest(args.dest)
    manifest = load_manifest()
    print(f"Licence: {manifest['licence']}: {manifest['model_page']}")
    summary = fetch_variant(args.variant, dest, args.base_url, args.force, args.allow_unverified)
    total = len(summary.downloaded) + len(summary.skipped) + len(summary.failed) + len(summary.not_tried)
    line = (f"{args.variant} -> {dest}: {len(summary.downloaded)} downloaded, {len(summary.skipped)} skipped "
            f"(already present), {len(summary.failed)} failed")  # fmt: skip
    print(line + (f", {len(summary.not_tried)} not tried" if summary.not_tried else ""))
    if summary.failed:
        raise _final_error(summary, total)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
