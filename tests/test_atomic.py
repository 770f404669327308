"""Folder locks and the clean-up of temporaries that killed writers leave (maisi.atomic)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from maisi.atomic import LOCK_NAME, folder_lock, pid_alive, remove_stale_temporaries
from maisi.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())


def test_stale_temporaries_of_dead_writers_are_removed_and_no_others(tmp_path):
    dead = dead_pid()
    old = time.time() - 60
    stale = tmp_path / f".tmp-{dead}-sample_seed0_image.nii.gz"
    live = tmp_path / f".tmp-{os.getpid()}-sample_seed1_image.nii.gz"  # a writer that is still running
    other_prefix = tmp_path / f".tmp-{dead}-other_seed0.json"  # another job's files: not this run's to judge
    newer = tmp_path / f".tmp-{dead}-sample_seed2.json"  # written after the run started: a reused pid's
    finished = tmp_path / "sample_seed0_image.nii.gz"
    for path in (stale, live, other_prefix, newer, finished):
        path.write_bytes(b"half")
    for path in (stale, live, other_prefix, finished):
        os.utime(path, (old, old))
    started = time.time() - 30
    assert remove_stale_temporaries(tmp_path, "sample_", started) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, other_prefix, newer, finished)
    )


HOLDER = textwrap.dedent(
    """
    import sys, time
    from maisi.atomic import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


@pytest.fixture
def held_lock(tmp_path):
    """Another process holding the lock on tmp_path / 'out'; yields (folder, the process)."""
    folder = tmp_path / "out"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield folder, holder
    finally:
        holder.kill()
        holder.wait()


def test_a_locked_folder_is_refused_naming_the_folder_and_the_holder(held_lock):
    folder, holder = held_lock
    with pytest.raises(InputError) as info:
        with folder_lock(folder):
            pass
    message = str(info.value)
    assert str(folder) in message and f"pid {holder.pid}" in message


def test_the_lock_is_released_and_its_file_removed(tmp_path):
    with folder_lock(tmp_path) as path:
        assert path == tmp_path / LOCK_NAME and path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()
    with folder_lock(tmp_path):  # free again
        pass


def test_a_killed_holder_leaves_the_folder_usable(held_lock):
    folder, holder = held_lock
    holder.kill()
    holder.wait()
    with folder_lock(folder) as path:  # the kernel released the lock; the stale file is taken over
        assert path.read_text() == f"{os.getpid()}\n"
