"""Metrics of real and synthetic CT: VAE reconstruction, MS-SSIM diversity, 2.5D FID, and a montage.

Volumes are CT unless their modality is MR: a real entry's ``modality``, else ``$.modality``; a synthetic
file's is the one its ``maisi.infer`` metadata declares (``<stem>.json`` beside ``<stem>_image.<fmt>``, the
``conditions.modality`` of a record whose ``files.image`` names the file), else ``$.modality``. MR volumes
are put on the [0, 1] scale by their own 0-99.5 percentile range (MAISI's MR transform, not clipped,
:func:`maisi.intensity.to_unit`) wherever CT uses HU [-1000, 1000] below, and their montage rows use the MR
preview window (:func:`maisi.preview.mr_display_window`). An FID over inputs that mix CT and MR is refused.

* **Reconstruction** (real CT through the VAE): HU [-1000, 1000] -> [0, 1] (MAISI's intensity transform),
  optionally resampled to a target spacing as ``maisi.encode`` does (MONAI ``Spacing``, bilinear), padded
  with 0 (-1000 HU) to a multiple of the VAE factor (MONAI ``DivisiblePad``), encoded to the posterior
  mean and decoded exactly (GroupNorm statistics of the whole volume, in tiles bounded by the memory budget),
  cropped back and clipped to [0, 1]; then PSNR (``max_val=1``),
  SSIM and MS-SSIM (3D, ``data_range=1``) against the (resampled) input, per case and their mean. A metric a
  volume is too small for is null for that case, with the reason; the mean says over how many cases each
  metric was computed.
* **Diversity**: mean pairwise MS-SSIM among the synthetic volumes (lower is more diverse) and, as the
  reference, among the real ones. Volumes of a set must share one shape (nothing is resampled).
* **FID**: :mod:`maisi.evaluation.fid` (2.5D, MONAI ``FIDMetric``, a local 2D ResNet).
* **Montage**: one row per volume (real first, then synthetic, a grey line between the groups), columns axial
  / coronal / sagittal mid-slices in a soft-tissue window (level 40, width 400 HU; MR: the volume's 0.5-99.5
  percentile range), through :mod:`maisi.preview`; every row is scaled to 256 pixels high.

MS-SSIM uses MONAI's 5 scales; MONAI accepts a volume only when every axis has at least
``kernel_size * (scales - 1) ** 2`` voxels (176 for the default kernel of 11). For the diversity that is
checked up front for every volume, before anything is computed; a reconstruction case skips it (and SSIM,
when an axis is shorter than the window) with the reason. The output locations are checked before any
work, too.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

import maisi
from maisi import threads
from maisi.atomic import write_json
from maisi.checkpoints import load_network
from maisi.config.evaluate_config import EvaluateConfig
from maisi.config.schema import to_jsonable
from maisi.data.io import Volume, read_geometry, read_volume
from maisi.device import autocast_dtype, resolve_device
from maisi.encoding.cases import transform
from maisi.errors import InputError
from maisi.evaluation.fid import (
    PLANES,
    FeatureNetwork,
    fid_25d,
    load_feature_network,
    modality_mix_problem,
    slice_counts,
    volume_features,
)
from maisi.evaluation.inputs import check_outputs, gather_inputs, input_modalities
from maisi.families.ct import Preset, get_preset
from maisi.families.networks import RuntimeOptions
from maisi.intensity import is_mr, to_unit
from maisi.preview import (
    PREVIEW_WINDOWS,
    Window,
    display_windows,
    montage,
    resize_nearest,
    stack_rows,
    three_planes,
    window,
    write_png,
)
from maisi.progress import progress_bar
from maisi.vae.codec import round_trip as reconstruct  # the name maisi.evaluate users know

log = logging.getLogger("maisi.evaluation")
MS_SSIM_SCALES = 5  # MONAI's default weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MONTAGE_WINDOW = PREVIEW_WINDOWS[0][1:]  # level, width in HU: the preview's soft-tissue window
MONTAGE_ROW_HEIGHT = 256  # pixels: every row is scaled to this height so small and large volumes compare
Shape = tuple[int, int, int]


# ------------------------------------------------------------------------------------------- metrics


def ms_ssim_min_size(kernel_size: int, scales: int = MS_SSIM_SCALES) -> int:
    """Fewest voxels along every axis that MONAI's MS-SSIM accepts: ``kernel_size * (scales - 1) ** 2``."""
    return kernel_size * max(1, scales - 1) ** 2


def ms_ssim_size_problem(shapes: dict[Path, Shape], kernel_size: int) -> str | None:
    """Why some volumes are too small for MS-SSIM (naming them and the size needed), or None."""
    need = ms_ssim_min_size(kernel_size)
    small = [f"{p} {list(s)}" for p, s in shapes.items() if min(s) < need]
    if not small:
        return None
    fits = min(min(s) for s in shapes.values()) // max(1, MS_SSIM_SCALES - 1) ** 2
    hint = f"; $.ssim.kernel_size {fits} or less would fit them" if fits >= 3 else ""
    more = f" (+{len(small) - 5} more)" if len(small) > 5 else ""
    return (
        f"volumes too small for MS-SSIM's {MS_SSIM_SCALES} scales with kernel_size {kernel_size}: every axis "
        f"needs at least {need} voxels (kernel_size x {max(1, MS_SSIM_SCALES - 1) ** 2}); got "
        f"{', '.join(small[:5])}{more}{hint}"
    )


def check_ms_ssim_size(shapes: dict[Path, Shape], kernel_size: int) -> None:
    """Raise InputError naming the volumes too small for MS-SSIM and the size needed."""
    problem = ms_ssim_size_problem(shapes, kernel_size)
    if problem:
        raise InputError(problem)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, kernel_size: int = 11, kernel_sigma: float = 1.5) -> float:
    """MONAI 3D MS-SSIM of two (1, 1, X, Y, Z) images in [0, 1] (``data_range=1``)."""
    check_ms_ssim_size({Path("image"): tuple(a.shape[2:])}, kernel_size)  # type: ignore[dict-item]
    metric = MultiScaleSSIMMetric(
        spatial_dims=3, data_range=1.0, kernel_size=kernel_size, kernel_sigma=kernel_sigma
    )
    return float(metric(a.float(), b.float()).mean())


def metric_size_problems(shape: Shape, kernel_size: int) -> dict[str, str]:
    """{metric: why it cannot be computed on a volume of ``shape``} for SSIM and MS-SSIM (empty: both can)."""
    problems: dict[str, str] = {}
    if min(shape) < kernel_size:
        problems["ssim"] = (
            f"volume {list(shape)} is thinner than the SSIM window: every axis needs at least "
            f"kernel_size {kernel_size} voxels"
        )
    need = ms_ssim_min_size(kernel_size)
    if min(shape) < need:
        problems["ms_ssim"] = (
            f"volume {list(shape)} is too small for MS-SSIM's {MS_SSIM_SCALES} scales with "
            f"kernel_size {kernel_size}: every axis needs at least {need} voxels"
        )
    return problems


def image_metrics(
    pred: torch.Tensor, target: torch.Tensor, kernel_size: int = 11, kernel_sigma: float = 1.5
) -> dict[str, Any]:
    """PSNR (``max_val=1``; inf for identical images), SSIM and MS-SSIM of (1, 1, X, Y, Z) images in [0, 1].

    Returns:
        ``{"psnr", "ssim", "ms_ssim", "skipped"}``: a metric the images are too small for is None, and
        ``skipped`` maps it to the reason (the size it needs); ``skipped`` is empty when all were computed.
    """
    pred, target = pred.float(), target.float()
    skipped = metric_size_problems(tuple(target.shape[2:]), kernel_size)  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "psnr": float(PSNRMetric(max_val=1.0)(pred, target).mean()),
        "ssim": None,
        "ms_ssim": None,
        "skipped": skipped,
    }
    if "ssim" not in skipped:
        ssim = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=kernel_size, kernel_sigma=kernel_sigma)
        out["ssim"] = float(ssim(pred, target).mean())
    if "ms_ssim" not in skipped:
        out["ms_ssim"] = ms_ssim(pred, target, kernel_size, kernel_sigma)
    return out


RECONSTRUCTION_METRICS = ("psnr", "ssim", "ms_ssim")


def summarise_cases(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the cases it was computed for, how many those were, and why any were left out.

    Returns:
        ``{"mean": {metric: float | None}, "count": {metric: int}, "skipped": {metric: reason}}``; a metric
        computed for no case has a null mean and a reason.
    """
    summary: dict[str, Any] = {"mean": {}, "count": {}, "skipped": {}}
    for metric in RECONSTRUCTION_METRICS:
        values = [c[metric] for c in cases if c[metric] is not None]
        summary["mean"][metric] = float(np.mean(values)) if values else None
        summary["count"][metric] = len(values)
        if len(values) < len(cases):
            left_out = len(cases) - len(values)
            summary["skipped"][metric] = (
                f"not computed for {left_out} of {len(cases)} case(s), too small for it (each case says why)"
            )
    return summary


def reconstruction_case(
    vae: torch.nn.Module,
    preset: Preset,
    volume: Volume,
    path: Path,
    config: EvaluateConfig,
    device: torch.device,
    modality: str = "ct",
) -> dict[str, Any]:
    """One real volume through the VAE and its metrics (``modality`` chooses the [0, 1] mapping).

    Returns:
        ``image``, ``shape`` (as read), ``evaluated_shape`` and ``evaluated_spacing`` (after the optional
        resampling), ``psnr``, ``ssim``, ``ms_ssim`` and ``skipped`` (see :func:`image_metrics`).
    """
    rec = config.reconstruction
    unit = volume.with_array(to_unit(volume.array, modality, str(path))[0])
    if rec.target_spacing is not None:  # the same resampling as maisi.encode (MONAI Spacing, bilinear)
        resampled = transform(unit, list(rec.target_spacing), 1, "bilinear")
        unit = Volume(resampled[0].numpy().astype(np.float32), resampled.affine.numpy().astype(np.float64))
    image = torch.from_numpy(np.ascontiguousarray(unit.array, dtype=np.float32))[None, None]
    dtype = autocast_dtype(config.precision, device)
    recon = reconstruct(vae, image, preset.vae_factor, rec.memory_budget_mb, dtype)
    ssim = config.ssim
    metrics = image_metrics(recon.to(device), image.to(device), ssim.kernel_size, ssim.kernel_sigma)
    return {
        "image": str(path),
        "modality": modality,
        "shape": list(volume.shape),
        "evaluated_shape": list(unit.shape),
        "evaluated_spacing": [round(float(s), 6) for s in unit.spacing],
        **metrics,
    }


def pairwise_ms_ssim(
    volumes: list[torch.Tensor],
    kernel_size: int,
    kernel_sigma: float,
    device: torch.device,
    progress: bool = False,
) -> dict[str, float]:
    """Mean (and std, min, max) MS-SSIM over all pairs of (1, 1, X, Y, Z) volumes of one shape, in [0, 1].

    Raises:
        InputError: fewer than 2 volumes.
    """
    if len(volumes) < 2:
        raise InputError(f"diversity needs at least 2 volumes, got {len(volumes)}")
    pairs = list(itertools.combinations(range(len(volumes)), 2))
    scores = [
        ms_ssim(volumes[i].to(device), volumes[j].to(device), kernel_size, kernel_sigma)
        for i, j in progress_bar(pairs, desc="diversity", enabled=progress)
    ]
    return {
        "count": len(volumes),
        "pairs": len(pairs),
        "ms_ssim_mean": float(np.mean(scores)),
        "ms_ssim_std": float(np.std(scores)),
        "ms_ssim_min": float(min(scores)),
        "ms_ssim_max": float(max(scores)),
    }


def diversity_problem(paths: list[Path], shapes: dict[Path, Shape], kernel_size: int) -> str | None:
    """Why pairwise MS-SSIM cannot run on ``paths`` (too few, several shapes, too small), or None."""
    if len(paths) < 2:
        return f"diversity needs at least 2 volumes, got {len(paths)}" + (f" ({paths[0]})" if paths else "")
    groups: dict[Shape, list[Path]] = {}
    for p in paths:
        groups.setdefault(shapes[p], []).append(p)
    if len(groups) > 1:
        listed = "; ".join(
            f"{list(s)}: {', '.join(map(str, ps[:3]))}{' ...' if len(ps) > 3 else ''}"
            for s, ps in groups.items()
        )
        return (
            f"diversity needs volumes of one shape (pairwise MS-SSIM on one grid), got {len(groups)} shapes: "
            f"{listed}"
        )
    return ms_ssim_size_problem({p: shapes[p] for p in paths}, kernel_size)


# ------------------------------------------------------------------------------------------- montage


def montage_window(volume: Volume, modality: str = "ct") -> Window:
    """The display window of a volume's montage row: the first of its preview's (CT: soft tissue)."""
    return display_windows(volume, modality)[0]


def montage_row(volume: Volume, height: int | None = MONTAGE_ROW_HEIGHT, modality: str = "ct") -> np.ndarray:
    """Axial, coronal and sagittal mid-slices side by side (uint8, in :func:`montage_window`), scaled
    (nearest neighbour, aspect kept) to ``height`` pixels; None keeps the preview's own size."""
    _, level, width = montage_window(volume, modality)
    row = montage([window(p.astype(np.float32), level, width) for p in three_planes(volume)])
    return row if height is None else resize_nearest(row, height)


# ------------------------------------------------------------------------------------------- the run


def _plan_diversity(
    config: EvaluateConfig, real: list[Path], synthetic: list[Path], shapes: dict[Path, Shape]
) -> dict[str, str | None]:
    """{set: None (compute) or the reason it is skipped}.

    The synthetic set must work (InputError otherwise: too few samples, several shapes, too small); the real
    reference is skipped with its reason instead, since real CT rarely share one grid.
    """
    plan: dict[str, str | None] = {}
    k = config.ssim.kernel_size
    if synthetic:
        problem = diversity_problem(synthetic, shapes, k)
        if problem:
            raise InputError(f"synthetic set: {problem}")
        plan["synthetic"] = None
    if real:
        plan["real"] = diversity_problem(real, shapes, k)
    return plan


def _fid_plan(
    config: EvaluateConfig,
    real: list[Path],
    synthetic: list[Path],
    shapes: dict[Path, Shape],
    modalities: dict[Path, str],
    device: torch.device,
) -> tuple[FeatureNetwork | None, str | None]:
    """The feature network, or the reason the FID is skipped. Raises InputError for inputs mixing CT and MR,
    too few slices or bad weights."""
    if config.fid.weights is None:
        return None, (
            "no feature-network weights given ($.fid.weights is null); supply a local 2D ResNet "
            "state_dict (torchvision or MONAI layout) to compute the 2.5D FID"
        )
    mixed = modality_mix_problem({p: modalities[p] for p in real + synthetic})
    if mixed:
        raise InputError(mixed)
    for name, paths in (("real", real), ("synthetic", synthetic)):
        counts = {p: sum(slice_counts(shapes[f], config.fid.slice_step)[p] for f in paths) for p in PLANES}
        few = [f"{p}: {n}" for p, n in counts.items() if n < 2]
        if few:
            raise InputError(
                f"FID: the {name} set gives fewer than 2 slices in plane(s) {', '.join(few)} with "
                f"$.fid.slice_step {config.fid.slice_step}; lower it or add volumes"
            )
    return load_feature_network(config.fid.weights, device), None


def _json_safe(obj: Any) -> Any:
    """Non-finite floats (PSNR of identical images is inf) become null: JSON has no inf/NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


@dataclass
class Prepared:
    """A checked evaluation: its inputs, their shapes and modalities, what each metric will use."""

    device: torch.device
    real: list[Path]
    synthetic: list[Path]
    shapes: dict[Path, Shape]
    modalities: dict[Path, str]
    diversity_plan: Any
    fid_net: Any
    fid_skipped: str | None
    vae: torch.nn.Module | None
    preset: Any


def prepare(config: EvaluateConfig) -> Prepared:
    """Every check of an evaluation (files, grids, the guard of :mod:`maisi.run_paths` and the output
    locations, the FID weights and the VAE loaded strictly); writes nothing.

    Raises:
        InputError: whatever :func:`run_evaluation` would refuse before computing.
    """
    device = resolve_device(config.device)
    real, synthetic = gather_inputs(config)
    check_outputs(config, real, synthetic)
    shapes = {p: read_geometry(p)[0] for p in real + synthetic}
    modalities = input_modalities(config, real, synthetic)
    diversity_plan = _plan_diversity(config, real, synthetic, shapes) if config.diversity.enabled else {}
    fid_net, fid_skipped = _fid_plan(config, real, synthetic, shapes, modalities, device)
    vae = preset = None
    if config.reconstruction.enabled:
        preset = get_preset(config.reconstruction.preset)
        vae, _ = load_network(
            preset,
            "autoencoder",
            config.reconstruction.autoencoder,  # type: ignore[arg-type]
            RuntimeOptions.for_device(device),
        )
        vae = vae.to(device)
    return Prepared(
        device, real, synthetic, shapes, modalities, diversity_plan, fid_net, fid_skipped, vae, preset
    )


def run_evaluation(config: EvaluateConfig, progress: bool = True) -> dict[str, Any]:
    """Check every input, compute the enabled metrics, write the montage and the JSON report.

    Every volume is read once: per set, one pass collects the reconstruction metrics (real set), the FID
    features, the montage rows and (when the set's diversity runs) the [0, 1] volumes.

    Returns:
        The report as written: ``inputs`` (real and synthetic files); ``reconstruction`` (null when disabled;
        else ``preset``, ``autoencoder``, ``target_spacing``, ``cases`` [{image, shape, evaluated_shape,
        evaluated_spacing, psnr, ssim, ms_ssim, skipped}] and, per metric, the ``mean`` over the cases it was
        computed for, that ``count`` and why it was ``skipped`` for some);
        ``diversity`` (null when disabled; else per set ``{count, pairs, ms_ssim_mean, ms_ssim_std,
        ms_ssim_min, ms_ssim_max}`` or ``{skipped: reason}``); ``fid`` (null when skipped; else ``xy``,
        ``yz``, ``zx``, ``mean``, ``network``, ``features``, ``weights``, ``slice_step``, ``image_size``,
        ``slices``, ``intensity``: ``ct_hu`` or ``mr_percentile``) and ``fid_skipped`` (the reason, or null);
        ``montage`` (null, or ``path``, ``window`` (the CT rows'), ``row_height``, ``columns``, ``rows``
        [{set, image, window: {name, level, width}}]); ``config`` (resolved); ``maisi_version``,
        ``created_utc``, ``device``. Infinite values (PSNR of a perfect reconstruction) are written as null.

    Raises:
        InputError: missing files, output paths that cannot be written, mismatched grids, synthetic volumes
            too small for MS-SSIM, too few samples, bad weights, an FID mixing CT and MR.
    """
    prepared = prepare(config)
    device, real, synthetic = prepared.device, prepared.real, prepared.synthetic
    modalities, diversity_plan = prepared.modalities, prepared.diversity_plan
    fid_net, fid_skipped, vae, preset = prepared.fid_net, prepared.fid_skipped, prepared.vae, prepared.preset
    k, sigma = config.ssim.kernel_size, config.ssim.kernel_sigma

    features: dict[str, dict[str, list[torch.Tensor]]] = {}
    rows: list[tuple[str, Path, np.ndarray, Window]] = []
    keep: dict[str, list[torch.Tensor]] = {}
    cases: list[dict[str, Any]] = []
    for name, paths in (("real", real), ("synthetic", synthetic)):
        features[name] = {p: [] for p in PLANES}
        keep[name] = []
        for index, path in enumerate(progress_bar(paths, desc=f"{name} volumes", enabled=progress)):
            volume, modality = read_volume(path), modalities[path]
            unit_array = to_unit(volume.array, modality, str(path))[0]
            unit = torch.from_numpy(unit_array)[None, None]
            if name == "real" and vae is not None and preset is not None:
                cases.append(reconstruction_case(vae, preset, volume, path, config, device, modality))
                for metric, reason in cases[-1]["skipped"].items():
                    log.warning("%s of %s skipped: %s", metric, path, reason)
            if fid_net is not None:
                for plane, f in volume_features(
                    fid_net,
                    volume.array,
                    config.fid.slice_step,
                    config.fid.image_size,
                    config.fid.batch_size,
                    device,
                    modality=modality,
                    where=str(path),
                ).items():
                    features[name][plane].append(f)
            if config.output.montage and index < config.output.montage_cases:
                shown = montage_window(volume, modality)
                rows.append((name, path, montage_row(volume, modality=modality), shown))
            if name in diversity_plan and diversity_plan[name] is None:
                keep[name].append(unit)

    report: dict[str, Any] = {
        "maisi_version": maisi.__version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "threads": threads.record(),  # torch threads, and why
        "inputs": {"real": [str(p) for p in real], "synthetic": [str(p) for p in synthetic]},
        "modalities": {str(p): m for p, m in modalities.items() if p in set(real + synthetic)},
        "reconstruction": None,
        "diversity": None,
        "fid": None,
        "fid_skipped": fid_skipped,
        "montage": None,
        "config": to_jsonable(config),
    }
    if cases:
        rec = config.reconstruction
        report["reconstruction"] = {
            "preset": rec.preset,
            "autoencoder": rec.autoencoder,
            "target_spacing": list(rec.target_spacing) if rec.target_spacing else None,
            "cases": cases,
            **summarise_cases(cases),
        }
    if config.diversity.enabled:
        report["diversity"] = {
            name: {"skipped": reason} if reason else pairwise_ms_ssim(keep[name], k, sigma, device, progress)
            for name, reason in diversity_plan.items()
        }
        if diversity_plan.get("real"):
            log.warning("diversity of the real set skipped: %s", diversity_plan["real"])
    if fid_net is not None:
        scores = fid_25d(features["real"], features["synthetic"])  # type: ignore[arg-type]
        slices = {n: {p: int(sum(t.shape[0] for t in features[n][p])) for p in PLANES} for n in features}
        report["fid"] = {
            **scores,
            "intensity": "mr_percentile" if any(is_mr(m) for m in modalities.values()) else "ct_hu",
            "network": fid_net.name,
            "features": fid_net.features,
            "weights": str(fid_net.path),
            "slice_step": config.fid.slice_step,
            "image_size": config.fid.image_size,
            "slices": slices,
        }
        log.info(
            "FID (2.5D, %s): xy %.4g, yz %.4g, zx %.4g, mean %.4g",
            fid_net.name,
            scores["xy"],
            scores["yz"],
            scores["zx"],
            scores["mean"],
        )
    else:
        log.warning("FID skipped: %s", fid_skipped)
    if config.output.montage and rows:
        split = sum(r[0] == "real" for r in rows)
        write_png(
            config.output.montage, stack_rows([r[2] for r in rows], split if 0 < split < len(rows) else None)
        )
        report["montage"] = {
            "path": config.output.montage,
            "window": list(MONTAGE_WINDOW),
            "row_height": MONTAGE_ROW_HEIGHT,
            "columns": ["axial", "coronal", "sagittal"],
            "rows": [
                {"set": n, "image": str(p), "window": {"name": w[0], "level": w[1], "width": w[2]}}
                for n, p, _, w in rows
            ],
        }
    report = _json_safe(report)
    write_json(config.output.report, report)
    return report
