"""Reference data shipped with the package (see README.md in this folder for its origin and licence), and
where the files a run finds by default live: package data (installed with the package) or, for MAISI's
released files that ``python -m maisi.download`` fetches, the source checkout's ``models/maisi``."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from maisi.errors import InputError

PACKAGE_DATA = Path(__file__).resolve().parent
# a source checkout: the folder holding pyproject.toml and maisi/ (absent when maisi is installed as a wheel)
_CHECKOUT = PACKAGE_DATA.parents[1]


@cache
def load_json(name: str) -> Any:
    """Parse a JSON file of this folder, e.g. ``load_json("maisi_label_dict.json")``."""
    return json.loads(resources.files(__name__).joinpath(name).read_text())


def package_file(name: str) -> Path:
    """A file shipped in this folder (package data: present in a checkout and in an installed wheel)."""
    return PACKAGE_DATA / name


def checkout_file(relative: str, key: str) -> Path:
    """``relative`` in the source checkout maisi runs from (e.g. ``models/maisi/...``, where
    ``python -m maisi.download`` puts MAISI's released files by default).

    Raises:
        InputError: maisi is installed (no checkout around it): ``key`` must name the file.
    """
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "maisi" / "__init__.py").is_file():
        return _CHECKOUT / relative
    raise InputError(
        f"{key}: null means {relative} of a maisi source checkout, but maisi is installed at "
        f"{PACKAGE_DATA.parent} without one; download the files (python -m maisi.download --dest DIR) and "
        f"set {key} to the file in DIR"
    )
