"""``python -m maisi.infer``: generate CT volumes from a label mask or image-only.

Each sample writes ``<prefix>_seed<N>_image.<fmt>``, ``..._label.<fmt>`` (mask mode; the input mask,
labels unchanged), ``..._preview.png`` and ``<prefix>_seed<N>.json`` (metadata, written last). A rerun skips
samples whose metadata shows the same job (config, weights, mask, seed) and redoes the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

import maisi
from maisi.atomic import write_json
from maisi.checkpoints import file_sha256
from maisi.cli import EXIT_OK, make_parser, run_guarded, setup_logging
from maisi.config import InferConfig, load_config, to_jsonable
from maisi.data.io import write_volume
from maisi.device import resolve_device
from maisi.errors import InputError
from maisi.generation import GenerationPlan, Models, generate_checked, load_models, plan_generation
from maisi.preview import write_preview
from maisi.quality import mask_fidelity

PROG = "maisi.infer"
log = logging.getLogger(PROG)


def build_parser():
    parser = make_parser(PROG, "Generate CT volumes with a MAISI-style latent diffusion model.")
    parser.add_argument("--output-dir", help="overrides $.output.dir (relative to the working directory)")
    parser.add_argument("--seed", type=non_negative_int, help="overrides $.seed")
    parser.add_argument("--num-samples", type=positive_int, help="overrides $.num_samples")
    return parser


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def apply_overrides(config: InferConfig, args: Any) -> InferConfig:
    """Command-line flags win over the file."""
    changes: dict[str, Any] = {}
    if args.output_dir is not None:
        changes["output"] = dataclasses.replace(config.output, dir=str(Path(args.output_dir).resolve()))
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.num_samples is not None:
        changes["num_samples"] = args.num_samples
    if args.device is not None:
        changes["device"] = args.device
    return dataclasses.replace(config, **changes)


def job_key(config: InferConfig, checksums: dict[str, str]) -> str:
    """Identity of what a sample depends on besides its seed (not where it is written, nor how many)."""
    resolved = to_jsonable(config)
    for key in ("output", "num_samples", "seed", "device"):
        resolved.pop(key)
    text = json.dumps({"config": resolved, "sha256": checksums}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sample_files(config: InferConfig, seed: int) -> dict[str, Path]:
    out, stem, fmt = Path(config.output.dir), f"{config.output.prefix}_seed{seed}", config.output.format
    files = {"image": out / f"{stem}_image.{fmt}", "metadata": out / f"{stem}.json"}
    if config.mask is not None:
        files["label"] = out / f"{stem}_label.{fmt}"
    if config.output.preview:
        files["preview"] = out / f"{stem}_preview.png"
    return files


def recorded_job(files: dict[str, Path]) -> str | None:
    """The job key in a sample's metadata (written last), or None when there is no readable metadata."""
    try:
        return json.loads(files["metadata"].read_text()).get("job_key")
    except (OSError, ValueError, AttributeError):
        return None


def check_no_foreign_samples(config: InferConfig, key: str) -> None:
    """Refuse to mix jobs: samples of another config/weights/mask under the same names are not overwritten."""
    for seed in range(config.seed, config.seed + config.num_samples):
        files = sample_files(config, seed)
        recorded = recorded_job(files)
        if recorded is not None and recorded != key:
            raise InputError(f"output directory {config.output.dir} holds {files['metadata'].name} from another job "
                             "(different config, weights or mask); use another --output-dir or $.output.prefix, "
                             "or delete those files")  # fmt: skip


def write_sample(plan: GenerationPlan, models: Models, seed: int, files: dict[str, Path], key: str,
                 checksums: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """Generate one sample and write its files; the metadata JSON goes last."""
    t0 = time.perf_counter()
    ct, timings, tries = generate_checked(plan, models, seed)
    t1 = time.perf_counter()
    write_volume(files["image"], ct)
    if "label" in files:
        assert plan.mask is not None
        write_volume(files["label"], plan.mask)
    if "preview" in files:
        write_preview(files["preview"], ct, plan.mask)
    timings.update(writing_s=time.perf_counter() - t1, total_s=time.perf_counter() - t0)
    metadata = {
        "job_key": key,
        "seed": seed,
        "files": {k: p.name for k, p in files.items() if k != "metadata"},
        "shape": list(ct.shape),
        "spacing_mm": [round(s, 6) for s in ct.spacing],
        "affine": ct.affine.tolist(),
        "hu_min_max": [int(ct.array.min()), int(ct.array.max())],
        "conditions": dataclasses.asdict(plan.conditions),
        "sampler": {"scheduler": plan.config.sampler, "num_inference_steps": plan.config.num_inference_steps},
        "scale_factor": models.scale_factor,
        "quality_check": {"passed": any(t["passed"] for t in tries), "tries": tries} if tries else None,
        "mask_fidelity": mask_fidelity(ct, plan.mask) if plan.mask is not None else None,
        "checkpoints": {part: {"path": str(w.path), "format": w.source_format, "sha256": checksums[part]}
                        for part, w in models.weights.items()},  # fmt: skip
        "mask": {"path": plan.config.mask, "sha256": checksums.get("mask")} if plan.config.mask else None,
        "timings_s": {k.removesuffix("_s"): round(v, 3) for k, v in timings.items()},
        "device": str(models.device),
        "versions": {"maisi": maisi.__version__, "torch": torch.__version__, "monai": monai.__version__,
                     "numpy": np.__version__},  # fmt: skip
        "config": to_jsonable(plan.config),
    }
    write_json(files["metadata"], metadata)
    return metadata


def run(config: InferConfig) -> int:
    """Generate every sample of ``config``; inputs are all checked before anything is written."""
    device = resolve_device(config.device)
    plan = plan_generation(config)
    for warning in plan.warnings:
        log.warning(warning)
    models = load_models(plan, device)
    checksums = {part: file_sha256(w.path) for part, w in models.weights.items()}
    if config.mask is not None:
        checksums["mask"] = file_sha256(config.mask)
    key = job_key(config, checksums)
    check_no_foreign_samples(config, key)
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{config.output.prefix}_resolved_config.json", to_jsonable(config))
    log.info("preset %s, %s sampler with %d steps, grid %s, device %s", plan.preset.name, config.sampler,
             config.num_inference_steps, list(plan.shape), device)  # fmt: skip
    done = skipped = 0
    for seed in range(config.seed, config.seed + config.num_samples):
        files = sample_files(config, seed)
        if recorded_job(files) == key and all(p.exists() for p in files.values()):
            skipped += 1
            log.info("seed %d: already done, skipped (%s)", seed, files["metadata"].name)
            continue
        meta = write_sample(plan, models, seed, files, key, checksums)
        done += 1
        log.info("seed %d: wrote %s in %.1f s (HU %s)", seed, files["image"].name, meta["timings_s"]["total"],
                 meta["hu_min_max"])  # fmt: skip
    log.info("finished: %d generated, %d skipped, output in %s", done, skipped, out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        config = apply_overrides(load_config(args.config, "infer"), args)
        if args.dry_run:
            plan_generation(config)  # checks the mask and grid too; loads no network
            print(json.dumps(to_jsonable(config), indent=2))
            return EXIT_OK
        return run(config)

    return run_guarded(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
