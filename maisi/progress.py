"""Progress bars: tqdm, switched off for the whole process by ``--no-progress``."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every progress bar of this process on or off (the CLIs' ``--no-progress``)."""
    global _enabled
    _enabled = enabled


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, shown when both this call (``enabled``, e.g. rank 0 only) and the process allow it."""
    return tqdm(iterable, disable=not (enabled and _enabled), **kwargs)
