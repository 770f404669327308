"""Safe, atomic extraction of a downloaded zip archive (MAISI's released mask archive).

Every member is checked before anything is written: an absolute path, a drive letter, a ``..`` component, a
symbolic link or another special file, or a name used twice refuses the whole archive (all of them named).
The members are extracted into a temporary folder next to the target and renamed onto it only when complete,
so the target is either absent, the previous complete extraction, or the new one. A marker file in the target
records the archive's SHA-256 and every extracted file with its size; a rerun with the same archive whose
files are all present with those sizes extracts nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from maisi.atomic import TMP_PATTERN, pid_alive
from maisi.errors import RunFailure
from maisi.files import require_free_space

MARKER = ".maisi-extracted.json"


class UnsafeArchive(RunFailure):
    """The archive holds members that would escape the target folder or are not plain files and folders."""


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why ``info`` may not be extracted, or None when it is a plain file or folder inside the target."""
    name = info.filename.replace("\\", "/")  # a zip written on Windows may use backslashes
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in parts:
        return "a '..' component (outside the target folder)"
    mode = info.external_attr >> 16  # the Unix st_mode, when the archive was written on Unix
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no file type recorded
        return "not a regular file or folder"
    return None


def check_members(infos: list[zipfile.ZipInfo], archive: Path) -> None:
    """Refuse the archive if any member is unsafe (UnsafeArchive naming every one)."""
    problems, seen = [], set()
    for info in infos:
        why = member_problem(info)
        key = info.filename.replace("\\", "/").rstrip("/")
        if why is None and key in seen:
            why = "a name used twice"
        seen.add(key)
        if why:
            problems.append(f"{info.filename!r} ({why})")
    if problems:
        raise UnsafeArchive(
            f"{archive.name} holds {len(problems)} unsafe member(s): {', '.join(problems)}; "
            "nothing was extracted (the archive is not the released one: delete it and its lock-file entry)"
        )


def _relative_names(infos: list[zipfile.ZipInfo], folder: str) -> dict[str, zipfile.ZipInfo]:
    """File members by their path inside the target; a top folder named like the target is dropped."""
    files = [i for i in infos if not i.is_dir()]
    names = [PurePosixPath(i.filename.replace("\\", "/")) for i in files]
    strip = bool(names) and all(len(n.parts) > 1 and n.parts[0] == folder for n in names)
    return {str(PurePosixPath(*n.parts[1:]) if strip else n): i for n, i in zip(names, files)}


def _intact(target: Path, sha256: str) -> dict | None:
    """The marker of a complete extraction of this archive in ``target``, or None."""
    try:
        marker = json.loads((target / MARKER).read_text())
        if marker["sha256"] != sha256:
            return None
        for name, size in marker["files"].items():
            if (target / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return marker


def _remove_stale(parent: Path, name: str) -> None:
    """Temporary folders that killed extractions left (their process is gone)."""
    for path in parent.glob(f".tmp-*-{name}"):
        match = TMP_PATTERN.match(path.name)
        if match and path.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _extract_into(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], folder: Path) -> None:
    for name, info in members.items():
        out = folder / name
        out.parent.mkdir(parents=True, exist_ok=True)
        with (
            zf.open(info) as src,
            open(out, "xb") as dst,
        ):  # zipfile checks the CRC at the end
            shutil.copyfileobj(src, dst, 1 << 20)


def extract_archive(archive: str | Path, target: str | Path, sha256: str) -> str:
    """Extract the verified zip ``archive`` into the folder ``target``; returns what was done.

    Args:
        archive: the zip file (already verified against ``sha256``).
        target: the folder to create or replace (e.g. ``datasets/all_masks_flexible_size_and_spacing_4000``);
            a top folder of that name inside the archive is not repeated.
        sha256: the archive's SHA-256, recorded in the marker file.

    Raises:
        UnsafeArchive: a member that is not a plain file or folder inside ``target`` (nothing extracted).
        RunFailure: a damaged archive (nothing kept).
        InputError: not enough free space next to ``target``.
    """
    archive, target = Path(archive), Path(target)
    if (marker := _intact(target, sha256)) is not None:
        return f"already extracted in {target} ({len(marker['files'])} files, checked by name and size)"
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target.parent, target.name)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    old = target.with_name(f".old-{os.getpid()}-{target.name}")
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            check_members(infos, archive)
            members = _relative_names(infos, target.name)
            total = sum(i.file_size for i in members.values())
            require_free_space(target.parent, total, f"extracting {archive.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _extract_into(zf, members, tmp)
        files = {name: info.file_size for name, info in members.items()}
        (tmp / MARKER).write_text(json.dumps({"archive": archive.name, "sha256": sha256, "files": files}))
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise RunFailure(
            f"{archive.name} is damaged ({err}); nothing was extracted, download it again (--force)"
        ) from None
    except OSError as err:  # e.g. the disk filled up after all
        raise RunFailure(
            f"extracting {archive.name} into {target} failed ({err}); nothing was kept"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return f"extracted {len(files)} files ({total / 1e6:.1f} MB) into {target}"
