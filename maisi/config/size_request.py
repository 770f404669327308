"""The size request of MAISI's mask generation: the 10 size slots and MAISI's rules on a request (pure).

No numpy or torch: the config layer calls :func:`size_request_problems` while it validates a config.
:mod:`maisi.masks.sizes` holds the numerical side (the size table, the snap, the size scale).

A request is a list of ``(name, size)`` pairs, e.g. ``[("liver", 0.5), ("hepatic tumor", 0.3)]``. The rules
are those of MAISI's ``check_input_ct`` (NV-Generate-CTMR ``scripts/sample_mask.py``): at most 10 entries,
each name one of the 10 slots, no name twice, at most one tumour (counted whatever its size, -1 included),
each size in [0, 1] or exactly -1. One rule is ours: at least one size that is not -1. A request of only
absences names nothing the mask must hold (MAISI accepts it, then checks the resampled mask for the absent
classes and fails, or saves a label filtered down to them, i.e. empty); it is usually -1 misread as "no
preference".
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, get_args

from maisi.options import SizeSlot

SIZE_SLOTS: tuple[str, ...] = get_args(SizeSlot)
# MAISI ids of the slots, same order (its label dictionary).
SLOT_IDS: tuple[int, ...] = (10, 1, 12, 4, 62, 23, 24, 26, 27, 128)
TUMOUR_SLOTS: tuple[str, ...] = SIZE_SLOTS[5:]
ABSENT = -1.0  # the size that asks for the organ or tumour to be absent (see maisi.masks.sizes)
WHERE = "$.anatomy.controllable_anatomy_size"


def _unknown_name(name: object) -> str:
    text = str(name)
    hints = difflib.get_close_matches(text.lower(), SIZE_SLOTS, n=2, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
    return f"unknown name {text!r}{hint} (the size slots: {', '.join(SIZE_SLOTS)})"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def size_request_problems(entries: Sequence[Any], where: str = WHERE) -> list[str]:
    """Every way ``entries`` breaks MAISI's rules, each message starting with the entry's JSON path.

    Args:
        entries: ``(name, size)`` pairs as the user wrote them.
        where: the JSON path of the list (messages name ``where[i]``).

    Returns:
        The problems; empty when the request is valid.
    """
    if len(entries) > len(SIZE_SLOTS):  # MAISI's first check; the entries' own problems would bury it
        return [
            f"{where}: {len(entries)} entries; at most {len(SIZE_SLOTS)} (one per size slot, as in MAISI)"
        ]
    problems: list[str] = []
    first_seen: dict[str, int] = {}
    tumour_at: int | None = None
    for i, entry in enumerate(entries):
        here = f"{where}[{i}]"
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            problems.append(f"{here}: got {entry!r}, expected a [name, size] pair")
            continue
        name, size = entry
        if name not in SIZE_SLOTS:
            problems.append(f"{here}: {_unknown_name(name)}")
        elif name in first_seen:
            problems.append(f"{here}: {name!r} repeats entry {first_seen[name]}; name each slot once")
        else:
            first_seen[name] = i
            if name in TUMOUR_SLOTS:
                if tumour_at is not None:
                    problems.append(
                        f"{here}: a second tumour {name!r} (entry {tumour_at} is "
                        f"{entries[tumour_at][0]!r}); MAISI's mask generation takes at most one tumour"
                    )
                else:
                    tumour_at = i
        if not _is_number(size):
            problems.append(f"{here}: size {size!r} is not a number")
        elif size != ABSENT and not 0.0 <= size <= 1.0:
            problems.append(f"{here}: size {size:g} of {name!r} is outside [0, 1] and not -1 (absent)")
    sizes = [entry[1] for entry in entries if isinstance(entry, Sequence) and len(entry) == 2]
    if entries and not problems and all(size == ABSENT for size in sizes):
        problems.append(
            f"{where}: every size is -1 (absent), so the request names no organ or tumour for the mask to "
            "hold; give at least one a size in [0, 1] (-1 means absent, not 'no preference'), or leave the "
            "list empty to retrieve a mask (anatomy_list / body_region)"
        )
    return problems


def slot_index(name: str) -> int:
    """Position of a slot name in the size vector."""
    return SIZE_SLOTS.index(name)
