"""``python -m maisi`` lists the commands."""

from __future__ import annotations

print("maisi commands:\n  python -m maisi.infer --config FILE   generate CT volumes (see --help)")
