"""``maisi.evaluate`` with ``$.ldm``: a plain LDM's 2D images or 3D volumes, a JSON report and a text table.

Every set (``real``, ``synthetic``, ``training``, the reconstruction's ``held_out``, the adherence groups) is
read and put on [0, 1] by the one rule of ``$.ldm.intensity`` (:mod:`maisi.evaluation.images`). Then:

- **reconstruction**: each held-out image, padded with 0 to a multiple of the autoencoder's factor (MONAI
  ``DivisiblePad``), encoded to the posterior mean, decoded, cropped back and clipped to [0, 1]; PSNR, SSIM
  and MS-SSIM (:mod:`maisi.evaluation.ldm_metrics`) per image and their means;
- **diversity**: mean pairwise MS-SSIM of the synthetic set and, as the reference, of the real set;
- **memorisation**: each sample's nearest training image, flagged when closer than the training images are
  to each other (:func:`maisi.evaluation.ldm_metrics.memorisation`);
- **FID** (:mod:`maisi.evaluation.fid2d`): 2D on the images, or 2.5D on volumes;
- **adherence** (:mod:`maisi.evaluation.adherence`): per finding prompt, its detection rate against the
  "no finding" prompt's.

Inputs, weights and output paths are all checked before any metric is computed.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.transforms import DivisiblePad

import maisi
from maisi.atomic import atomic_path, write_json
from maisi.config.evaluate_config import EvaluateConfig, LdmEvaluateConfig
from maisi.config.schema import to_jsonable
from maisi.device import resolve_device
from maisi.errors import InputError
from maisi.evaluation import fid2d
from maisi.evaluation.adherence import adherence_table, detector
from maisi.evaluation.images import describe_rule, image_files, load_set, one_shape
from maisi.evaluation.inputs import _output_problem
from maisi.evaluation.ldm_metrics import image_metrics, memorisation, ms_ssim_weights, pairwise_ms_ssim
from maisi.families.ldm import LDMPreset, get_ldm_preset
from maisi.families.ldm_models import load_ldm_network
from maisi.run_paths import RunPaths

log = logging.getLogger("maisi.evaluation")
SETS = ("real", "synthetic", "training")


def files_of(ldm: LdmEvaluateConfig) -> dict[str, list[Path]]:
    """Every set's files by config key (``$.ldm.real``, ..., ``$.ldm.adherence.findings[i].images``).

    Raises:
        InputError: a pattern or folder without images, missing listed files (naming the key).
    """
    out = {f"$.ldm.{name}": image_files(getattr(ldm, name), f"$.ldm.{name}") for name in SETS}
    if ldm.reconstruction.enabled:
        out["$.ldm.reconstruction.held_out"] = image_files(
            ldm.reconstruction.held_out, "$.ldm.reconstruction.held_out"
        )
    if ldm.adherence is not None:
        out["$.ldm.adherence.no_finding"] = image_files(
            ldm.adherence.no_finding, "$.ldm.adherence.no_finding"
        )
        for i, finding in enumerate(ldm.adherence.findings):
            key = f"$.ldm.adherence.findings[{i}].images"
            out[key] = image_files(finding["images"], key)
    return out


def run_paths(config: EvaluateConfig, files: dict[str, list[Path]]) -> RunPaths:
    """What the LDM evaluation reads (every image, the autoencoder, the FID weights) and writes."""
    ldm = config.ldm
    assert ldm is not None  # only called for $.ldm configs
    paths = RunPaths()
    for key, listed in files.items():
        for path in listed:
            paths.read(f"an image of {key}", path)
    if ldm.reconstruction.enabled:
        paths.read("$.ldm.reconstruction.autoencoder", ldm.reconstruction.autoencoder)
    paths.read("$.ldm.fid.weights", ldm.fid.weights)
    return paths.write("$.output.report", config.output.report).write("$.output.table", config.output.table)


def declared_paths(config: EvaluateConfig) -> RunPaths:
    """:func:`run_paths` from the config alone (the CLI's guard)."""
    assert config.ldm is not None
    return run_paths(config, files_of(config.ldm))


@torch.no_grad()
def round_trip(vae: torch.nn.Module, image: torch.Tensor, factor: int, device: torch.device) -> torch.Tensor:
    """(1, 1, *S) on [0, 1] -> padded to a multiple of ``factor`` -> posterior mean -> decoded, cropped,
    clipped to [0, 1] (CPU)."""
    padded = DivisiblePad(k=factor, mode="constant", value=0.0)(image[0])[None]
    z_mu, _ = vae.encode(torch.as_tensor(padded).float().to(device))
    decoded = vae.decode(z_mu).float().cpu()
    return decoded[(slice(None), slice(None), *(slice(0, s) for s in image.shape[2:]))].clamp(0.0, 1.0)


@dataclass
class Prepared:
    """A checked LDM evaluation: its files, the loaded networks."""

    device: torch.device
    files: dict[str, list[Path]]
    vae: torch.nn.Module | None
    preset: LDMPreset | None
    fid_net: fid2d.FeatureNetwork | None


def prepare(config: EvaluateConfig) -> Prepared:
    """Every check before work (files, the guard, output locations, detectors, networks); writes nothing."""
    ldm = config.ldm
    assert ldm is not None
    device = resolve_device(config.device)
    files = files_of(ldm)
    run_paths(config, files).check("evaluate")
    outputs = {"$.output.report": config.output.report, "$.output.table": config.output.table}
    problems = [p for k, v in outputs.items() if v is not None and (p := _output_problem(Path(v), k))]
    if problems:
        raise InputError("cannot write the outputs:\n  " + "\n  ".join(problems))
    for i, finding in enumerate(ldm.adherence.findings if ldm.adherence else ()):
        detector(finding["detector"]["name"], f"$.ldm.adherence.findings[{i}].detector.name")
    vae = preset = None
    if ldm.reconstruction.enabled:
        preset = get_ldm_preset(ldm.reconstruction.preset)  # type: ignore[arg-type]
        if preset.spatial_dims != ldm.spatial_dims:
            raise InputError(
                f"$.ldm.reconstruction.preset: '{preset.name}' is {preset.spatial_dims}D, "
                f"$.ldm.spatial_dims is {ldm.spatial_dims}"
            )
        vae = load_ldm_network(preset, "autoencoder", ldm.reconstruction.autoencoder)[0].to(device)  # type: ignore[arg-type]
    fid_net = None
    if ldm.fid.weights is not None:
        fid_net = fid2d.load_network(ldm.fid.network, ldm.fid.weights, device)
    return Prepared(device, files, vae, preset, fid_net)


def _finite(obj: Any) -> Any:
    """inf / NaN (PSNR of identical images) -> null: JSON has neither."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def text_table(report: dict[str, Any]) -> str:
    """The short text table of a report's figures."""
    lines = [f"maisi.evaluate (ldm, {report['spatial_dims']}D); intensity: {report['intensity']}"]
    rec = report["reconstruction"]
    if rec:
        m = rec["mean"]
        lines.append(
            f"reconstruction ({len(rec['cases'])} held-out): PSNR {_fmt(m['psnr'])} dB (inf shown as -: "
            f"identical), SSIM {_fmt(m['ssim'])}, MS-SSIM {_fmt(m['ms_ssim'])}"
        )
    for name, div in (report["diversity"] or {}).items():
        lines.append(
            f"diversity {name}: mean pairwise MS-SSIM {_fmt(div['ms_ssim_mean'])} over {div['pairs']} pairs "
            f"of {div['images']} images (lower: more diverse)"
        )
    mem = report["memorisation"]
    if mem:
        lines.append(
            f"memorisation ({mem['distance']}): {mem['flagged']} of {len(mem['samples'])} samples flagged "
            f"(nearest training distance <= {_fmt(mem['threshold'])}, the training set's own nearest-"
            f"neighbour quantile {_fmt(mem['threshold_quantile'])}); median ratio to the training "
            f"nearest distance {_fmt(mem['ratio_median'])}"
        )
    fid = report["fid"]
    lines.append(
        f"FID: {_fmt(fid.get('fid', fid.get('mean')))} ({fid['network']})"
        if fid
        else f"FID: skipped ({report['fid_skipped']})"
    )
    if report["adherence"]:
        lines.append(f"{'finding':<28} {'rate':>6} {'no-finding rate':>16} {'difference':>11}")
        for row in report["adherence"]:
            lines.append(
                f"{row['finding'][:28]:<28} {_fmt(row['rate']):>6} {_fmt(row['no_finding_rate']):>16} "
                f"{_fmt(row['difference']):>11}"
            )
    return "\n".join(lines) + "\n"


def run_ldm_evaluation(config: EvaluateConfig, progress: bool = True) -> dict[str, Any]:
    """Check everything, compute the enabled metrics, write the JSON report (and the text table) atomically.

    Returns:
        The report as written: ``spatial_dims``, ``intensity`` (the rule, in words), ``ssim`` (window and
        MS-SSIM weights used), ``inputs`` (files per key), ``reconstruction`` (null, or ``cases`` [{image,
        psnr, ssim, ms_ssim, skipped}] and ``mean``), ``diversity`` ({set: {images, pairs, ms_ssim_mean,
        ...}}), ``memorisation`` (see :func:`maisi.evaluation.ldm_metrics.memorisation`, with sample and
        nearest-training file names), ``fid`` (null or ``{fid | xy, yz, zx, mean, network, weights}``),
        ``fid_skipped``, ``adherence`` (rows of :func:`maisi.evaluation.adherence.adherence_table`),
        ``config``, ``maisi_version``, ``created_utc``, ``device``. inf is written as null.

    Raises:
        InputError: anything :func:`prepare` refuses, unreadable images, sets of several shapes where one
            is needed, images too small for MS-SSIM.
    """
    ldm = config.ldm
    assert ldm is not None
    prepared = prepare(config)
    device, files = prepared.device, prepared.files
    rule, dims, ssim = ldm.intensity, ldm.spatial_dims, ldm.ssim
    images = {key: load_set(paths, dims, rule, key) for key, paths in files.items()}
    report: dict[str, Any] = {
        "maisi_version": maisi.__version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "spatial_dims": dims,
        "intensity": describe_rule(rule),
        "ssim": {
            "kernel_size": ssim.kernel_size,
            "kernel_sigma": ssim.kernel_sigma,
            "ms_ssim_weights": [round(w, 6) for w in ms_ssim_weights(ssim.scales)],
        },
        "inputs": {key: [str(p) for p in paths] for key, paths in files.items() if paths},
        "reconstruction": None,
        "diversity": None,
        "memorisation": None,
        "memorisation_skipped": None,
        "fid": None,
        "fid_skipped": None,
        "adherence": None,
        "config": to_jsonable(config),
    }
    if prepared.vae is not None and prepared.preset is not None:
        key = "$.ldm.reconstruction.held_out"
        cases = []
        for path, image in zip(files[key], images[key]):
            recon = round_trip(prepared.vae, image, prepared.preset.vae_factor, device)
            cases.append(
                {"image": str(path), "shape": list(image.shape[2:]), **image_metrics(recon, image, ssim)}
            )
        report["reconstruction"] = {
            "preset": prepared.preset.name,
            "autoencoder": ldm.reconstruction.autoencoder,
            "cases": cases,
            "mean": {m: _mean([c[m] for c in cases]) for m in ("psnr", "ssim", "ms_ssim")},
        }
    synthetic, real, training = (images[f"$.ldm.{n}"] for n in ("synthetic", "real", "training"))
    if ldm.diversity.enabled and (synthetic or real):
        report["diversity"] = {}
        for name, imgs in (("synthetic", synthetic), ("real", real)):
            if imgs:
                one_shape(imgs, files[f"$.ldm.{name}"], f"$.ldm.{name}")
                div = ldm.diversity
                report["diversity"][name] = pairwise_ms_ssim(imgs, ssim, div.max_pairs, div.seed)
    if ldm.memorisation.enabled and synthetic and training:
        shape = one_shape(training, files["$.ldm.training"], "$.ldm.training")
        if one_shape(synthetic, files["$.ldm.synthetic"], "$.ldm.synthetic") != shape:
            raise InputError(
                f"$.ldm.training: training images {list(shape)} and samples "
                f"{list(synthetic[0].shape[2:])} differ in shape; the nearest-neighbour distance needs one"
            )
        mem = memorisation(
            synthetic, training, ldm.memorisation.distance, ssim, ldm.memorisation.threshold_quantile
        )
        for row, path in zip(mem["samples"], files["$.ldm.synthetic"]):
            row["sample"] = str(path)
            row["nearest"] = str(files["$.ldm.training"][row["nearest"]])
        for row in mem["samples"]:
            if row["flagged"]:
                log.warning(
                    "possibly memorised: %s (nearest training image %s)", row["sample"], row["nearest"]
                )
        report["memorisation"] = mem
    elif ldm.memorisation.enabled:
        report["memorisation_skipped"] = "needs both $.ldm.synthetic and $.ldm.training"
    if prepared.fid_net is not None:
        one_shape(real, files["$.ldm.real"], "$.ldm.real")
        one_shape(synthetic, files["$.ldm.synthetic"], "$.ldm.synthetic")
        f = ldm.fid
        if dims == 2:
            scores = fid2d.fid_2d(
                prepared.fid_net, f.network, real, synthetic, f.image_size, f.batch_size, device
            )
        else:
            scores = fid2d.fid_25d_unit(
                prepared.fid_net, real, synthetic, f.slice_step, f.image_size, f.batch_size, device
            )
        report["fid"] = {**scores, "network": f.network, "weights": str(f.weights)}
    else:
        report["fid_skipped"] = "no feature-network weights given ($.ldm.fid.weights is null)"
    if ldm.adherence is not None:
        groups = [
            (finding, images[f"$.ldm.adherence.findings[{i}].images"])
            for i, finding in enumerate(ldm.adherence.findings)
        ]
        report["adherence"] = adherence_table(groups, images["$.ldm.adherence.no_finding"])
    report = _finite(report)
    write_json(config.output.report, report)
    if config.output.table is not None:
        with atomic_path(config.output.table) as tmp:
            Path(tmp).write_text(text_table(report))
    log.info("\n%s", text_table(report).rstrip())
    return report
