"""File helpers shared by the package and the tools: checksums, free space, verified installs.

Writes go through :mod:`maisi.atomic`: a file appears under its final name only once it is complete and,
where a checksum is expected, verified.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

from maisi.atomic import atomic_path
from maisi.errors import InputError


class ChecksumMismatch(ValueError):
    """A file's size, SHA-256 or MD5 is not the expected one; the message gives both values."""

    def __init__(self, path: Path, what: str, expected: str | int, actual: str | int):
        self.path, self.what, self.expected, self.actual = Path(path), what, expected, actual
        super().__init__(f"{Path(path).name}: {what} {actual} is not the expected {expected}")


SYMLINK_LOOP = "is a symlink loop (its links lead back to one another, never to a file)"


def is_symlink_loop(path: str | Path) -> bool:
    """Whether following ``path``'s links never ends (ELOOP), e.g. a -> b -> a."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def why_absent(path: str | Path) -> str:
    """Why ``path`` is not a file to read, for a message: ``"not found"`` or :data:`SYMLINK_LOOP`."""
    return SYMLINK_LOOP if is_symlink_loop(path) else "not found"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed; of a folder (a DICOM series), over its files' names and contents."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def check_md5(path: str | Path, md5: str, chunk: int = 1 << 20) -> None:
    """Check a file against a published MD5 (the only hash some releases publish; SHA-256 is then pinned
    from the bytes that passed this check).

    Raises:
        ChecksumMismatch: the digest differs.
    """
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    if h.hexdigest() != md5.lower():
        raise ChecksumMismatch(Path(path), "md5", md5.lower(), h.hexdigest())


def check_file(path: str | Path, sha256: str | None, size: int | None = None) -> str:
    """The SHA-256 of ``path`` after checking it (and first its size, which is cheap) against what is
    expected.

    Args:
        path: a regular file.
        sha256: expected hex digest (lower case), or None to only compute it.
        size: expected size in bytes, or None.

    Raises:
        ChecksumMismatch: the size or the digest differs.
    """
    path = Path(path)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumMismatch(path, "size", size, actual_size)
    digest = file_sha256(path)
    if sha256 is not None and digest != sha256.lower():
        raise ChecksumMismatch(path, "sha256", sha256.lower(), digest)
    return digest


def require_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse (InputError) before a long transfer that cannot fit in ``folder``."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise InputError(f"not enough space in {folder}: {what} needs {needed} bytes, {free} free")


def install_verified(src: str | Path, dest: str | Path, sha256: str | None, size: int | None = None) -> str:
    """Put the bytes of ``src`` at ``dest`` only if they are the expected ones; returns their SHA-256.

    A hard link when ``src`` and ``dest`` share a file system (no second copy of a large file), else a copy.
    The check runs on what will be renamed onto ``dest``, so ``dest`` never holds unverified bytes; on a
    mismatch ``dest`` is left as it was.

    Raises:
        ChecksumMismatch: ``src`` is not the expected file.
    """
    src = os.path.realpath(src)  # a cache entry may be a symlink; link its target, not the link
    with atomic_path(dest) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not supported
            shutil.copyfile(src, tmp)
        return check_file(tmp, sha256, size)


def output_folder_problem(folder: str | Path, what: str) -> str | None:
    """Why ``folder`` cannot be (made) a writable folder, or None when it can; nothing is created.

    Args:
        folder: the folder.
        what: how the message names it (e.g. ``"output directory"``, ``"$.output_dir"``).
    """
    folder = existing = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{what} {folder} is a file, not a folder"
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{what} {folder} cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == folder else f"cannot be created: {existing} is not writable"
        return f"{what} {folder} {where} (no write permission on {existing})"
    return None


def check_output_dir(folder: str | Path, what: str = "output directory") -> None:
    """Raise InputError when ``folder`` cannot be (made) a writable folder: see
    :func:`output_folder_problem`."""
    problem = output_folder_problem(folder, what)
    if problem:
        raise InputError(problem)


def check_files(files: dict[str, str | None]) -> None:
    """Refuse, at once, every named input file that is not there (``{"$.mask": path}``; None is skipped).

    Raises:
        InputError: ``"$.mask: /path: file not found"``, one line each.
    """
    problems = [
        f"{key}: {path}: file {why_absent(path)}"
        for key, path in files.items()
        if path is not None and not os.path.exists(path)
    ]
    if problems:
        raise InputError(problems[0] if len(problems) == 1 else "\n  ".join(["missing inputs:", *problems]))
