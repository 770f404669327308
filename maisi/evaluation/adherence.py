"""Prompt adherence of a text LDM: does a sample generated from a finding's prompt show the finding?

A *detector* decides, for one image on [0, 1], whether it shows a finding. Detectors are chosen by name in
the config (``$.ldm.adherence.findings[i].detector.name``) from :data:`DETECTORS`; each takes the image and
its parameters (the detector object of the config). For each finding the table gives the rate at which the
samples of its prompt show it, and the rate at which samples of the "no finding" prompt do (the same
detector on those), and their difference.

This measures the images against a fixed, stated rule; it shows what that rule sees (e.g. a brighter lower
lung zone), not what a radiologist would read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from maisi.errors import InputError

Detector = Callable[[torch.Tensor, Mapping[str, Any]], tuple[bool, float]]


def box_pixels(shape: tuple[int, ...], box: list[float] | tuple[float, ...]) -> tuple[slice, slice]:
    """Row and column slices of a fractional box [row_start, col_start, row_stop, col_stop] (>= 1 pixel)."""
    rows, cols = shape[-2], shape[-1]
    r0, c0 = int(box[0] * rows), int(box[1] * cols)
    r1, c1 = max(r0 + 1, round(box[2] * rows)), max(c0 + 1, round(box[3] * cols))
    return slice(r0, min(r1, rows)), slice(c0, min(c1, cols))


def region_intensity(image: torch.Tensor, params: Mapping[str, Any]) -> tuple[bool, float]:
    """Mean intensity inside ``params["box"]`` of a (1, 1, H, W) image on [0, 1], against ``threshold``.

    Returns:
        (shown, the box's mean): shown when the mean is above the threshold (``direction`` 'above', the
        default) or below it ('below').
    """
    rows, cols = box_pixels(tuple(image.shape), params["box"])
    value = float(image[..., rows, cols].float().mean())
    above = params.get("direction", "above") == "above"
    return (value > params["threshold"]) if above else (value < params["threshold"]), value


DETECTORS: dict[str, Detector] = {"region_intensity": region_intensity}


def detector(name: str, key: str) -> Detector:
    """The detector registered under ``name``.

    Raises:
        InputError: an unknown name, naming ``key`` and the known ones.
    """
    if name not in DETECTORS:
        raise InputError(f"{key}: unknown detector '{name}'; known: {sorted(DETECTORS)}")
    return DETECTORS[name]


def detection_rate(images: list[torch.Tensor], find: Detector, params: Mapping[str, Any]) -> dict[str, Any]:
    """How many (1, 1, H, W) images the detector says show the finding, the rate and the mean score."""
    results = [find(image, params) for image in images]
    shown = sum(r[0] for r in results)
    return {
        "images": len(images),
        "shown": int(shown),
        "rate": shown / len(images) if images else None,
        "score_mean": float(sum(r[1] for r in results) / len(results)) if results else None,
    }


def adherence_table(
    findings: list[tuple[Mapping[str, Any], list[torch.Tensor]]], no_finding: list[torch.Tensor]
) -> list[dict[str, Any]]:
    """One row per finding: its prompt's detection rate against the no-finding prompt's.

    Args:
        findings: (the finding's config entry {name, prompt, detector}, its samples) per finding.
        no_finding: the samples of the "no finding" prompt.

    Returns:
        [{finding, prompt, detector, rate, no_finding_rate, difference, finding_samples, no_finding_samples}].
    """
    rows = []
    for i, (entry, images) in enumerate(findings):
        params = entry["detector"]
        find = detector(params["name"], f"$.ldm.adherence.findings[{i}].detector.name")
        own, other = detection_rate(images, find, params), detection_rate(no_finding, find, params)
        rows.append(
            {
                "finding": entry["name"],
                "prompt": entry.get("prompt"),
                "detector": dict(params),
                "rate": own["rate"],
                "no_finding_rate": other["rate"],
                "difference": own["rate"] - other["rate"],
                "finding_samples": own,
                "no_finding_samples": other,
            }
        )
    return rows
