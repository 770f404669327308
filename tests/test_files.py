"""maisi.files: checksums and verified installs (nothing unverified ever appears under the final name)."""

from __future__ import annotations

import hashlib
import re

import pytest

from maisi.errors import InputError
from maisi.files import ChecksumMismatch, check_file, file_sha256, install_verified, require_free_space


def test_check_file_checks_size_then_digest(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert check_file(path, digest, 7) == digest == file_sha256(path)
    assert check_file(path, None) == digest  # only computes
    with pytest.raises(ChecksumMismatch, match="size 7 is not the expected 8") as size_error:
        check_file(path, digest, 8)
    assert size_error.value.what == "size"
    with pytest.raises(ChecksumMismatch) as sha_error:
        check_file(path, "0" * 64)
    assert (sha_error.value.what, sha_error.value.actual) == ("sha256", digest)


def test_install_verified_links_and_never_leaves_wrong_bytes(tmp_path):
    src, dest = tmp_path / "cache" / "blob", tmp_path / "dest" / "w.pt"
    src.parent.mkdir()
    dest.parent.mkdir()
    src.write_bytes(b"released weights")
    dest.write_bytes(b"older file")
    with pytest.raises(ChecksumMismatch):
        install_verified(src, dest, "0" * 64)
    assert dest.read_bytes() == b"older file"  # untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["w.pt"]  # no temporary left
    link = tmp_path / "cache" / "pointer"
    link.symlink_to("blob")  # huggingface_hub's snapshots are relative symlinks to blobs
    digest = install_verified(link, dest, hashlib.sha256(b"released weights").hexdigest(), 16)
    assert dest.read_bytes() == b"released weights" and digest == file_sha256(src)
    assert dest.stat().st_ino == src.stat().st_ino  # same file system: a hard link, no second copy


def test_require_free_space_names_folder_and_sizes(tmp_path):
    require_free_space(tmp_path, 1, "w.pt")
    with pytest.raises(
        InputError, match=re.escape(f"not enough space in {tmp_path}: w.pt needs {10**30} bytes")
    ):
        require_free_space(tmp_path, 10**30, "w.pt")
