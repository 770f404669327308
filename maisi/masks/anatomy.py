"""From a description to a mask: the anatomy mode of ``maisi.infer`` (MAISI's retrieval path, plus lesions).

Per sample, in MAISI's order (NV-Generate-CTMR ``LDMSampler``: read, ``ensure_output_size_and_spacing``,
then ``augmentation`` on the output grid):

1. retrieve: :func:`maisi.masks.retrieval.select_masks` picks one database entry per sample (distinct
   where the database allows);
2. read the entry's mask (:func:`maisi.masks.database.read_entry_mask`: grid and SHA-256 checked);
3. resample it (nearest) to the output grid, as MAISI does (:func:`maisi.masks.resample.resample_mask`);
   when that loses a requested class, MAISI's ``find_closest_masks`` drops the candidate and takes the next
   one: so do we (the next best-ranked candidate no other sample uses first), and the metadata records it.
   When no candidate keeps the classes, the request is refused with MAISI's meaning ("Resampled mask does
   not contain required class labels"), naming the classes;
4. augment it (:func:`maisi.masks.augment.augment_mask`, its own stream of the sample's seed:
   :mod:`maisi.seeding`) unless switched off;
   augmentation works in output-grid voxels, as MAISI's (its shifts are in voxels of the output size);
5. place the requested lesions (:func:`maisi.masks.lesions.place_lesions`, a stream of the sample's seed per
   lesion); a lesion's class counts as requested in step 1 (a mask holding it may be retrieved), and every
   tumour class of the final mask is reported per connected piece (``tumour_components``), the placed ones
   marked.

The mask keeps MAISI ids and every organ (MAISI relabels to 1..N and drops the rest). Every step is
recorded for the sample's metadata, with the organs' volumes in mL measured on the final mask.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from maisi.config.infer_config import AnatomyConfig, InferConfig
from maisi.data.io import Volume
from maisi.errors import InputError
from maisi.files import file_sha256, why_absent
from maisi.masks.database import MaskDatabase, label_counts, load_database, read_entry_mask
from maisi.masks.lesions import LesionRequest, place_lesions, tumour_components
from maisi.masks.resample import resample_mask
from maisi.masks.retrieval import Candidate, Selection, select_masks, tumour_ids
from maisi.resources import checkout_file, package_file
from maisi.seeding import stream_seed

if TYPE_CHECKING:
    from maisi.masks.generation import MaskGenerationPlan

log = logging.getLogger(__name__)

# The database each preset uses when $.anatomy.mask_database is null: MAISI's released ones where
# python -m maisi.download puts them in a source checkout, ours as package data.
RELEASED_DATABASES = {
    "maisi-ct-rflow": "models/maisi/datasets/candidate_masks_flexible_size_and_spacing_4000.json",
    "maisi-ct-ddpm": "models/maisi/datasets/candidate_masks_flexible_size_and_spacing_3000.json",
}
SHIPPED_DATABASE = "anatomy/database.json"  # in maisi/resources
CACHE_BYTES = 1 << 30  # prepared masks kept between planning and generation; beyond, they are prepared again


def default_database(preset: str) -> Path:
    """The database a preset uses when the config names none: MAISI's released one or ours.

    Raises:
        InputError: a released preset's database, with maisi installed rather than run from a checkout.
    """
    if preset in RELEASED_DATABASES:
        return checkout_file(RELEASED_DATABASES[preset], "$.anatomy.mask_database")
    return package_file(SHIPPED_DATABASE)


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class SampleMask:
    """A sample's prepared mask on the output grid and the record of how it was made."""

    volume: Volume
    record: dict[str, Any]
    digest: str  # SHA-256 of the voxels, to check that a mask prepared again is the same


@dataclass
class AnatomyState:
    """What an :class:`AnatomyPlan` learns while it prepares masks: the one mutable part of a run's plan.

    Attributes:
        lost: database entry index -> what that entry loses on the output grid: the names of requested
            classes, or ``BLANK`` when no label is left.
        prepared: seed -> its mask, prepared ahead (:func:`prepare_all`) and handed out once
            (:func:`sample_mask`).
        records: seed -> the record of how its mask was made.
    """

    lost: dict[int, list[str]] = field(default_factory=dict)
    prepared: dict[int, SampleMask] = field(default_factory=dict)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class AnatomyPlan:
    """The checked request and the database picks; prepares each sample's mask on demand.

    Attributes:
        database: the loaded database (None when masks are generated).
        database_sha256: SHA-256 of the database file (part of the job's identity).
        selection: picks (one per sample, in seed order) and the full ranking for fallbacks.
        generator: when ``$.anatomy.controllable_anatomy_size`` is set, the mask generator (MAISI's Path A)
            instead of the database.
        anatomy: the request as configured.
        anatomy_ids: ids of ``anatomy.anatomy_list``.
        lesions: the lesions with label ids.
        label_dict: name -> id.
        output_size, spacing: the output grid.
        first_seed: the seed of the first sample (sample i has seed first_seed + i).
        state: what preparing the masks learns and keeps (the plan's only mutable part).
    """

    database: MaskDatabase | None
    database_sha256: str | None
    selection: Selection | None
    anatomy: AnatomyConfig
    anatomy_ids: tuple[int, ...]
    lesions: tuple[LesionRequest, ...]
    label_dict: dict[str, int]
    output_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    first_seed: int
    generator: MaskGenerationPlan | None = None  # Path A: masks are generated, not retrieved
    state: AnatomyState = field(default_factory=AnatomyState, repr=False, compare=False)

    def pick(self, seed: int) -> Candidate:
        """The database entry retrieval picked for the sample of ``seed``."""
        assert self.selection is not None, "masks are generated, not picked"
        return self.selection.picks[seed - self.first_seed]

    @property
    def checksums(self) -> dict[str, str]:
        """SHA-256 of the files the masks come from: the database, or the generator's files."""
        if self.generator is not None:
            return {f"mask_generator_{k}": f["sha256"] for k, f in self.generator.files.items()}
        assert self.database_sha256 is not None
        return {"mask_database": self.database_sha256}

    def sample_record(self, seed: int) -> dict[str, Any]:
        """The record of a seed's mask, once it was built (:func:`prepare_all`, :func:`sample_mask`)."""
        return self.state.records[seed]

    def names(self, ids: Sequence[int]) -> list[str]:
        by_id = {i: n for n, i in self.label_dict.items()}
        return [by_id.get(int(i), str(int(i))) for i in ids]


def plan_anatomy(config: InferConfig, label_dict: dict[str, int], device: str = "cpu") -> AnatomyPlan:
    """Load the database and pick a mask per sample, or (a size request) load the mask generator on
    ``device``; reads or makes no mask yet.

    Raises:
        InputError: an invalid or missing database (or mask files), unknown names, or a request that no
            entry satisfies (the message names the item); for a size request, the generator's files (see
            :func:`maisi.masks.generation.plan_mask_generation`).
    """
    anatomy = config.anatomy
    assert anatomy is not None and config.output_size is not None and config.spacing is not None
    if anatomy.generates_mask:
        import torch

        from maisi.masks.generation import plan_mask_generation
        from maisi.masks.sizes import check_reference_covers

        generator = plan_mask_generation(config, torch.device(device))
        if generator.reference is not None:  # the request's sizes must be on the reference's scale
            where = generator.files["size_reference"]["path"]
            check_reference_covers(generator.reference, anatomy.controllable_anatomy_size, where)
        ids = tuple(label_dict.get(n, -1) for n in anatomy.required_anatomy)
        return AnatomyPlan(
            None,
            None,
            None,
            anatomy,
            ids,
            (),
            label_dict,
            config.output_size,
            config.spacing,
            config.seed,
            generator=generator,
        )
    path = Path(anatomy.mask_database) if anatomy.mask_database else default_database(config.preset)
    if not path.is_file():
        which = (
            "$.anatomy.mask_database" if anatomy.mask_database else f"the default of preset '{config.preset}'"
        )
        advice = (
            "download MAISI's mask database (python -m maisi.download) or set $.anatomy.mask_database"
            if config.preset in RELEASED_DATABASES
            else "build one with python -m maisi.masks index, or set $.anatomy.mask_database"
        )
        raise InputError(f"mask database {path} ({which}) {why_absent(path)}; {advice}")
    database = load_database(path, anatomy.mask_root)
    selection = select_masks(
        database,
        anatomy.anatomy_list,
        anatomy.body_region,
        config.output_size,
        config.spacing,
        config.num_samples,
        config.seed,
        label_dict,
        allowed=[spec.label for spec in anatomy.lesions],  # a lesion's class counts as requested
    )
    lesions = tuple(
        LesionRequest(label_dict[spec.label], spec.diameter_mm, tuple(label_dict[h] for h in spec.host))
        for spec in anatomy.lesions
    )
    ids = tuple(label_dict[n] for n in anatomy.anatomy_list)
    return AnatomyPlan(
        database,
        file_sha256(path),
        selection,
        anatomy,
        ids,
        lesions,
        label_dict,
        config.output_size,
        config.spacing,
        config.seed,
    )


# ------------------------------------------------------------------------------------------ per sample


def _present(array: np.ndarray, ids: Sequence[int]) -> set[int]:
    """Which of ``ids`` occur in ``array`` (chunked bincount: one pass, no sort)."""
    if not len(ids):
        return set()
    found = {int(i) for i in label_counts(array)[0]}
    return {i for i in ids if i in found}


BLANK = "every label (the mask is blank)"  # what a blank mask loses: it is never used


def _resampled(plan: AnatomyPlan, candidate: Candidate) -> tuple[Volume, dict[str, Any], list[str]]:
    """An entry's mask on the output grid, its resampling record, and what it lost: the names of requested
    classes, or :data:`BLANK` when no label is left (the file is blank whatever its entry says, or nothing
    of it lands on the output grid): a blank mask gives a CT of air everywhere."""
    volume = read_entry_mask(plan.database, candidate.entry)
    volume, record = resample_mask(volume, plan.spacing, plan.output_size)
    if not volume.array.any():
        return volume, record, [BLANK]
    lost = sorted(set(plan.anatomy_ids) - _present(volume.array, plan.anatomy_ids))
    return volume, record, plan.names(lost)


def _fallback_order(plan: AnatomyPlan, seed: int) -> list[Candidate]:
    """The sample's pick, then the ranking: candidates no other sample picked first, then the rest."""
    mine = plan.pick(seed)
    others = {c.entry.index for c in plan.selection.picks} - {mine.entry.index}
    rest = [c for c in plan.selection.ranked if c.entry.index != mine.entry.index]
    return (
        [mine]
        + [c for c in rest if c.entry.index not in others]
        + [c for c in rest if c.entry.index in others]
    )


def _lost_everywhere(plan: AnatomyPlan, tried: list[dict[str, Any]]) -> InputError:
    grid = f"{list(plan.output_size)} voxels at {list(plan.spacing)} mm"
    lost = sorted({n for t in tried for n in t["lost"]})
    shown = "; ".join(f"{t['path']} loses {', '.join(repr(n) for n in t['lost'])}" for t in tried[:5])
    more = f"; and {len(tried) - 5} more" if len(tried) > 5 else ""
    return InputError(
        "$.anatomy: resampled mask does not contain required class labels "
        f"{', '.join(repr(n) for n in lost)}: every candidate of {plan.database.path} loses some of them "
        f"on the output grid {grid} ({shown}{more}); tune $.spacing and $.output_size (a larger field of "
        "view or a finer spacing keeps small organs)"
    )


def _retrieve(plan: AnatomyPlan, seed: int) -> tuple[Candidate, Volume, dict[str, Any], list[dict[str, Any]]]:
    """The first candidate (pick, then fallbacks) whose resampled mask keeps every requested class."""
    tried: list[dict[str, Any]] = []
    for candidate in _fallback_order(plan, seed):
        if candidate.entry.index in plan.state.lost:
            tried.append({"path": candidate.entry.path, "lost": plan.state.lost[candidate.entry.index]})
            continue
        volume, record, lost = _resampled(plan, candidate)
        if not lost:
            return candidate, volume, record, tried
        plan.state.lost[candidate.entry.index] = lost
        tried.append({"path": candidate.entry.path, "lost": lost})
        log.warning(
            "seed %d: %s loses %s when resampled to the output grid; trying the next candidate",
            seed,
            candidate.entry.path,
            ", ".join(lost),
        )
    raise _lost_everywhere(plan, tried)


def _augment(plan: AnatomyPlan, mask: Volume, seed: int, device: str) -> tuple[Volume, dict[str, Any]]:
    if not plan.anatomy.augment:
        return mask, {"applied": False, "reason": "$.anatomy.augment is false"}
    from maisi.masks.augment import augment_mask  # imported on use: MONAI's random transforms

    # the augmentation's own stream of the sample's seed (maisi.seeding); the record holds the seed it got
    array, record = augment_mask(mask.array, seed=stream_seed(seed, "augment", bits=32), device=device)
    lost = sorted(set(plan.anatomy_ids) - _present(np.asarray(array), plan.anatomy_ids))
    if lost:  # the augmentation's own checks should prevent it; never trade a requested class for it
        log.warning("seed %d: augmentation removed %s; the mask is used unaugmented", seed, plan.names(lost))
        return mask, {
            "applied": False,
            "reason": f"augmentation removed {plan.names(lost)}",
            "attempt": record,
        }
    return mask.with_array(np.asarray(array, dtype=mask.array.dtype)), {"applied": True, **record}


def _place(
    plan: AnatomyPlan, mask: Volume, seed: int, entry_path: str
) -> tuple[Volume, list[dict[str, Any]]]:
    if not plan.lesions:
        return mask, []
    try:
        mask, records = place_lesions(mask, plan.lesions, seed, plan.label_dict)
    except InputError as e:
        raise InputError(f"$.anatomy.{e} (in the mask of {entry_path}, seed {seed})") from None
    for spec, record in zip(plan.anatomy.lesions, records):
        record.update(label_name=spec.label, host_names=list(spec.host))
    return mask, records


def _tumour_pieces(plan: AnatomyPlan, before: Volume, after: Volume, seed: int) -> dict[str, list[dict]]:
    """Each connected piece of every tumour class in the final mask, by name (a lesion placed in a mask that
    already held its class makes two tumours: they are reported apart); logged when a class has several."""
    placed = before.array != after.array
    present = {int(i) for i in label_counts(after.array)[0]}
    out = {}
    for label in sorted(tumour_ids(plan.label_dict) & present):
        name = plan.names([label])[0]
        out[name] = pieces = tumour_components(after, label, placed)
        if len(pieces) > 1:
            log.info(
                "seed %d: '%s' is %d separate components: %s",
                seed,
                name,
                len(pieces),
                ", ".join(
                    f"{p['volume_ml']:g} mL at voxel {p['centre_voxel']}"
                    + (" (placed)" if p["placed"] else " (in the retrieved mask)")
                    for p in pieces
                ),
            )
    return out


def organ_volumes_ml(mask: Volume, plan: AnatomyPlan) -> dict[str, float]:
    """Volume in mL of every label in the mask (background excluded), by name."""
    ids, counts = label_counts(mask.array)
    voxel_ml = float(np.prod(mask.spacing)) / 1000.0
    pairs = [(int(i), int(c)) for i, c in zip(ids, counts) if i != 0]
    names = plan.names([i for i, _ in pairs])
    return {name: round(c * voxel_ml, 3) for name, (_, c) in zip(names, pairs)}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def build_sample_mask(
    plan: AnatomyPlan, seed: int, device: str = "cpu", progress: bool = False
) -> SampleMask:
    """Retrieve, read, resample (with fallback), augment and place lesions for the sample of ``seed``.

    ``device`` is where the augmentation runs (``cpu`` or ``cuda``). With a size request the mask is
    generated instead (:func:`maisi.masks.generation.generate_mask`; ``progress``: its bars).

    Raises:
        InputError: no candidate keeps the requested classes on the output grid, a lesion's host is not in
            the mask or too small, or a database mask that is not what its entry says; a generated mask
            without a requested organ.
    """
    if plan.generator is not None:
        from maisi.masks.generation import generate_mask

        mask, record = generate_mask(plan.generator, seed, progress)
        record["organ_volumes_ml"] = organ_volumes_ml(mask, plan)
        plan.state.records[seed] = record
        return SampleMask(mask, record, _digest(mask.array))
    assert plan.database is not None
    candidate, mask, resampling, tried = _retrieve(plan, seed)
    mask, augmentation = _augment(plan, mask, seed, device)
    before = mask
    mask, lesions = _place(plan, mask, seed, candidate.entry.path)
    tumours = _tumour_pieces(plan, before, mask, seed)
    entry = candidate.entry
    path = plan.database.mask_path(entry)
    record = {
        "request": {
            "anatomy_list": list(plan.anatomy.anatomy_list),
            "body_region": list(plan.anatomy.body_region),
        },
        "database": {
            "path": str(plan.database.path),
            "sha256": plan.database_sha256,
            "entries": len(plan.database.entries),
        },
        "entry": {
            "index": entry.index,
            "path": entry.path,
            "file": str(path),
            "sha256": entry.record.get("sha256") or file_sha256(path),
            "dim": list(entry.dim),
            "spacing": list(entry.spacing),
            "rank": candidate.rank,
            "score": round(candidate.score, 4),
            "why": candidate.why(),
        },
        "fallback_from": tried,
        "resampling": resampling,
        "augmentation": augmentation,
        "lesions": lesions,
        "tumour_components": tumours,
        "organ_volumes_ml": organ_volumes_ml(mask, plan),
    }
    plan.state.records[seed] = record
    return SampleMask(mask, record, _digest(mask.array))


def prepare_all(plan: AnatomyPlan, seeds: Sequence[int], device: str = "cpu") -> dict[int, str]:
    """Build every sample's mask once, so that bad input surfaces before any work.

    Masks are kept while they fit :data:`CACHE_BYTES`; :func:`sample_mask` builds the others again (the same
    for the same seed). Returns each seed's mask digest. Generated masks (a size request) are not made here:
    that is the work of the sample (minutes each with MAISI's model), done only for unfinished samples.
    """
    if plan.generator is not None:
        return {}
    digests, kept = {}, 0
    for seed in seeds:
        sample = build_sample_mask(plan, seed, device)
        digests[seed] = sample.digest
        if kept + sample.volume.array.nbytes <= CACHE_BYTES:
            plan.state.prepared[seed] = sample
            kept += sample.volume.array.nbytes
    return digests


def sample_mask(
    plan: AnatomyPlan,
    seed: int,
    planned_digest: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> SampleMask:
    """The prepared mask of a seed: the kept one, or built again (checked against ``planned_digest``);
    ``progress``: the bars of a generated mask."""
    if seed in plan.state.prepared:
        return plan.state.prepared.pop(seed)
    sample = build_sample_mask(plan, seed, device, progress)
    if planned_digest is not None and sample.digest != planned_digest:
        raise RuntimeError(
            f"seed {seed}: the mask built again differs from the planned one (non-deterministic)"
        )
    return sample
