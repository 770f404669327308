"""What a run reads and writes, declared in one place and checked by one guard before any work.

Every command declares its inputs (files and folders, each with the key a message names it by: ``$.mask``,
``--datalist``, ``the image of $.training[3]``) and its outputs: the files it writes, and the folders it
writes into. :meth:`RunPaths.check` then refuses, at once and before anything is read in earnest or written,
every output that would land on an input or on another output:

- an output file that is an input, however it is spelled: the same path, a symlink to it, a hard link to it
  (same device and inode);
- an output file inside an input folder (a DICOM series, a folder of masks);
- an output folder the run owns (it chooses the names inside: a training run folder) that holds an input;
- two outputs that are one file;
- an output file that is an existing folder, a folder lock that is not a file (whether a folder can be
  created and written is each command's own check, with its own advice).

Each problem names both sides by their key and path; :class:`maisi.errors.InputError` carries them all
(exit code 2 in every CLI).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from maisi.errors import InputError

LOCK_NAME = ".maisi.lock"  # the file :func:`maisi.atomic.folder_lock` takes inside a folder

WriteKind = Literal["file", "folder", "owned"]


@dataclass(frozen=True)
class Declared:
    """One path of a run: ``key`` is how messages name it (``$.output.dir``, ``--output``)."""

    key: str
    path: Path
    kind: str = "file"
    lock: bool = False
    group: str | None = None  # outputs of one group (a case's latent, sidecar, label) collide once


def identities(path: Path) -> set:
    """Keys under which two spellings name one file: the absolute path as written (a symlink there would be
    replaced), the path with every symlink resolved, and device + inode of an existing file (hard links,
    bind mounts, case-insensitive file systems)."""
    keys: set = {os.path.abspath(path), os.path.realpath(path)}
    try:
        st = path.stat()
        keys.add((st.st_dev, st.st_ino))
    except (OSError, RuntimeError):  # missing, or a symlink loop: its spellings still identify it
        pass
    return keys


def _inside(path: Path, folder: Path) -> bool:
    """``path`` (symlinks resolved) is ``folder`` or lies under it."""
    inner, outer = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return inner == outer or outer in inner.parents


def _shown(entry: Declared) -> str:
    real = os.path.realpath(entry.path)
    alias = "" if real == os.path.abspath(entry.path) else f" (= {real})"
    return f"{entry.key} {entry.path}{alias}"


@dataclass
class RunPaths:
    """The inputs and outputs of one run; build it with :meth:`read` / :meth:`write` / :meth:`write_into`,
    then :meth:`check` it before any work."""

    inputs: list[Declared] = field(default_factory=list)
    outputs: list[Declared] = field(default_factory=list)

    def read(self, key: str, path: str | Path | None) -> RunPaths:
        """Declare an input file or folder (a folder is recognised on the disk); None is ignored."""
        if path is not None:
            self.inputs.append(Declared(key, Path(path)))
        return self

    def write(self, key: str, path: str | Path | None, group: str | None = None) -> RunPaths:
        """Declare a file the run writes (or replaces); None is ignored.

        Args:
            key: how messages name it.
            path: the file.
            group: who writes it (a case, a sample): a collision of two groups is reported once.
        """
        if path is not None:
            self.outputs.append(Declared(key, Path(path), "file", group=group))
        return self

    def write_into(self, key: str, folder: str | Path, owned: bool = False, lock: bool = False) -> RunPaths:
        """Declare a folder the run creates and writes into.

        Args:
            key: how messages name it.
            folder: the folder.
            owned: the run chooses the names inside (a training run folder): no input may lie in it. When
                False, only the files declared with :meth:`write` are written there.
            lock: the run takes the folder's lock (``.maisi.lock``), which must not be a folder.
        """
        self.outputs.append(Declared(key, Path(folder), "owned" if owned else "folder", lock))
        return self

    @property
    def writes(self) -> bool:
        """Whether the run writes anything."""
        return bool(self.outputs)

    def problems(self) -> list[str]:
        """Every way an output would land on an input or on another output, one line each."""
        inputs = {}
        for entry in self.inputs:
            for ident in identities(entry.path):
                inputs.setdefault(ident, entry)
        input_folders = [e for e in self.inputs if e.path.is_dir()]
        problems: list[str] = []
        claimed: dict = {}
        reported: set[tuple[str, str]] = set()
        for out in self.outputs:
            problems += self._shape_problems(out)
            idents = identities(out.path)
            hit = next((inputs[i] for i in idents if i in inputs), None)
            if hit is not None:
                problems.append(f"{_shown(out)} would overwrite {_shown(hit)}")
            elif (around := next((f for f in input_folders if _inside(out.path, f.path)), None)) is not None:
                problems.append(f"{_shown(out)} would be written inside the folder {_shown(around)}")
            if out.kind == "owned":
                for entry in self.inputs:
                    if entry is not hit and _inside(entry.path, out.path):
                        problems.append(
                            f"{_shown(entry)} lies inside {_shown(out)}, a folder this run writes into"
                        )
            if out.kind == "file":
                other = next((claimed[i] for i in idents if i in claimed), None)
                pair = (other.group or other.key, out.group or out.key) if other is not None else None
                if other is not None and pair not in reported:
                    reported.add(pair)  # type: ignore[arg-type]
                    problems.append(f"{_shown(out)} and {_shown(other)} are one file: both would write it")
                for ident in idents:
                    claimed.setdefault(ident, out)
        return list(dict.fromkeys(problems))

    @staticmethod
    def _shape_problems(out: Declared) -> list[str]:
        path = out.path
        if out.kind == "file":
            return [f"{out.key} {path} is a folder; give a file name"] if path.is_dir() else []
        lock = path / LOCK_NAME
        if out.lock and (lock.is_dir() or (lock.exists() and not lock.is_file())):
            return [f"{out.key} {path}: its lock {lock} is a folder, not a file; remove it"]
        return []

    def check(self, what: str = "run") -> None:
        """Refuse the run when any output would land on an input or on another output.

        Args:
            what: the verb of the refusal (``"generate"``, ``"encode"``).

        Raises:
            InputError: listing every problem, each naming the output and the input (or the other output)
                by key and path.
        """
        problems = self.problems()
        if problems:
            raise InputError(
                f"refusing to {what}: {len(problems)} output(s) would land on an input or another output "
                "(nothing was written; choose other output paths):\n  " + "\n  ".join(problems)
            )
