"""MAISI's augmentation of a retrieved mask, on MONAI transforms, seeded, on CPU or GPU.

Only the first matching rule applies (:data:`maisi.masks.tumours.RULES`, MAISI's order): a bone lesion
moves by a random affine warp, a hepatic, lung, pancreatic or colon tumour by a random elastic warp;
a mask without any of them gets a whole-body zoom of 0.99-1.01 (nearest, same shape). A moved tumour's
old voxels become its host (liver, pancreas, colon, the most common neighbouring lung lobe, or body for
bone). A draw is accepted when the moved tumour, kept inside its host mask (closed with a 5-voxel box
unless the rule says otherwise) and then closed itself, still holds the rule's share of its voxels;
otherwise the next draw of the same seeded generator is tried. If no draw is accepted within the bound,
the mask comes back unchanged and the record says so: a tumour never leaves its host.

Where this differs from MAISI, and why:
- A tumour is only written over its host's voxels or its own old ones (MAISI writes over whatever the
  closed host covers, e.g. a vessel in a liver notch), so every other label is untouched.
- Acceptance is judged on the tumour as written (after the closing and the rule above), so the size
  guarantee holds for the output, not for an intermediate.
- The warp is computed on a box around the tumour (MAISI warps the whole volume): rotation and scaling act
  about the tumour's centre instead of the volume's, and a 256^3 mask takes seconds instead of a minute per
  try on a CPU. MAISI's z-rotation of up to pi about the volume centre for lung tumours, which can throw a
  tumour into the other lung, becomes a spin of the tumour in place; the translation ranges are MAISI's.
- Tries are bounded (MAISI loops until a draw fits, except for colon) and seeded (MAISI v1 is not).

Tries can take a while (seconds each for a large tumour on a CPU): they show a progress bar (through
:mod:`maisi.progress`, so ``--no-progress`` hides it), each try is logged at debug level (``-v``), and the
outcome is logged once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import Rand3DElastic, RandAffine, RandZoom, dilate, erode
from monai.utils import convert_to_tensor

from maisi.device import resolve_device
from maisi.errors import InputError
from maisi.masks.tumours import (
    BODY_ZOOM,
    CLOSING_KERNEL,
    ELASTIC_MAGNITUDE,
    ELASTIC_SIGMA,
    RING_KERNEL,
    RULES,
    TumourRule,
    rule_for,
)
from maisi.monai_internals import rand_zoom_factors
from maisi.progress import progress_bar

log = logging.getLogger(__name__)

DEFAULT_MAX_TRIES = 60
# How far Rand3DElastic's smoothed offsets move a voxel, at most, in practice: the offsets are uniform
# noise in [-1, 1] smoothed with sigma >= 5 (std about 0.007) times a magnitude <= 200: about 1.5 voxels
# per standard deviation, at most about 6 over a 73^3 box (measured over 5 draws).
_ELASTIC_REACH = 6


def augment_mask(
    mask: np.ndarray,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    max_tries: int = DEFAULT_MAX_TRIES,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply MAISI's first matching augmentation rule to a mask in MAISI ids.

    Args:
        mask: label volume (X, Y, Z), integer MAISI ids.
        seed: seeds the MONAI transform's generator (0 <= seed < 2**32); each retry is its next draw.
        device: where the warps and the morphology run (``cpu``, ``cuda``, ``auto``).
        max_tries: the most draws tried before the mask is returned unchanged.

    Returns:
        The augmented mask (same shape and dtype) and a JSON-ready record: ``rule``, ``warp`` (the MONAI
        transform), ``seed``, ``device``, ``tries``, ``accepted``, ``reason`` (why not, else None),
        ``params`` (what the accepted or last draw drew), ``changed_voxels``; for a tumour rule also
        ``tumour_label``, ``host_labels``, ``refill_label``, ``min_ratio``, ``tumour_voxels_before``,
        ``tumour_voxels_after`` and ``work_box`` (start and size of the warped box, voxels).

    Raises:
        InputError: the mask is not a 3D integer array, or the seed, device or bound is invalid.
    """
    _check_inputs(mask, seed, max_tries)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    # a scan per tumour id is much cheaper than np.unique (a sort) on a 256^3 mask
    rule = rule_for(rule.tumour for rule in RULES if np.any(mask == rule.tumour))
    if rule is None:
        return _body_zoom(mask, seed, dev)
    return _move_tumour(mask, rule, seed, dev, max_tries)


def _check_inputs(mask: object, seed: object, max_tries: object) -> None:
    if not isinstance(mask, np.ndarray) or mask.ndim != 3 or mask.dtype.kind not in "iu":
        what = f"{mask.ndim}D {mask.dtype}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise InputError(f"mask: expected a 3D integer array of MAISI ids (X, Y, Z), got {what}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InputError(f"seed: expected an integer in 0..2**32-1, got {seed!r}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise InputError(f"max_tries: expected an integer >= 1, got {max_tries!r}")


def _body_zoom(mask: np.ndarray, seed: int, device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    """MAISI's fallback: zoom the whole mask by 0.99-1.01 (nearest), cropped or padded back to its shape."""
    zoom = RandZoom(min_zoom=BODY_ZOOM[0], max_zoom=BODY_ZOOM[1], mode="nearest", prob=1.0, keep_size=True)
    zoom.set_random_state(seed=int(seed))
    # float32 holds every id up to 2**24 exactly; nearest sampling never mixes labels
    volume = torch.as_tensor(mask.astype(np.float32), device=device)[None]
    zoomed = convert_to_tensor(zoom(volume), track_meta=False)[0]
    out = zoomed.round().cpu().numpy().astype(mask.dtype)
    record = _record("body zoom", "RandZoom", seed, device, tries=1, accepted=True, reason=None)
    record["params"] = {"zoom": rand_zoom_factors(zoom)}
    record["changed_voxels"] = int(np.count_nonzero(out != mask))
    return out, record


def _move_tumour(
    mask: np.ndarray, rule: TumourRule, seed: int, device: torch.device, max_tries: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Warp the rule's tumour until a draw stays in its host and keeps its size; refill its old voxels."""
    refill = rule.refill if rule.refill is not None else _neighbour_host(mask, rule)
    box = _WorkBox.around(mask == rule.tumour, rule)
    record = _record(rule.name, _warp_name(rule), seed, device, tries=0, accepted=False, reason=None)
    record.update(
        tumour_label=rule.tumour,
        host_labels=list(rule.hosts),
        refill_label=refill,
        min_ratio=rule.min_ratio,
        work_box={"start": list(box.start), "size": list(box.size)},
        params=None,
    )
    labels = torch.as_tensor(box.crop(mask).astype(np.int64), device=device)
    tumour = labels == rule.tumour
    before = int(tumour.sum())
    record.update(tumour_voxels_before=before, tumour_voxels_after=before, changed_voxels=0)
    if refill is None:
        record["reason"] = f"no host label {list(rule.hosts)} in the mask to refill tumour {rule.tumour} with"
        return mask.copy(), record
    if np.iinfo(mask.dtype).max < refill:
        raise InputError(f"mask: dtype {mask.dtype} cannot hold the refill label {refill}")

    # the moved tumour may only replace host voxels or its own old ones
    writable = torch.isin(labels, torch.tensor(rule.hosts, device=device)) | tumour
    warp = _make_warp(rule, device)
    warp.set_random_state(seed=int(seed))
    source = tumour[None].float()
    limit = max_tries if rule.give_up_after is None else min(max_tries, rule.give_up_after)
    start = time.perf_counter()
    tries = progress_bar(
        range(1, limit + 1), desc=f"moving {rule.name} (seed {seed})", unit="try", leave=False
    )
    with tries:
        for attempt in tries:
            moved = convert_to_tensor(warp(source, spatial_size=box.size), track_meta=False)[0] > 0.5
            placed = _place(moved, writable, rule.close_host)
            after = int(placed.sum())
            record.update(tries=attempt, params=_drawn(warp), min_ratio=rule.ratio_at(attempt))
            log.debug(
                "seed %d: %s try %d/%d keeps %d of %d voxels (needs %.0f%%)",
                seed,
                rule.name,
                attempt,
                limit,
                after,
                before,
                100 * rule.ratio_at(attempt),
            )
            if after >= rule.ratio_at(attempt) * before:
                break
        else:
            record["reason"] = (
                f"no draw in {limit} tries kept >= {rule.ratio_at(limit):.0%} of the {before} voxels of "
                f"tumour {rule.tumour} inside its host; mask returned unchanged"
            )
            log.info(
                "augmentation of seed %d: %s not moved: %s (%.1f s)",
                seed,
                rule.name,
                record["reason"],
                time.perf_counter() - start,
            )
            return mask.copy(), record
    log.info(
        "augmentation of seed %d: %s moved on try %d of %d, keeping %d of its %d voxels (%.1f s)",
        seed,
        rule.name,
        attempt,
        limit,
        after,
        before,
        time.perf_counter() - start,
    )

    result = labels.clone()
    result[tumour] = refill
    result[placed] = rule.tumour
    out = mask.copy()
    box.paste(out, result.cpu().numpy().astype(mask.dtype))
    record.update(
        accepted=True,
        tumour_voxels_after=after,
        changed_voxels=int(np.count_nonzero(out != mask)),
    )
    return out, record


def _record(
    rule: str, warp: str, seed: int, device: torch.device, *, tries: int, accepted: bool, reason: str | None
) -> dict[str, Any]:
    return {
        "rule": rule,
        "warp": warp,
        "seed": int(seed),
        "device": str(device),
        "tries": tries,
        "accepted": accepted,
        "reason": reason,
    }


def _warp_name(rule: TumourRule) -> str:
    return "Rand3DElastic" if rule.warp == "elastic" else "RandAffine"


def _make_warp(rule: TumourRule, device: torch.device) -> Rand3DElastic | RandAffine:
    """The rule's MONAI random warp (nearest, zeros outside), always applied."""
    common: dict[str, Any] = {
        "prob": 1.0,
        "mode": "nearest",
        "padding_mode": "zeros",
        "translate_range": rule.translate,
        "rotate_range": rule.rotate,
        "scale_range": rule.scale,
        "device": device,
    }
    if rule.warp == "elastic":
        return Rand3DElastic(sigma_range=ELASTIC_SIGMA, magnitude_range=ELASTIC_MAGNITUDE, **common)
    return RandAffine(**common)


def _drawn(warp: Rand3DElastic | RandAffine) -> dict[str, Any]:
    """What the last draw of ``warp`` chose (rotation in radians, translation in voxels, scale factor)."""
    grid = warp.rand_affine_grid
    params: dict[str, Any] = {
        "rotate": [float(v) for v in grid.rotate_params or []],
        "translate": [float(v) for v in grid.translate_params or []],
        "scale": [float(v) for v in grid.scale_params or []],
    }
    if isinstance(warp, Rand3DElastic):
        params.update(sigma=float(warp.sigma), magnitude=float(warp.magnitude))
    return params


def _place(moved: torch.Tensor, writable: torch.Tensor, close_host: bool) -> torch.Tensor:
    """The moved tumour as written: cut to its host (closed if the rule says so), closed, on writable voxels.

    Both closings run on the moved tumour's bounding box grown by their joint reach (4 voxels), which gives
    the same voxels there as closing the whole work box, at a fraction of the cost.
    """
    placed = torch.zeros_like(moved)
    found = moved.nonzero()
    if found.numel() == 0:
        return placed
    margin = 2 * (CLOSING_KERNEL // 2)
    lo = (found.min(dim=0).values - margin).clamp(min=0).tolist()
    hi = (found.max(dim=0).values + margin + 1).tolist()
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    host = _close(writable[sub]) if close_host else writable[sub]
    placed[sub] = _close(moved[sub] & host) & writable[sub]
    return placed


def _close(binary: torch.Tensor) -> torch.Tensor:
    """Morphological closing with MAISI's 5-voxel box (MONAI's dilate then erode)."""
    x = binary[None, None].float()
    return erode(dilate(x, CLOSING_KERNEL), CLOSING_KERNEL)[0, 0] > 0.5


def _neighbour_host(mask: np.ndarray, rule: TumourRule) -> int | None:
    """The host id most common right around the tumour (lung: the lobe it sits in).

    Falls back to the host most common in the whole mask when no host touches the tumour (as MAISI v2),
    and to ``None`` when the mask holds no host at all. Ties go to the lower id.
    """
    tumour = mask == rule.tumour
    box = _WorkBox.bounds(tumour, margin=RING_KERNEL // 2)
    part = torch.as_tensor(box.crop(mask).astype(np.int64))
    core = part == rule.tumour
    ring = (dilate(core[None, None].float(), RING_KERNEL)[0, 0] > 0.5) & ~core
    hosts = torch.tensor(rule.hosts)
    values = part[ring & torch.isin(part, hosts)]
    if values.numel() == 0:
        values = torch.as_tensor(mask[np.isin(mask, rule.hosts)].astype(np.int64))
    if values.numel() == 0:
        return None
    counts = torch.stack([(values == h).sum() for h in rule.hosts])
    return int(rule.hosts[int(torch.argmax(counts))])


@dataclass(frozen=True)
class _WorkBox:
    """A box of the volume (it may reach past the edges, which read as background) where the warp runs."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @classmethod
    def bounds(cls, binary: np.ndarray, margin: int) -> _WorkBox:
        """The bounding box of ``binary`` grown by ``margin`` voxels on every side."""
        nonzero = np.nonzero(binary)
        lo = [int(ax.min()) - margin for ax in nonzero]
        hi = [int(ax.max()) + margin for ax in nonzero]
        return cls(tuple(lo), tuple(h - lo_ + 1 for lo_, h in zip(lo, hi)))  # type: ignore[arg-type]

    @classmethod
    def around(cls, tumour: np.ndarray, rule: TumourRule) -> _WorkBox:
        """A cube centred on the tumour, big enough for any draw of the rule to land inside."""
        points = np.argwhere(tumour)
        centre = (points.min(axis=0) + points.max(axis=0)) // 2
        radius = float(np.sqrt(((points - centre) ** 2).sum(axis=1).max())) + 1.0  # the tumour fits in it
        # the warp samples the source at rotate(scale * (x + offset)) + shift, so the tumour shows up within
        # about (radius + shift) / (1 - scale) of the centre on each axis, plus the elastic offsets and the
        # closing's reach. A rare draw reaching past the box loses that part, then must pass the size check.
        extra = (_ELASTIC_REACH if rule.warp == "elastic" else 0) + CLOSING_KERNEL // 2 + 1
        halves = [math.ceil((radius + t) / (1.0 - max(rule.scale)) + extra) for t in rule.translate]
        start = tuple(int(c) - h for c, h in zip(centre, halves))
        return cls(start, tuple(2 * h + 1 for h in halves))  # type: ignore[arg-type]

    def _spans(self, shape: tuple[int, ...]) -> list[tuple[slice, slice]]:
        """Per axis: the slice of the volume inside the box, and where it sits in the box."""
        spans = []
        for start, size, n in zip(self.start, self.size, shape):
            lo, hi = max(start, 0), min(start + size, n)
            spans.append((slice(lo, hi), slice(lo - start, hi - start)))
        return spans

    def crop(self, volume: np.ndarray) -> np.ndarray:
        """The box's content; voxels past the volume's edges are 0 (background)."""
        out = np.zeros(self.size, dtype=volume.dtype)
        spans = self._spans(volume.shape)
        out[tuple(b for _, b in spans)] = volume[tuple(v for v, _ in spans)]
        return out

    def paste(self, volume: np.ndarray, content: np.ndarray) -> None:
        """Write the part of ``content`` that lies inside the volume back into it (in place)."""
        spans = self._spans(volume.shape)
        volume[tuple(v for v, _ in spans)] = content[tuple(b for _, b in spans)]
