"""Installed, not only checked out: a non-editable wheel holds every file the code finds at run time, and a
default that exists only in a source checkout is required by name when maisi is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import maisi
from maisi import resources
from maisi.errors import InputError
from maisi.masks.anatomy import default_database
from maisi.masks.generation import _resolve

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(maisi.__file__).resolve().parent


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """The files of the wheel that setuptools' PEP 517 backend builds from a copy of the project (what
    ``pip wheel --no-build-isolation`` calls; the copy keeps build/ and *.egg-info out of the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "maisi", source / "maisi", ignore=shutil.ignore_patterns("__pycache__"))
    build = f"from setuptools import build_meta; build_meta.build_wheel({str(root)!r})"
    subprocess.run([sys.executable, "-c", build], cwd=source, check=True, capture_output=True)
    (wheel,) = root.glob("maisi-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def in_package(path: Path) -> str:
    return path.resolve().relative_to(PACKAGE.parent).as_posix()


def test_every_data_file_of_the_package_is_in_the_wheel(wheel_files):
    data = {
        in_package(p)
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    assert data, "no data files found"
    assert sorted(data - wheel_files) == []


def test_the_default_mask_database_and_its_masks_are_in_the_wheel(wheel_files):
    database = default_database("tiny-rflow")  # every preset but the released CT ones
    assert in_package(database) in wheel_files
    for entry in json.loads(database.read_text()):
        assert in_package(database.parent / entry["pseudo_label_filename"]) in wheel_files


def test_released_defaults_outside_a_checkout_are_required_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "_CHECKOUT", tmp_path)  # as installed: no pyproject.toml around maisi/
    with pytest.raises(InputError, match=r"\$\.anatomy\.mask_database: null means models/maisi/.* installed"):
        default_database("maisi-ct-rflow")
    for key in ("autoencoder", "diffusion_unet", "size_conditions"):
        with pytest.raises(InputError, match=rf"\$\.anatomy\.mask_generator\.{key}: null means"):
            _resolve(None, key, "maisi-ct-rflow")
    assert default_database("tiny-rflow").is_file()  # package data: found either way
