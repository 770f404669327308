"""Atomic file writes: write under a temporary name in the same folder, then rename.

A crash or an interrupt leaves either the old file or no file, never half of a new one. A killed process
(SIGKILL, power loss) leaves its temporary behind: :func:`remove_stale_temporaries` clears those of dead
processes. :func:`folder_lock` keeps two runs from writing into one folder at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from maisi.errors import InputError

TMP_PATTERN = re.compile(r"^\.tmp-(\d+)-(.+)$")  # the names atomic_path gives: .tmp-<pid>-<final name>
LOCK_NAME = ".maisi.lock"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the full suffix (``.nii.gz``, ``.nrrd``) because writers such as SimpleITK
    choose the file format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(folder: str | Path, prefix: str, started: float) -> list[Path]:
    """Delete the temporaries that killed writers left in ``folder``, and return them.

    Only ``.tmp-<pid>-<prefix>...`` files are touched (the caller's own outputs), and only when process
    ``pid`` no longer exists and the file was last modified before ``started`` (the caller's start time,
    from ``time.time()``): a live writer's file, or one a reused pid is writing now, is left alone.
    """
    removed = []
    for path in Path(folder).iterdir():
        match = TMP_PATTERN.match(path.name)
        if not match or not match.group(2).startswith(prefix) or not path.is_file():
            continue
        try:
            if pid_alive(int(match.group(1))) or path.stat().st_mtime >= started:
                continue
            path.unlink()
        except FileNotFoundError:  # renamed or removed meanwhile by whoever wrote it
            continue
        removed.append(path)
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` on ``<folder>/.maisi.lock``) for the block.

    The lock file holds the holder's pid and is removed when the block ends. The lock is released by the
    kernel when the process dies, so a killed run never leaves the folder locked.

    Raises:
        InputError: another process holds the lock; the message names the folder and the holder's pid.
    """
    path = Path(folder) / LOCK_NAME
    fd = _acquire(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no other process holds a lock on this file
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            message = f"output directory {path.parent}: its lock {path} is a folder; remove it"
            raise InputError(message) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(
                f"output directory {path.parent} is in use by another run (pid {holder}, lock file {path}); "
                "wait for it to finish or write elsewhere"
            ) from None
        # The previous holder removes the file when it is done: if it did so between our open and our
        # lock, we hold a lock on a deleted file and must try again on the new one.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
