"""An encoding run: check every input and output, load the VAE, encode each rank's share, write the datalist.

Restartable: finished, intact cases are skipped (see :mod:`maisi.encoding.cases` for one case). Under torchrun
every rank encodes its share and rank 0 writes the datalist of the latents.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

from maisi.checkpoints import load_network
from maisi.config import EncodeConfig
from maisi.data.datalist import data_root, read_datalist, write_datalist
from maisi.device import autocast_dtype, resolve_device
from maisi.distributed import Ranks, finish, gather, init_from_env
from maisi.encoding.cases import CaseResult, EncodeJob, check_outputs, encode_case, run_paths, source_key
from maisi.errors import InputError, RunFailure
from maisi.families.ct import get_preset
from maisi.families.mask import get_mask_preset
from maisi.families.networks import RuntimeOptions
from maisi.files import check_output_dir, file_sha256
from maisi.progress import progress_bar
from maisi.run_paths import RunPaths

log = logging.getLogger("maisi.encode")


def check_output_locations(output_dir: Path, out_datalist: Path) -> None:
    """Every output location, checked before any model loads or any file is written."""
    check_output_dir(output_dir, "output directory")
    if out_datalist.is_dir():
        raise InputError(f"output datalist {out_datalist} is a folder; name a JSON file ($.output_datalist)")
    check_output_dir(out_datalist.parent, "the output datalist's folder")


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def output_datalist_path(config: EncodeConfig) -> Path:
    return Path(config.output_datalist or Path(config.output_dir) / "datalist.json")


def check_mask_entries(entries: list[dict], root: Path) -> None:
    """Kind "mask": every entry names an existing label mask (all problems listed, before the model loads).

    Raises:
        InputError: naming each ``$.training[i].label`` that is missing or not found.
    """
    problems = []
    for i, entry in enumerate(entries):
        if not entry.get("label"):
            problems.append(f"$.training[{i}].label: missing (kind 'mask' encodes each entry's label mask)")
        elif not (root / entry["label"]).exists():
            problems.append(f"$.training[{i}].label: file not found: {root / entry['label']}")
    if problems:
        raise InputError(f"mask datalist problems ({len(problems)}):\n  " + "\n  ".join(problems))


def declared_paths(config: EncodeConfig) -> RunPaths:
    """What the run reads and writes (:func:`maisi.encoding.run_paths`), from the config alone."""
    root = data_root(config.datalist, config.data_root)
    return run_paths(config, read_datalist(config.datalist)["training"], root, output_datalist_path(config))


def prepare(config: EncodeConfig, ranks: Ranks | None = None) -> tuple[EncodeJob, list]:
    """Every check of a run (files, output locations, the guard, the VAE loaded strictly); writes nothing.

    Raises:
        InputError: whatever the run would refuse.
    """
    return prepare_job(config, ranks or Ranks())


def prepare_job(config: EncodeConfig, ranks: Ranks) -> tuple[EncodeJob, list]:
    """Check every input and output location (nothing is written), then load the autoencoder."""
    device = ranks.device(resolve_device(config.device))
    datalist = read_datalist(config.datalist)
    root = data_root(config.datalist, config.data_root)
    out_datalist = output_datalist_path(config)
    check_output_locations(Path(config.output_dir), out_datalist)
    if config.kind == "mask":
        check_mask_entries(datalist["training"], root)
    check_outputs(config, datalist["training"], root, out_datalist)
    runtime = RuntimeOptions.for_device(device)
    if config.kind == "mask":
        from maisi.masks.networks import load_mask_network

        preset = get_mask_preset(config.preset)
        vae, weights = load_mask_network(preset, "autoencoder", config.autoencoder, runtime)
    else:
        preset = get_preset(config.preset)
        vae, weights = load_network(preset, "autoencoder", config.autoencoder, runtime)
    job = EncodeJob(
        config,
        vae.to(device),
        preset.vae_factor,
        file_sha256(weights.path),
        root,
        out_datalist.parent,
        device,
        autocast_dtype(config.precision, device),
    )
    return job, list(enumerate(datalist["training"]))


def encode_share(job: EncodeJob, cases: list, max_cases: int | None, show_progress: bool) -> list[CaseResult]:
    results: list[CaseResult] = []
    encoded = 0
    key = source_key(job.config.kind)
    for index, entry in progress_bar(cases, desc="encoding", enabled=show_progress):
        if max_cases is not None and encoded >= max_cases:
            results.append(CaseResult(index, entry[key], "pending", "--max-cases reached; rerun to continue"))
            continue
        try:
            result = encode_case(job, index, entry)
        except (InputError, RunFailure) as e:  # the message says it all
            result = CaseResult(index, entry[key], "failed", str(e))
        except Exception as e:  # noqa: BLE001 - one broken case must not stop the others
            log.debug("case %d failed", index, exc_info=True)
            result = CaseResult(index, entry[key], "failed", f"{type(e).__name__}: {e}")
        encoded += result.status == "encoded"
        results.append(result)
    return results


def summarise(results: list[CaseResult], peaks: list[float], device: torch.device) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("encoded", "skipped", "failed", "pending")}
    seconds = [r.seconds for r in results if r.status == "encoded"]
    rate = f", {sum(seconds) / len(seconds):.1f} s per encoded case" if seconds else ""
    log.info(
        "summary: %d encoded, %d skipped, %d failed, %d pending%s; peak memory %.2f GB (%s, max over ranks)",
        counts["encoded"],
        counts["skipped"],
        counts["failed"],
        counts["pending"],
        rate,
        max(peaks),
        "CUDA allocated" if device.type == "cuda" else "process RSS",
    )
    for r in results:
        if r.status == "failed":
            log.error("failed: %s: %s", r.image, r.reason)


def run(config: EncodeConfig, max_cases: int | None = None) -> list[CaseResult]:
    """Encode every case of the datalist not yet finished (at most ``max_cases`` per rank); the results of
    every rank, in datalist order."""
    device = resolve_device(config.device)
    ranks = init_from_env(device)
    try:
        job, cases = prepare_job(config, ranks)
        mine = encode_share(job, ranks.shard(cases), max_cases, show_progress=ranks.is_main)
        results = sorted((r for share in gather(mine, ranks) for r in share), key=lambda r: r.index)
        peaks = gather(peak_memory_gb(job.device), ranks)
        if ranks.is_main:
            summarise(results, peaks, job.device)
            done = [r.entry for r in results if r.entry is not None]
            if done:
                path = output_datalist_path(config)
                write_datalist(path, {"description": f"latents of {config.datalist}", "training": done})
                log.info("wrote %s (%d of %d cases)", path, len(done), len(results))
        return results
    finally:
        finish(ranks)
