"""Pre-encoded latents (from ``maisi.encode``) as training cases, checked before the first step.

Every case is verified up front: the latent exists, is readable and finite (a NaN or inf latent would
turn the loss NaN, or worse the scale factor), its sidecar's checksum and shape agree with the file, the
conditions the preset needs are there, and a label (ControlNet) lies on the grid ``factor`` times the
latent's. Problems are listed all at once. Only paths and conditions are kept: training reads each step's
latents (and labels) when it draws them, in DataLoader workers ahead of the step when ``$.loader.num_workers``
asks for them (:class:`CaseDraw`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi.conditioning import BODY_REGIONS, Conditions, binarize_labels
from maisi.data.io import read_geometry, read_mask
from maisi.data.latents import read_latent, read_sidecar
from maisi.errors import InputError, VolumeError
from maisi.families.ct import Preset
from maisi.files import file_sha256


@dataclass(frozen=True)
class LatentCase:
    latent: Path
    label: Path | None
    conditions: Conditions
    shape: tuple[int, ...]  # (C, x, y, z)


def _region(one_hot: list[int] | None):
    return BODY_REGIONS[list(one_hot).index(1)] if one_hot and 1 in one_hot else None


def load_latent(path: Path) -> np.ndarray:
    """(C, x, y, z) latent, refused when any value is NaN or infinite.

    Raises:
        VolumeError: unreadable, not 4D, or not finite (naming the file and the count).
    """
    data = read_latent(path)[0]
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise VolumeError(
            f"{path}: latent holds {bad} non-finite value(s) (NaN or inf) of {data.size}; "
            "re-encode it (maisi.encode refuses non-finite CT unless nonfinite is fill_air)"
        )
    return data


def check_latent_file(
    where: str, latent: Path, sidecar: dict[str, Any]
) -> tuple[tuple[int, ...] | None, list[str]]:
    """Read ``latent`` and compare it with its ``sidecar`` (shared by the CT and mask latent datalists).

    Returns:
        ``(shape, problems)``: the (C, x, y, z) shape and where the file disagrees with its sidecar (shape,
        checksum); ``(None, [why])`` when the latent is unreadable or not finite.
    """
    try:
        shape = tuple(int(s) for s in load_latent(latent).shape)
    except VolumeError as e:
        return None, [f"{where}.image: {e}"]
    problems = []
    if list(shape) != list(sidecar.get("latent_shape", [])):
        problems.append(
            f"{where}: {latent} has shape {list(shape)} but its sidecar says {sidecar.get('latent_shape')}"
        )
    if sidecar.get("latent_sha256") and file_sha256(latent) != sidecar["latent_sha256"]:
        problems.append(f"{where}: {latent} does not match the checksum in its sidecar (modified or corrupt)")
    return shape, problems


def checked_cases(
    entries: list[tuple[int, dict[str, Any]]],
    check: Callable[[int, dict[str, Any]], tuple[Any, list[str]]],
    what: str,
) -> list[Any]:
    """The cases ``check`` accepts, or one InputError listing every problem of every entry.

    Raises:
        InputError: any entry has a problem (``what`` names the datalist, e.g. "latent").
    """
    cases, problems = [], []
    for i, entry in entries:
        case, case_problems = check(i, entry)
        problems += case_problems
        if case is not None:
            cases.append(case)
    if problems:
        raise InputError(f"{what} datalist problems ({len(problems)}):\n  " + "\n  ".join(problems))
    return cases


def require_one_shape(shapes: list[tuple[int, ...]], what: str) -> None:
    """Refuse a batch whose cases differ in shape (they cannot be stacked).

    Raises:
        InputError: naming the shapes (``what`` names the latents, e.g. "mask latent").
    """
    if len(set(shapes)) > 1:
        raise InputError(
            f"a batch mixes {what} shapes {sorted(set(shapes))}; use batch_size 1 or encode to a common size"
        )


def read_case_sidecar(where: str, latent: Path, what: str = "latent") -> tuple[dict | None, list[str]]:
    """The sidecar of a datalist entry's latent, or None with the problem (missing file or sidecar)."""
    if not latent.is_file():
        return None, [f"{where}.image: {what} not found: {latent}"]
    sidecar = read_sidecar(latent)
    if sidecar is None:
        return None, [f"{where}.image: {latent} has no readable sidecar {latent}.json (unfinished encode?)"]
    return sidecar, []


def _check_case(
    i: int, entry: dict[str, Any], root: Path, preset: Preset, need_label: bool
) -> tuple[LatentCase | None, list[str]]:
    where = f"$.training[{i}]"
    latent = root / entry["image"]
    sidecar, problems = read_case_sidecar(where, latent)
    if sidecar is None:
        return None, problems
    shape, problems = check_latent_file(where, latent, sidecar)
    if shape is None:
        return None, problems
    if shape and shape[0] != preset.latent_channels:
        problems.append(
            f"{where}: {shape[0]} latent channels, preset '{preset.name}' has {preset.latent_channels}"
        )
    spacing = entry.get("spacing") or sidecar.get("spacing")
    top = _region(entry.get("top_region_index") or sidecar.get("top_region_index"))
    bottom = _region(entry.get("bottom_region_index") or sidecar.get("bottom_region_index"))
    if spacing is None:
        problems.append(f"{where}: no spacing in the entry or the sidecar")
    if preset.uses_body_region and (top is None or bottom is None):
        problems.append(f"{where}: no body region; preset '{preset.name}' is conditioned on it")
    label = root / entry["label"] if entry.get("label") else None
    if need_label:
        if label is None or not label.exists():
            problems.append(
                f"{where}.label: {'missing' if label is None else f'not found: {label}'} "
                "(the ControlNet needs it)"
            )
        else:
            label_shape, _ = read_geometry(label)
            expected = [preset.vae_factor * s for s in shape[1:]]
            if list(label_shape) != expected:
                problems.append(
                    f"{where}.label: grid {list(label_shape)} is not {preset.vae_factor}x the latent grid "
                    f"{list(shape[1:])} (expected {expected})"
                )
    if problems:
        return None, problems
    conditions = Conditions(
        tuple(spacing), top, bottom, entry.get("modality") or sidecar.get("modality") or "ct"
    )
    return LatentCase(latent, label, conditions, shape), []


class LatentCases:
    """The training (or validation) cases of a latent datalist."""

    def __init__(self, entries: list[dict[str, Any]], root: Path, preset: Preset, need_label: bool):
        self.preset = preset
        self.cases: list[LatentCase] = checked_cases(
            entries, lambda i, entry: _check_case(i, entry, root, preset, need_label), "latent"
        )

    def __len__(self) -> int:
        return len(self.cases)

    def read(self, indices: list[int]) -> dict[str, Any]:
        """Read and stack cases on the CPU: ``latents`` (N, C, x, y, z), ``unet_inputs`` (the condition
        tensors) and, when every case has one, ``labels`` (N, 1, X, Y, Z) int64.

        Raises:
            InputError: the cases differ in shape, or a latent turned non-finite since it was checked.
        """
        chosen = [self.cases[i] for i in indices]
        require_one_shape([c.shape for c in chosen], "latent")
        cpu = torch.device("cpu")
        inputs = [c.conditions.network_inputs(self.preset, 1, cpu) for c in chosen]
        out: dict[str, Any] = {
            "latents": torch.stack([torch.from_numpy(load_latent(c.latent)) for c in chosen]),
            "unet_inputs": {k: torch.cat([d[k] for d in inputs]) for k in inputs[0]},
        }
        labels = [c.label for c in chosen if c.label is not None]
        if len(labels) == len(chosen):
            arrays = [torch.from_numpy(read_mask(path).array.astype(np.int64)) for path in labels]
            out["labels"] = torch.stack(arrays)[:, None]
        return out

    @staticmethod
    def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """A batch from :meth:`read` on ``device``, plus ``control`` (bit-encoded labels) if it has labels."""
        out: dict[str, Any] = {
            "latents": batch["latents"].to(device),
            "unet_inputs": {k: v.to(device) for k, v in batch["unet_inputs"].items()},
        }
        if "labels" in batch:
            out["labels"] = batch["labels"].to(device)
            out["control"] = binarize_labels(out["labels"])
        return out

    def batch(self, indices: list[int], device: torch.device) -> dict[str, Any]:
        """:meth:`read` then :meth:`to_device`: the cases at ``indices``, ready for the networks."""
        return self.to_device(self.read(indices), device)


@dataclass(frozen=True)
class CaseDraw:
    """One step's batch: ``batch_size`` cases drawn uniformly (with replacement) with the generator given,
    read on the CPU (runs in DataLoader workers)."""

    cases: LatentCases
    batch_size: int

    def __call__(self, generator: torch.Generator) -> dict[str, Any]:
        indices = torch.randint(len(self.cases), (self.batch_size,), generator=generator).tolist()
        return self.cases.read(indices)
