"""A generation run: which samples a config asks for, which are finished, and writing the rest.

Each sample writes ``<prefix>_seed<N>_image.<fmt>``, ``..._label.<fmt>`` (mask mode; the input mask,
labels unchanged), ``..._preview.png`` and ``<prefix>_seed<N>.json`` (metadata, written last). A rerun skips
samples whose metadata shows the same job (config, weights, mask, seed) and whose files still match the
SHA-256 checksums recorded there, and redoes the rest. The resolved config of each job goes to
``<prefix>_job-<first 12 hex digits of the job key>_config.json``. A run holds a lock on its output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

import maisi
from maisi.atomic import folder_lock, remove_stale_temporaries, write_json
from maisi.config import InferConfig, to_jsonable
from maisi.data.io import write_volume
from maisi.device import resolve_device
from maisi.errors import InputError
from maisi.files import check_output_dir, file_sha256
from maisi.generation import (
    GenerationPlan,
    Models,
    check_memory,
    generate_checked,
    load_models,
    plan_for_seed,
    plan_generation,
)
from maisi.intensity import output_mapping
from maisi.masks.anatomy import prepare_all
from maisi.preview import write_preview
from maisi.quality import mask_fidelity

log = logging.getLogger(__name__)


def job_key(config: InferConfig, checksums: dict[str, str]) -> str:
    """Identity of what a sample depends on besides its seed (not where it is written, nor how many)."""
    resolved = to_jsonable(config)
    for key in ("output", "num_samples", "seed", "device"):
        resolved.pop(key)
    resolved["quality_check"].pop("fail_on_error")  # how a failure is reported, not what is generated
    text = json.dumps({"config": resolved, "sha256": checksums}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sample_files(config: InferConfig, seed: int) -> dict[str, Path]:
    out, stem, fmt = Path(config.output.dir), f"{config.output.prefix}_seed{seed}", config.output.format
    files = {"image": out / f"{stem}_image.{fmt}", "metadata": out / f"{stem}.json"}
    if config.writes_mask:
        files["label"] = out / f"{stem}_label.{fmt}"
    if config.output.preview:
        files["preview"] = out / f"{stem}_preview.png"
    return files


def read_metadata(files: dict[str, Path]) -> dict[str, Any] | None:
    """A sample's metadata (written last), or None when there is no readable metadata."""
    try:
        data = json.loads(files["metadata"].read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def recorded_job(files: dict[str, Path]) -> str | None:
    """The job key in a sample's metadata, or None when there is no readable metadata."""
    meta = read_metadata(files)
    return meta.get("job_key") if meta is not None else None


def output_checksums(files: dict[str, Path]) -> dict[str, str]:
    """SHA-256 of every file of a sample but its metadata (which records them)."""
    return {kind: file_sha256(path) for kind, path in files.items() if kind != "metadata"}


def why_not_finished(files: dict[str, Path], meta: dict[str, Any]) -> str | None:
    """Why a sample with metadata of this job must be generated again, or None when it may be skipped."""
    recorded = meta.get("outputs_sha256")
    if not isinstance(recorded, dict):
        return f"{files['metadata'].name} records no checksums of the sample's files"
    for kind, path in files.items():
        if kind == "metadata":
            continue
        if not path.is_file():
            return f"{path.name} is missing"
        if file_sha256(path) != recorded.get(kind):
            return f"{path.name} does not match the SHA-256 recorded in {files['metadata'].name}"
    return None


@dataclasses.dataclass
class Job:
    """A checked job: its plan, its loaded networks, the checksums of its inputs and its key."""

    plan: GenerationPlan
    models: Models
    checksums: dict[str, str]
    key: str
    mask_digests: dict[int, str] = dataclasses.field(default_factory=dict)  # anatomy: seed -> voxel SHA-256


def prepare(config: InferConfig) -> Job:
    """Every check of a run, in the order cheapest first; writes nothing.

    Raises:
        InputError: bad mask, grid too large for the memory, unusable output folder, a checkpoint that is
            missing or does not load strictly, or samples of another job under the same names.
    """
    device = resolve_device(config.device)
    plan = plan_generation(config)
    check_output_dir(config.output.dir)
    check_memory(plan, device)
    for warning in plan.warnings:
        log.warning(warning)
    digests = {}
    if plan.anatomy is not None:
        # Every sample's mask is made now (retrieval, resampling, augmentation, lesions): a request that
        # fails for one seed stops the run before the networks load and before anything is written.
        seeds = range(config.seed, config.seed + config.num_samples)
        digests = prepare_all(plan.anatomy, seeds, str(device))
        for seed in seeds:
            log.info("seed %d: %s", seed, describe_pick(plan, seed))
    models = load_models(plan, device)
    checksums = {part: file_sha256(w.path) for part, w in models.weights.items()}
    if config.mask is not None:
        checksums["mask"] = file_sha256(config.mask)
    if plan.anatomy is not None:
        checksums["mask_database"] = plan.anatomy.database_sha256
    key = job_key(config, checksums)
    check_no_foreign_samples(config, key)
    return Job(plan, models, checksums, key, digests)


def describe_pick(plan: GenerationPlan, seed: int) -> str:
    """Anatomy mode: which database mask a seed uses, for the log and --dry-run."""
    assert plan.anatomy is not None
    record = plan.anatomy.sample_record(seed)
    entry, fallback = record["entry"], record["fallback_from"]
    text = f"mask {entry['path']} of {record['database']['path']} (rank {entry['rank']}, {entry['why']})"
    if fallback:
        text += "; instead of " + ", ".join(f"{f['path']} (loses {', '.join(f['lost'])})" for f in fallback)
    lesions = record["lesions"]
    if lesions:
        text += "; lesions " + ", ".join(
            f"'{r['label_name']}' {r['equivalent_diameter_mm']:g} mm in {r['host_names']}" for r in lesions
        )
    return text


def check_no_foreign_samples(config: InferConfig, key: str) -> None:
    """Refuse to mix jobs: samples of another config/weights/mask under the same names are not overwritten."""
    for seed in range(config.seed, config.seed + config.num_samples):
        files = sample_files(config, seed)
        recorded = recorded_job(files)
        if recorded is not None and recorded != key:
            raise InputError(
                f"output directory {config.output.dir} holds {files['metadata'].name} from another job "
                "(different config, weights or mask); use another --output-dir or $.output.prefix, "
                "or delete those files"
            )


def quality_record(tries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The HU-check verdict of a sample from its tries: passed when one passed, failed when one failed and
    none passed, not checked (passed None, with the reason) when no try judged anything."""
    if not tries:
        return None
    verdicts = [t["passed"] for t in tries]
    passed = True if True in verdicts else False if False in verdicts else None
    record: dict[str, Any] = {"passed": passed, "tries": tries}
    if passed is None:
        record["reason"] = tries[-1].get("reason", "no organ judged")
    return record


def write_sample(job: Job, seed: int, files: dict[str, Path]) -> dict[str, Any]:
    """Generate one sample and write its files; the metadata JSON, with their checksums, goes last."""
    models = job.models
    t0 = time.perf_counter()
    plan = plan_for_seed(job.plan, seed, job.mask_digests.get(seed), str(models.device))
    ct, timings, tries = generate_checked(plan, models, seed)
    t1 = time.perf_counter()
    mask = plan.output_mask
    write_volume(files["image"], ct)
    if "label" in files:
        assert mask is not None
        write_volume(files["label"], mask)
    if "preview" in files:
        write_preview(files["preview"], ct, mask)
    timings.update(writing_s=time.perf_counter() - t1, total_s=time.perf_counter() - t0)
    metadata = {
        "job_key": job.key,
        "seed": seed,
        "files": {k: p.name for k, p in files.items() if k != "metadata"},
        "outputs_sha256": output_checksums(files),
        "shape": list(ct.shape),
        "spacing_mm": [round(s, 6) for s in ct.spacing],
        "affine": ct.affine.tolist(),
        "hu_min_max": [int(ct.array.min()), int(ct.array.max())],
        "intensity": output_mapping(plan.conditions.modality),  # how decoded [0, 1] became these voxels
        "conditions": dataclasses.asdict(plan.conditions),
        "sampler": {"scheduler": plan.config.sampler, "num_inference_steps": plan.config.num_inference_steps},
        "scale_factor": models.scale_factor,
        "quality_check": quality_record(tries),
        "mask_fidelity": mask_fidelity(ct, mask) if mask is not None else None,
        "checkpoints": {
            part: {"path": str(w.path), "format": w.source_format, "sha256": job.checksums[part]}
            for part, w in models.weights.items()
        },
        "mask": {"path": plan.config.mask, "sha256": job.checksums.get("mask")} if plan.config.mask else None,
        "mask_grid": plan.mask_grid,
        "anatomy": plan.sample_record,
        "timings_s": {k.removesuffix("_s"): round(v, 3) for k, v in timings.items()},
        "device": str(models.device),
        "versions": {
            "maisi": maisi.__version__,
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
        },
        "config": to_jsonable(plan.config),
    }
    write_json(files["metadata"], metadata)
    return metadata


def write_job_config(config: InferConfig, key: str) -> Path:
    """The resolved config under a name of its own job; rewritten only when absent or different."""
    path = Path(config.output.dir) / f"{config.output.prefix}_job-{key[:12]}_config.json"
    text = json.dumps(to_jsonable(config), indent=2) + "\n"
    try:
        same = path.read_text() == text
    except OSError:
        same = False
    if not same:
        write_json(path, to_jsonable(config))
    return path


def describe_quality(record: dict[str, Any] | None) -> str:
    """One phrase for the log: the HU-check verdict of a sample."""
    if record is None:
        return "HU check not run"
    if record["passed"] is None:
        return f"HU check not checked: {record.get('reason')}"
    if record["passed"]:
        return "HU check passed"
    tries = record["tries"]
    kept = min(tries, key=lambda t: len(t["failed"]))  # as generate_checked keeps it
    count = f"{len(tries)} tr{'y' if len(tries) == 1 else 'ies'}"
    return f"HU check FAILED for {', '.join(kept['failed'])} after {count}"


def summary_line(done: int, skipped: int, verdicts: dict[int, bool | None], out: Path, strict: bool) -> str:
    """The run's last log line: samples generated and skipped, and how the HU check judged them."""
    passed = sum(v is True for v in verdicts.values())
    failed = sorted(seed for seed, v in verdicts.items() if v is False)
    unchecked = sum(v is None for v in verdicts.values())
    failed_text = f"{len(failed)} FAILED" + (f" (seeds {', '.join(map(str, failed[:10]))})" if failed else "")
    line = (
        f"finished: {done} generated, {skipped} skipped; HU check: {passed} passed, {failed_text}, "
        f"{unchecked} not checked; output in {out}"
    )
    if strict and failed:
        line += f"; exit code 1: {len(failed)} sample(s) failed the HU check (strict quality)"
    return line


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a run did: samples generated and skipped, and each seed's HU-check verdict (None: not checked)."""

    generated: int
    skipped: int
    verdicts: dict[int, bool | None]
    output_dir: Path
    strict: bool

    @property
    def failed(self) -> list[int]:
        return sorted(seed for seed, v in self.verdicts.items() if v is False)

    @property
    def line(self) -> str:
        return summary_line(self.generated, self.skipped, self.verdicts, self.output_dir, self.strict)


def generate_all(config: InferConfig) -> RunSummary:
    """Generate every sample of ``config`` that is not finished; inputs are all checked before anything is
    written, and the output folder is locked for the run."""
    started = time.time()
    job = prepare(config)
    plan = job.plan
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        check_no_foreign_samples(config, job.key)  # again: another run may have written here meanwhile
        for path in remove_stale_temporaries(out, f"{config.output.prefix}_", started):
            log.info("removed %s, left by a run that was killed", path.name)
        write_job_config(config, job.key)
        log.info(
            "preset %s, %s sampler with %d steps, grid %s, device %s",
            plan.preset.name,
            config.sampler,
            config.num_inference_steps,
            list(plan.shape),
            job.models.device,
        )
        done = skipped = 0
        verdicts: dict[int, bool | None] = {}
        for seed in range(config.seed, config.seed + config.num_samples):
            files = sample_files(config, seed)
            meta = read_metadata(files)
            ours = meta is not None and meta.get("job_key") == job.key
            reason = why_not_finished(files, meta) if ours else ""  # "": never finished, None: finished
            if reason is None:
                skipped += 1
                log.info("seed %d: already done, skipped (%s)", seed, files["metadata"].name)
            else:
                if reason:
                    log.warning("seed %d: generating again: %s", seed, reason)
                meta = write_sample(job, seed, files)
                done += 1
                quality = describe_quality(meta["quality_check"])
                total_s, hu = meta["timings_s"]["total"], meta["hu_min_max"]
                log.info(
                    "seed %d: wrote %s in %.1f s (HU %s; %s)", seed, files["image"].name, total_s, hu, quality
                )
            assert meta is not None
            verdicts[seed] = (meta.get("quality_check") or {}).get("passed")
    return RunSummary(done, skipped, verdicts, out, config.quality_check.fail_on_error)
