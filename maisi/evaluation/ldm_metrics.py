"""Metrics of an LDM's 2D images or 3D volumes on [0, 1], all from ``monai.metrics``.

- :func:`image_metrics`: PSNR (``max_val=1``), SSIM and MS-SSIM of a reconstruction against its input;
- :func:`pairwise_ms_ssim`: the diversity of a set, mean MS-SSIM over (a seeded draw of) its pairs;
- :func:`nearest_distances` / :func:`memorisation`: each sample's distance to its nearest training image
  (RMS difference or 1 - SSIM), against the training images' own nearest-neighbour distances.

MS-SSIM with ``n`` scales uses MONAI's first ``n`` default weights renormalised to sum 1; MONAI accepts an
image when every axis ``s`` has ``s // (n - 1)^2 > kernel_size - 1``, i.e. ``s >= kernel_size * (n - 1)^2``.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

from maisi.config.evaluate_config import LdmSsimConfig
from maisi.errors import InputError

MONAI_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_weights(scales: int) -> tuple[float, ...]:
    """MONAI's first ``scales`` MS-SSIM weights, renormalised to sum 1."""
    w = MONAI_MS_SSIM_WEIGHTS[:scales]
    return tuple(x / sum(w) for x in w)


def ms_ssim_min_size(ssim: LdmSsimConfig) -> int:
    """Fewest pixels along every axis that MONAI's MS-SSIM accepts with this window and these scales."""
    return ssim.kernel_size * max(1, ssim.scales - 1) ** 2


def size_problems(shape: tuple[int, ...], ssim: LdmSsimConfig) -> dict[str, str]:
    """{metric: why it cannot be computed on images of ``shape``} for SSIM and MS-SSIM (empty: both can)."""
    out: dict[str, str] = {}
    if min(shape) < ssim.kernel_size:
        out["ssim"] = f"image {list(shape)} is smaller than the SSIM window {ssim.kernel_size}"
    need = ms_ssim_min_size(ssim)
    if min(shape) < need:
        out["ms_ssim"] = (
            f"image {list(shape)} is too small for MS-SSIM with {ssim.scales} scales and kernel_size "
            f"{ssim.kernel_size}: every axis needs at least {need} pixels; lower $.ldm.ssim.scales or "
            "$.ldm.ssim.kernel_size"
        )
    return out


def _ssim_metric(ssim: LdmSsimConfig, dims: int) -> SSIMMetric:
    return SSIMMetric(
        spatial_dims=dims, data_range=1.0, win_size=ssim.kernel_size, kernel_sigma=ssim.kernel_sigma
    )


def _ms_ssim_metric(ssim: LdmSsimConfig, dims: int) -> MultiScaleSSIMMetric:
    return MultiScaleSSIMMetric(
        spatial_dims=dims,
        data_range=1.0,
        kernel_size=ssim.kernel_size,
        kernel_sigma=ssim.kernel_sigma,
        weights=ms_ssim_weights(ssim.scales),
    )


def ms_ssim(a: torch.Tensor, b: torch.Tensor, ssim: LdmSsimConfig) -> torch.Tensor:
    """MS-SSIM of (N, 1, *S) images on [0, 1] pairwise along N: (N,)."""
    return _ms_ssim_metric(ssim, a.ndim - 2)(a.float(), b.float()).reshape(-1)


def image_metrics(pred: torch.Tensor, target: torch.Tensor, ssim: LdmSsimConfig) -> dict[str, Any]:
    """PSNR (inf for identical images), SSIM and MS-SSIM of (1, 1, *S) images on [0, 1].

    Returns:
        ``{"psnr", "ssim", "ms_ssim", "skipped"}``; a metric the image is too small for is None and
        ``skipped`` says why.
    """
    pred, target = pred.float(), target.float()
    dims = target.ndim - 2
    skipped = size_problems(tuple(target.shape[2:]), ssim)
    return {
        "psnr": float(PSNRMetric(max_val=1.0)(pred, target).mean()),
        "ssim": None if "ssim" in skipped else float(_ssim_metric(ssim, dims)(pred, target).mean()),
        "ms_ssim": None if "ms_ssim" in skipped else float(ms_ssim(pred, target, ssim).mean()),
        "skipped": skipped,
    }


def pairwise_ms_ssim(
    images: list[torch.Tensor], ssim: LdmSsimConfig, max_pairs: int, seed: int, batch: int = 16
) -> dict[str, Any]:
    """Mean (std, min, max) MS-SSIM over pairs of (1, 1, *S) images of one shape (lower: more diverse).

    At most ``max_pairs`` pairs, drawn without replacement by ``random.Random(seed)`` when there are more.

    Raises:
        InputError: fewer than 2 images, or images too small for MS-SSIM.
    """
    if len(images) < 2:
        raise InputError(f"diversity needs at least 2 images, got {len(images)}")
    problem = size_problems(tuple(images[0].shape[2:]), ssim).get("ms_ssim")
    if problem:
        raise InputError(problem)
    pairs = list(itertools.combinations(range(len(images)), 2))
    total = len(pairs)
    if total > max_pairs:
        pairs = random.Random(seed).sample(pairs, max_pairs)
    scores = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        a = torch.cat([images[i] for i, _ in chunk])
        b = torch.cat([images[j] for _, j in chunk])
        scores.append(ms_ssim(a, b, ssim))
    values = torch.cat(scores).double().numpy()
    return {
        "images": len(images),
        "pairs": len(pairs),
        "pairs_possible": total,
        "ms_ssim_mean": float(values.mean()),
        "ms_ssim_std": float(values.std()),
        "ms_ssim_min": float(values.min()),
        "ms_ssim_max": float(values.max()),
    }


def distances(
    queries: list[torch.Tensor], references: list[torch.Tensor], kind: str, ssim: LdmSsimConfig
) -> torch.Tensor:
    """(Q, R) distances between (1, 1, *S) images on [0, 1]: ``l2`` the RMS difference, ``ssim`` 1 - SSIM."""
    ref = torch.cat(references).float()
    if kind == "l2":
        q = torch.cat(queries).float().flatten(1)
        return torch.cdist(q.double(), ref.flatten(1).double()) / q.shape[1] ** 0.5
    metric = _ssim_metric(ssim, ref.ndim - 2)
    rows = [1.0 - metric(query.float().expand_as(ref), ref).reshape(-1).double() for query in queries]
    return torch.stack(rows)


def memorisation(
    samples: list[torch.Tensor],
    training: list[torch.Tensor],
    kind: str,
    ssim: LdmSsimConfig,
    threshold_quantile: float,
) -> dict[str, Any]:
    """Each sample's nearest-training-image distance, against the training set's own nearest distances.

    A sample is flagged when its distance is at most the ``threshold_quantile`` of the training-to-training
    nearest-neighbour distances (0: at most the smallest: closer than any two training images).

    Returns:
        ``{"distance", "training_nearest": {median, min, max}, "threshold", "samples": [{nearest, distance,
        ratio, flagged}], "flagged", "ratio_median"}``; ``ratio`` is the distance over the median training
        nearest distance.

    Raises:
        InputError: fewer than 2 training images, or an SSIM distance on images smaller than its window.
    """
    if len(training) < 2:
        raise InputError(f"memorisation needs at least 2 training images, got {len(training)}")
    if kind == "ssim" and "ssim" in size_problems(tuple(training[0].shape[2:]), ssim):
        raise InputError(
            f"$.ldm.memorisation.distance 'ssim': {size_problems(tuple(training[0].shape[2:]), ssim)['ssim']}"
        )
    train = distances(training, training, kind, ssim)
    train.fill_diagonal_(float("inf"))
    train_nearest = train.min(dim=1).values.numpy()
    typical = float(np.median(train_nearest))
    threshold = float(np.quantile(train_nearest, threshold_quantile))
    to_train = distances(samples, training, kind, ssim)
    nearest = to_train.min(dim=1)
    rows = []
    for d, j in zip(nearest.values.tolist(), nearest.indices.tolist()):
        rows.append(
            {
                "nearest": int(j),
                "distance": float(d),
                "ratio": float(d / typical) if typical > 0 else None,
                "flagged": bool(d <= threshold),
            }
        )
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    return {
        "distance": "rms" if kind == "l2" else "1 - ssim",
        "training_nearest": {
            "median": typical,
            "min": float(train_nearest.min()),
            "max": float(train_nearest.max()),
        },
        "threshold_quantile": threshold_quantile,
        "threshold": threshold,
        "samples": rows,
        "flagged": sum(r["flagged"] for r in rows),
        "ratio_median": float(np.median(ratios)) if ratios else None,
    }
