"""``python -m maisi.encode --config FILE``: pre-encode a datalist's CT images into VAE latents.

Writes ``<name>_emb.nii.gz`` + ``<name>_emb.nii.gz.json`` per case (and ``<name>_label.nii.gz`` on the
latent's image grid when the case has a label), then a datalist of the latents for training. Restartable:
finished, intact cases are skipped. With ``torchrun --nproc_per_node=N -m maisi.encode ...`` every rank
encodes its share and rank 0 writes the datalist. Exit codes: 0 all encoded, 1 some case failed (the others
are still done), 2 bad input: checked before the model loads and before anything is written, including
output locations and any output that would land on an input of the run or on another case's output.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from maisi.checkpoints import file_sha256, load_network
from maisi.cli import EXIT_OK, load_cli_config, print_config, EXIT_RUNTIME, make_parser, run_guarded, setup_logging
from maisi.config import EncodeConfig
from maisi.data.datalist import read_datalist, write_datalist
from maisi.device import autocast_dtype, resolve_device
from maisi.distributed import Ranks, finish, gather, init_from_env
from maisi.encoding import CaseResult, EncodeJob, check_outputs, encode_case
from maisi.errors import InputError, RunFailure
from maisi.networks import RuntimeOptions, get_preset

PROG = "maisi.encode"
log = logging.getLogger(PROG)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_folder(folder: Path, what: str) -> None:
    """``folder`` is (or can be made) a writable folder; checked without creating anything.

    Raises:
        InputError: it is a file, lies under a file, or its nearest existing folder is not writable.
    """
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise InputError(f"{what} {folder} is not writable: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {folder} is not writable (no write permission on {existing})")


def check_output_locations(output_dir: Path, out_datalist: Path) -> None:
    """Every output location, checked before any model loads or any file is written."""
    check_folder(output_dir, "output directory")
    if out_datalist.is_dir():
        raise InputError(f"output datalist {out_datalist} is a folder; name a JSON file ($.output_datalist)")
    check_folder(out_datalist.parent, "the output datalist's folder")


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def output_datalist_path(config: EncodeConfig) -> Path:
    return Path(config.output_datalist or Path(config.output_dir) / "datalist.json")


def prepare_job(config: EncodeConfig, ranks: Ranks) -> tuple[EncodeJob, list]:
    """Check every input and output location (nothing is written), then load the autoencoder."""
    device = ranks.device(resolve_device(config.device))
    datalist = read_datalist(config.datalist)
    root = Path(config.data_root) if config.data_root else Path(config.datalist).parent
    out_datalist = output_datalist_path(config)
    check_output_locations(Path(config.output_dir), out_datalist)
    check_outputs(config, datalist["training"], root, out_datalist)
    preset = get_preset(config.preset)
    vae, weights = load_network(preset, "autoencoder", config.autoencoder, RuntimeOptions.for_device(device))
    job = EncodeJob(config, vae.to(device), preset.vae_factor, file_sha256(weights.path), root, out_datalist.parent,
                    device, autocast_dtype(config.precision, device))  # fmt: skip
    return job, list(enumerate(datalist["training"]))


def encode_share(job: EncodeJob, cases: list, max_cases: int | None, show_progress: bool) -> list[CaseResult]:
    results: list[CaseResult] = []
    encoded = 0
    for index, entry in tqdm(cases, desc="encoding", disable=not show_progress):
        if max_cases is not None and encoded >= max_cases:
            results.append(CaseResult(index, entry["image"], "pending", "--max-cases reached; rerun to continue"))
            continue
        try:
            result = encode_case(job, index, entry)
        except (InputError, RunFailure) as e:  # the message says it all
            result = CaseResult(index, entry["image"], "failed", str(e))
        except Exception as e:  # noqa: BLE001 - one broken case must not stop the others
            log.debug("case %d failed", index, exc_info=True)
            result = CaseResult(index, entry["image"], "failed", f"{type(e).__name__}: {e}")
        encoded += result.status == "encoded"
        results.append(result)
    return results


def summarise(results: list[CaseResult], peaks: list[float], device: torch.device) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("encoded", "skipped", "failed", "pending")}
    seconds = [r.seconds for r in results if r.status == "encoded"]
    rate = f", {sum(seconds) / len(seconds):.1f} s per encoded case" if seconds else ""
    log.info("summary: %d encoded, %d skipped, %d failed, %d pending%s; peak memory %.2f GB (%s, max over ranks)",
             counts["encoded"], counts["skipped"], counts["failed"], counts["pending"], rate, max(peaks),
             "CUDA allocated" if device.type == "cuda" else "process RSS")  # fmt: skip
    for r in results:
        if r.status == "failed":
            log.error("failed: %s: %s", r.image, r.reason)


def run(config: EncodeConfig, max_cases: int | None = None) -> int:
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
        return EXIT_RUNTIME if any(r.status == "failed" for r in results) else EXIT_OK
    finally:
        finish(ranks)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(PROG, "Pre-encode CT images into VAE latents for training.")
    parser.add_argument("--max-cases", type=int, default=None,
                        help="encode at most this many cases (per rank) in this run; a rerun continues")  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        config = load_cli_config(args, "encode")
        return print_config(config) if args.dry_run else run(config, args.max_cases)

    return run_guarded(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
