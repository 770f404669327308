"""Pick database masks for a request: MAISI's filter, v2's closest-match ranking, seeded distinct picks.

Filter (MAISI's ``find_masks``): every requested anatomy id is in the entry's ``label_list``; every
requested body region lies within the entry's [top, bottom]; entries holding a tumour that was not
requested are excluded (MAISI's tumour ids 23, 24, 26, 27, 128, plus tumour classes a user added to the
label dictionary); a class that will be placed as a lesion counts as requested (a mask may hold it).

Ranking (NV-Generate-CTMR ``find_closest_masks``): per axis, |FOV difference| / 10 (mm) as the main term,
plus |dim difference| / 100 plus |spacing difference| (mm); an entry with ``dim <= output_size - 128`` on
any axis is rejected (it would be upsampled too much).

Picks: the best ``max(2 * num_samples, 5)`` candidates form the pool (MAISI's size); the samples draw
from it without replacement with a seeded RNG, so they differ wherever the database allows (MAISI's picks
repeat, tutorials #1881), and wrap around when it holds fewer candidates than samples.
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from maisi.errors import InputError
from maisi.labels import load_label_dict
from maisi.masks.database import MaskDatabase, MaskEntry
from maisi.masks.request import tumour_ids
from maisi.options import REGION_INDEX

UPSAMPLE_MARGIN = 128  # v2: reject dim <= output_size - 128 on any axis
MIN_POOL = 5  # MAISI keeps at least 5 candidates


def resolve_anatomy(names: Sequence[str], label_dict: dict[str, int]) -> list[int]:
    """Label-dictionary names -> ids, refusing unknown names with did-you-mean suggestions (all at once).

    Raises:
        InputError: some names are not in the dictionary, or a name is given twice.
    """
    problems = []
    for name in names:
        if name not in label_dict:
            hints = difflib.get_close_matches(name, list(label_dict), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
            problems.append(f"unknown anatomy '{name}'{hint}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    problems += [f"anatomy '{n}' is given more than once" for n in repeated]
    if problems:
        raise InputError(
            "; ".join(problems) + " (names as in the label dictionary: python -m maisi.labels show)"
        )
    return [label_dict[n] for n in names]


def resolve_regions(names: Sequence[str]) -> list[int]:
    """Body-region names (MAISI's spellings, case-insensitive, or ours) -> region indices 0..3.

    Raises:
        InputError: an unknown name, with did-you-mean suggestions.
    """
    problems, out = [], []
    for name in names:
        key = name.strip().lower()
        if key in REGION_INDEX:
            out.append(REGION_INDEX[key])
            continue
        hints = difflib.get_close_matches(key, list(REGION_INDEX), n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
        problems.append(f"unknown body region '{name}'{hint}")
    if problems:
        raise InputError("; ".join(problems) + f" (known: {', '.join(REGION_INDEX)})")
    return out


@dataclass(frozen=True)
class MaskRequest:
    """What the masks must hold and the grid they will be resampled to.

    Attributes:
        anatomy: label-dictionary names that must all be present.
        regions: body-region names that must lie within each mask's [top, bottom].
        output_size: target size in voxels (x, y, z).
        spacing: target spacing in mm (x, y, z).
    """

    anatomy: tuple[str, ...]
    regions: tuple[str, ...]
    output_size: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.output_size) != 3 or any(int(s) != s or s < 1 for s in self.output_size):
            raise InputError(f"output size {list(self.output_size)}: expected 3 positive integers")
        if len(self.spacing) != 3 or any(not (math.isfinite(s) and s > 0) for s in self.spacing):
            raise InputError(f"spacing {list(self.spacing)}: expected 3 finite positive values in mm")

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.output_size, self.spacing))  # type: ignore[return-value]


@dataclass(frozen=True)
class Candidate:
    """A database entry that passes the filter, with its closest-match score (lower is closer).

    Attributes:
        entry: the database entry.
        rank: 1-based position in the ranking.
        fov_term, dim_term, spacing_term: the score's parts; ``score`` is their sum.
    """

    entry: MaskEntry
    rank: int
    fov_term: float
    dim_term: float
    spacing_term: float

    @property
    def score(self) -> float:
        return self.fov_term + self.dim_term + self.spacing_term

    def why(self) -> str:
        """The score as a sum of its terms, e.g. ``score 3.21 = FOV 2.90 + dim 0.26 + spacing 0.05``."""
        return (
            f"score {self.score:.2f} = FOV {self.fov_term:.2f} + dim {self.dim_term:.2f} "
            f"+ spacing {self.spacing_term:.2f}"
        )


@dataclass(frozen=True)
class Selection:
    """The picks (one per sample) and the full ranking (for a fallback when a pick fails later)."""

    picks: tuple[Candidate, ...]
    ranked: tuple[Candidate, ...]
    pool_size: int
    matched: int  # entries that passed the filter (before the upsampling rule)


def passes_filter(
    entry: MaskEntry, anatomy: Sequence[int], regions: Sequence[int], tumours: frozenset[int]
) -> bool:
    """MAISI's filter: every anatomy id present, every region within [top, bottom], no unrequested tumour."""
    if not set(anatomy) <= entry.label_ids:
        return False
    if not all(entry.covers(r) for r in regions):
        return False
    return not (entry.label_ids & (tumours - set(anatomy)))


def too_small(entry: MaskEntry, output_size: Sequence[int]) -> bool:
    """v2's rule: an entry with ``dim <= output_size - 128`` on some axis would be upsampled too much."""
    return any(d <= n - UPSAMPLE_MARGIN for d, n in zip(entry.dim, output_size))


def rank_candidates(entries: Sequence[MaskEntry], request: MaskRequest) -> list[Candidate]:
    """Entries that survive the upsampling rule, closest first (ties broken by path, so runs are stable)."""
    scored = []
    for entry in entries:
        if too_small(entry, request.output_size):
            continue
        fov = sum(abs(a - b) for a, b in zip(entry.fov_mm, request.fov_mm)) / 10.0
        dim = sum(abs(a - b) for a, b in zip(entry.dim, request.output_size)) / 100.0
        spacing = sum(abs(a - b) for a, b in zip(entry.spacing, request.spacing))
        scored.append((fov + dim + spacing, entry.path, fov, dim, spacing, entry))
    scored.sort(key=lambda item: (item[0], item[1]))
    return [Candidate(entry, i + 1, fov, dim, sp) for i, (_, _, fov, dim, sp, entry) in enumerate(scored)]


def _quote(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def explain_no_match(
    db: MaskDatabase,
    request: MaskRequest,
    anatomy: Sequence[int],
    regions: Sequence[int],
    label_dict: dict[str, int],
    allowed: frozenset[int] = frozenset(),
) -> str:
    """Which requested item no entry satisfies, checked from the simplest cause to the combination;
    ``allowed``: tumour ids a mask may hold though not required (lesion classes)."""
    entries, where = db.entries, f"{db.path} ({len(db.entries)} entries)"
    if not entries:
        return f"{db.path} holds no entries"
    for name, label in zip(request.anatomy, anatomy):
        if not any(label in e.label_ids for e in entries):
            return f"no entry of {where} holds '{name}'"
    for region_name, region in zip(request.regions, regions):
        if not any(e.covers(region) for e in entries):
            return f"no entry of {where} covers body region '{region_name}'"
        for name, label in zip(request.anatomy, anatomy):
            if not any(label in e.label_ids and e.covers(region) for e in entries):
                return f"no entry of {where} holds '{name}' within '{region_name}'"
    within = f" within {_quote(request.regions)}" if request.regions else ""
    holding = [e for e in entries if set(anatomy) <= e.label_ids and all(e.covers(r) for r in regions)]
    if not holding:
        return f"no entry of {where} holds {_quote(request.anatomy)} together{within}"
    tumours, names = tumour_ids(label_dict) - allowed, {i: n for n, i in label_dict.items()}
    if not any(passes_filter(e, anatomy, regions, tumours) for e in holding):
        unwanted = sorted(set().union(*(e.label_ids & (tumours - set(anatomy)) for e in holding)))
        return (
            f"every entry of {where} holding {_quote(request.anatomy) or 'the request'}{within} also holds "
            f"a tumour that was not requested ({_quote([names.get(i, str(i)) for i in unwanted])}); "
            "request it too or index tumour-free masks"
        )
    largest = [max(e.dim[a] for e in holding) for a in range(3)]
    return (
        f"all {len(holding)} entries of {where} that match are too small for output size "
        f"{list(request.output_size)}: each has dim <= output size - {UPSAMPLE_MARGIN} on some axis "
        f"(largest dims {largest}); request a smaller output size or a coarser spacing"
    )


def _resolve_names(request: MaskRequest, label_dict: dict[str, int]) -> tuple[list[int], list[int]]:
    """Anatomy ids and region indices; unknown names of both kinds are reported together."""
    problems, ids, regions = [], [], []
    try:
        ids = resolve_anatomy(request.anatomy, label_dict)
    except InputError as e:
        problems.append(str(e))
    try:
        regions = resolve_regions(request.regions)
    except InputError as e:
        problems.append(str(e))
    if problems:
        raise InputError("; ".join(problems))
    return ids, regions


def select_masks(
    db: MaskDatabase,
    anatomy: Sequence[str],
    body_regions: Sequence[str],
    output_size: Sequence[int],
    spacing: Sequence[float],
    num_samples: int,
    seed: int,
    label_dict: dict[str, int] | None = None,
    allowed: Sequence[str] = (),
) -> Selection:
    """Pick ``num_samples`` database masks for a request, reproducibly for a given ``seed``.

    Args:
        db: a loaded database (:func:`maisi.masks.database.load_database`).
        anatomy: label-dictionary names that every mask must hold (e.g. ``["liver", "hepatic tumor"]``).
        body_regions: region names (``head``, ``chest``/``thorax``, ``abdomen``, ``pelvis``/``lower``).
        output_size: target grid size in voxels (x, y, z).
        spacing: target spacing in mm (x, y, z).
        num_samples: how many picks (one per generated sample).
        seed: seeds the draw from the best-ranked pool.
        label_dict: name -> id; None: MAISI's dictionary.
        allowed: names a mask may hold though not required: the classes placed as lesions afterwards (a mask
            holding a lung tumour is fit for a second one), exempt from the unrequested-tumour rule.

    Returns:
        The picks in sample order and the full ranking.

    Raises:
        InputError: unknown names, a bad grid or count, or a request no entry satisfies (the message names
            the requested item that fails).
    """
    if num_samples < 1:
        raise InputError(f"number of samples {num_samples}: expected at least 1")
    label_dict = label_dict if label_dict is not None else load_label_dict()
    grid = tuple(output_size), tuple(spacing)
    request = MaskRequest(tuple(anatomy), tuple(body_regions), *grid)  # type: ignore[arg-type]
    ids, regions = _resolve_names(request, label_dict)
    exempt = frozenset(label_dict[n] for n in allowed if n in label_dict)
    tumours = tumour_ids(label_dict) - exempt
    matched = [e for e in db.entries if passes_filter(e, ids, regions, tumours)]
    ranked = rank_candidates(matched, request)
    if not ranked:
        why = explain_no_match(db, request, ids, regions, label_dict, exempt)
        raise InputError("cannot select masks: " + why)
    pool = list(ranked[: max(2 * num_samples, MIN_POOL)])
    order = random.Random(seed).sample(pool, len(pool))  # a seeded permutation: distinct until it wraps
    picks = tuple(order[i % len(order)] for i in range(num_samples))
    return Selection(picks, tuple(ranked), len(pool), len(matched))
