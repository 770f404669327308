"""Progress bars: tqdm, switched off for the whole process by ``--no-progress``.

Every bar of the package goes through here (MONAI's too: its ``progress`` flags take :func:`shown`), so
that ``--no-progress`` silences all of them.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every progress bar of this process on or off (the CLIs' ``--no-progress``)."""
    global _enabled
    _enabled = enabled


def shown(enabled: bool = True) -> bool:
    """Whether a bar asked for with ``enabled`` is shown: for a library's own ``progress`` flag (MONAI's)."""
    return enabled and _enabled


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, shown when both this call (``enabled``, e.g. rank 0 only) and the process allow it."""
    return tqdm(iterable, disable=not shown(enabled), **kwargs)
