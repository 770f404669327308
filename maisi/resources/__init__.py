"""Reference data shipped with the package (see README.md in this folder for its origin and licence)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def load_json(name: str) -> Any:
    """Parse a JSON file of this folder, e.g. ``load_json("maisi_label_dict.json")``."""
    return json.loads(resources.files(__name__).joinpath(name).read_text())
