"""A generation run of a plain LDM preset (``python -m maisi.infer`` with e.g. ``brats-2d-ldm``).

The same run rules as CT (:mod:`maisi.generation.run`): every check before anything is written (output
folder, checkpoints loaded strictly, outputs that would collide with an input, samples of another job under
the same names); rank 0 holds the output folder's lock for the run; each file is written atomically and the
metadata last, with the SHA-256 of every file and the job key; a rerun skips the samples whose metadata holds
this job's key and whose files still match, and redoes the rest; under torchrun the unfinished samples are
dealt round-robin to the ranks. A sample that fails at run time is counted and logged; the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

import maisi
from maisi.atomic import folder_lock, remove_stale_temporaries, write_json
from maisi.config import InferConfig
from maisi.device import resolve_device
from maisi.distributed import Ranks, agreed, gather
from maisi.errors import InputError
from maisi.families.ldm_models import LDMModels, load_ldm_models
from maisi.families.ldm_sampling import sample_ldm
from maisi.files import check_output_dir
from maisi.generation.files import output_checksums, read_metadata, why_not_finished
from maisi.generation.ldm_files import (
    SampleKey,
    ldm_job_key,
    ldm_run_paths,
    ldm_sample_files,
    resolved_ldm_config,
    sample_keys,
    sample_label,
    write_ldm_sample,
)
from maisi.generation.ldm_text import PromptContext, load_prompt_context
from maisi.sampling import ContextGuidance

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LDMJob:
    """A checked job: the config, its loaded networks, its key and the files of each seed."""

    config: InferConfig
    models: LDMModels
    key: str
    samples: dict[SampleKey, dict[str, Path]]  # seed or (prompt index, seed) -> files
    ranks: Ranks = Ranks()
    text: PromptContext | None = None  # text presets: the prompts' embeddings


@dataclasses.dataclass(frozen=True)
class LDMRunSummary:
    """What a run did, over every rank: seeds generated, skipped (finished before) and failed."""

    generated: list[SampleKey]
    skipped: list[SampleKey]
    failed: list[SampleKey]
    output_dir: Path

    @property
    def exit_code(self) -> int:
        """1 when a sample could not be generated, else 0."""
        return 1 if self.failed else 0

    @property
    def line(self) -> str:
        def seeds(items: list[SampleKey]) -> str:
            shown = ", ".join(sample_label(k) for k in items[:10]) + (", ..." if len(items) > 10 else "")
            return f" ({shown})" if items else ""

        line = (
            f"finished: {len(self.generated)} generated, {len(self.skipped)} skipped, {len(self.failed)} "
            f"failed{seeds(self.failed)}; output in {self.output_dir}"
        )
        if self.failed:
            line += f"; exit code 1: {len(self.failed)} sample(s) could not be generated (errors above)"
        return line


def prepare_ldm(config: InferConfig, ranks: Ranks | None = None) -> LDMJob:
    """Every check of an LDM run, cheapest first; writes nothing.

    Raises:
        InputError: an unusable output folder, a checkpoint that is missing or does not load strictly,
            outputs that would overwrite a checkpoint, or samples of another job under the same names.
    """
    ranks = ranks or Ranks()

    def checks() -> LDMJob:
        check_output_dir(config.output.dir)
        ldm_run_paths(config).check("generate")  # outputs on a checkpoint or on each other: before loading
        device = ranks.device(resolve_device(config.device))
        models = load_ldm_models(config, device)
        checksums = {part: w.sha256 for part, w in models.weights.items()}
        text = load_prompt_context(config, models.preset, device) if models.preset.takes_prompts else None
        if text is not None:
            checksums["text_encoder"] = text.source["sha256"]
        samples = {key: ldm_sample_files(config, models.preset, key) for key in sample_keys(config)}
        job = LDMJob(config, models, ldm_job_key(config, checksums), samples, ranks, text)
        check_no_foreign_samples(job)
        return job

    return agreed(ranks, checks)


def check_no_foreign_samples(job: LDMJob) -> None:
    """Refuse to overwrite samples of another job (other config or weights) under the same names."""
    for files in job.samples.values():
        meta = read_metadata(files)
        if meta is not None and meta.get("job_key") != job.key:
            raise InputError(
                f"output directory {job.config.output.dir} holds {files['metadata'].name} from another job "
                "(different config or weights, or an earlier maisi version); use another --output-dir or "
                "$.output.prefix, or delete those files"
            )


def write_ldm_job_config(job: LDMJob) -> Path:
    """The resolved config under a name of its own job (``<prefix>_job-<12 hex>_config.json``); rewritten only
    when absent or different."""
    config = job.config
    path = Path(config.output.dir) / f"{config.output.prefix}_job-{job.key[:12]}_config.json"
    resolved = resolved_ldm_config(config)
    try:
        same = json.loads(path.read_text()) == resolved
    except (OSError, ValueError):
        same = False
    return path if same else write_json(path, resolved)


@contextlib.contextmanager
def _locked_output(job: LDMJob, started: float) -> Iterator[None]:
    """Rank 0 creates and locks the output folder for the run (another run is refused), checks it again,
    clears temporaries of killed runs and writes the job's config; the other ranks wait for that."""
    config, ranks = job.config, job.ranks
    out = Path(config.output.dir)
    with contextlib.ExitStack() as stack:

        def take() -> None:
            if not ranks.is_main:
                return
            out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(folder_lock(out))
            check_no_foreign_samples(job)  # again: another run may have written here meanwhile
            for path in remove_stale_temporaries(out, f"{config.output.prefix}_", started):
                log.info("removed %s, left by a run that was killed", path.name)
            write_ldm_job_config(job)

        agreed(ranks, take)
        yield


def _finished(job: LDMJob, key: SampleKey) -> bool:
    files = job.samples[key]
    meta = read_metadata(files)
    if meta is None or meta.get("job_key") != job.key:
        return False
    reason = why_not_finished(files, meta)
    if reason is not None:
        log.warning("%s: generating again: %s", sample_label(key), reason)
    return reason is None


def sample_metadata(job: LDMJob, key: SampleKey, geometry: dict[str, Any], sample: Any) -> dict[str, Any]:
    """What a sample's JSON records besides its files' checksums (text presets: the prompt's record)."""
    config, models = job.config, job.models
    preset = models.preset
    seed = key[1] if isinstance(key, tuple) else key
    text = {} if job.text is None else {"text": job.text.metadata(key[0], config.sampling.guidance_scale)}
    return {
        "job_key": job.key,
        "seed": seed,
        **text,
        "preset": preset.name,
        "family": preset.family,
        **geometry,
        "sampler": {
            "scheduler": config.sampler,
            "num_inference_steps": config.num_inference_steps,
            "timestep_spacing": sample.timestep_spacing,
            "timesteps": sample.timesteps,
            "prediction_type": sample.prediction_type,
            "clip_sample": False,
        },
        "scale_factor": models.scale.to_json(),
        "checkpoints": {part: w.to_json() for part, w in models.weights.items()},
        "device": str(models.device),
        "versions": {
            "maisi": maisi.__version__,
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
        },
        "config": resolved_ldm_config(config),
        "process": {"rank": job.ranks.rank, "world_size": job.ranks.world_size},
    }


def write_ldm_seed(job: LDMJob, key: SampleKey, progress: bool = False) -> dict[str, Any]:
    """Generate sample ``key`` and write its files; the metadata JSON, with their checksums, last."""
    files = job.samples[key]
    t0 = time.perf_counter()
    if job.text is None:
        sample = sample_ldm(job.config, job.models, key, progress=progress)  # type: ignore[arg-type]
    else:
        index, seed = key  # type: ignore[misc]
        scale = job.config.sampling.guidance_scale
        guidance = ContextGuidance(job.text.null_context, scale if scale > 0 else None)
        context = job.text.contexts[index : index + 1]
        sample = sample_ldm(job.config, job.models, seed, progress, context, guidance)
    t1 = time.perf_counter()
    geometry = write_ldm_sample(files, sample.image, job.models.preset)
    timings = {**sample.timings_s, "writing": time.perf_counter() - t1, "total": time.perf_counter() - t0}
    metadata = {
        **sample_metadata(job, key, geometry, sample),
        "files": {k: p.name for k, p in files.items() if k != "metadata"},
        "outputs_sha256": output_checksums(files),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    write_json(files["metadata"], metadata)
    return metadata


def generate_all_ldm(config: InferConfig, ranks: Ranks | None = None) -> LDMRunSummary:
    """Generate every sample of ``config`` that is not finished (this rank's share of them).

    Returns:
        The summary over every rank (the same on each).
    """
    ranks = ranks or Ranks()
    started = time.time()
    job = prepare_ldm(config, ranks)
    preset = job.models.preset
    with _locked_output(job, started):
        if ranks.is_main:
            log.info(
                "preset %s (%dD LDM), %s with %d steps (%s timesteps), %d seed(s), scale factor %g (%s), "
                "device %s, %d process(es)",
                preset.name,
                preset.spatial_dims,
                config.sampler,
                config.num_inference_steps,
                config.sampling.timestep_spacing or preset.timestep_spacing,
                config.num_samples,
                job.models.scale.value,
                job.models.scale.source,
                job.models.device,
                ranks.world_size,
            )
        done = {s for s in ranks.shard(list(job.samples)) if _finished(job, s)}
        done = {s for share in gather(done, ranks) for s in share}
        for key in sorted(done) if ranks.is_main else ():
            log.info("%s: already done, skipped (%s)", sample_label(key), job.samples[key]["metadata"].name)
        todo = [s for s in job.samples if s not in done]
        results: dict[SampleKey, bool] = {}
        for key in ranks.shard(todo):
            try:
                meta = write_ldm_seed(job, key, progress=ranks.is_main)
            except Exception as e:  # noqa: BLE001 - one sample's failure must not stop the others
                label = sample_label(key)
                log.error("%s: runtime failure, not generated: %s: %s", label, type(e).__name__, e)
                results[key] = False
                continue
            log.info(
                "%s: wrote %s in %.1f s (values [%.3g, %.3g])",
                sample_label(key),
                job.samples[key]["image"].name,
                meta["timings_s"]["total"],
                *meta["value_range"],
            )
            results[key] = True
        merged = {s: ok for share in gather(results, ranks) for s, ok in share.items()}
    return LDMRunSummary(
        sorted(s for s, ok in merged.items() if ok),
        sorted(done),
        sorted(s for s, ok in merged.items() if not ok),
        Path(config.output.dir),
    )
