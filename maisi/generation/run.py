"""A generation run: which samples a config asks for, which are finished, and writing the rest.

Each sample writes ``<prefix>_seed<N>_image.<fmt>``, ``..._label.<fmt>`` (mask mode; the input mask,
labels unchanged), ``..._preview.png`` and ``<prefix>_seed<N>.json`` (metadata, written last); with many
masks ($.masks, $.datalist) ``<prefix>_<stem>_seed<N>...``, the stem naming the mask
(:mod:`maisi.generation.inputs`). A rerun skips samples whose metadata shows the same job (config, weights,
mask and its checksum, seed) and whose files still match the SHA-256 checksums recorded there, and redoes
the rest. The resolved config of each job goes to ``<prefix>_job-<12 hex digits of its key>_config.json``.

Under ``torchrun`` every rank checks its share of the masks (every problem is reported on every rank, exit
code 2, before any work), then the samples not yet finished are dealt round-robin to the ranks, so a rerun
with another number of processes still skips what is done. Rank 0 holds the output folder's lock for the
whole run (the other ranks of the same job write under it; another run is refused) and logs the one summary,
counted over all ranks. A sample that fails at run time is counted and logged; the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from maisi.atomic import folder_lock, remove_stale_temporaries, write_json
from maisi.config import InferConfig, to_jsonable
from maisi.data.io import write_volume
from maisi.device import resolve_device
from maisi.distributed import Ranks, agreed, finish, gather, init_from_env
from maisi.errors import InputError
from maisi.files import check_output_dir, file_sha256
from maisi.generation.files import (
    check_mask_names,
    describe_quality,
    job_key,
    output_checksums,
    read_metadata,
    recorded_job,
    run_paths,
    sample_files,
    why_not_finished,
)
from maisi.generation.inputs import GenerationInput, expand_inputs
from maisi.generation.pipeline import check_input, generate_sample, range_key
from maisi.generation.plan import (
    GenerationPlan,
    Models,
    load_models,
    plan_for_seed,
    plan_generation,
)
from maisi.intensity import is_mr
from maisi.masks.anatomy import prepare_all
from maisi.preview import write_preview

log = logging.getLogger(__name__)
T = TypeVar("T")

# Ranks exchange only small objects (gloo, whatever the device), and a rank that is done waits at the end
# for the slowest: one sample of a large grid on CPU takes hours, more than torch's default 30 minutes.
RANK_TIMEOUT = timedelta(days=7)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample of a job: an input and a seed, and the files it writes."""

    index: int  # position in the job's list of samples (inputs in order, then seeds)
    input: int  # position in the job's list of inputs
    seed: int
    stem: str | None
    files: dict[str, Path]

    @property
    def label(self) -> str:
        """How the log names the sample: 'seed 3', or with many masks 'liver_case seed 3'."""
        return f"seed {self.seed}" if self.stem is None else f"{self.stem} seed {self.seed}"

    @property
    def name(self) -> str:
        """How the summary names the sample: its seed, or with many masks '<stem>_seed<N>'."""
        return str(self.seed) if self.stem is None else f"{self.stem}_seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class InputJob:
    """A checked input: the checksums of what its samples depend on, and its job key."""

    input: GenerationInput
    checksums: dict[str, str]
    key: str


@dataclasses.dataclass
class Job:
    """A checked job: its inputs, its samples, its loaded networks; one input's plan is kept in memory."""

    config: InferConfig
    inputs: list[InputJob]
    samples: list[Sample]
    models: Models
    plan: GenerationPlan | None  # a job of one input: its plan (many masks are planned again one by one)
    ranks: Ranks = Ranks()
    mask_digests: dict[int, str] = dataclasses.field(default_factory=dict)  # anatomy: seed -> voxel SHA-256

    @property
    def key(self) -> str:
        """The job's key: its input's, or with many masks one over every input's key (names its config)."""
        if len(self.inputs) == 1 and self.inputs[0].input.stem is None:
            return self.inputs[0].key
        return hashlib.sha256("\n".join(i.key for i in self.inputs).encode()).hexdigest()


def prepare(config: InferConfig, ranks: Ranks | None = None) -> Job:
    """Every check of a run, in the order cheapest first; writes nothing.

    With many masks, each rank checks its share of them and every problem of every mask is reported at once.

    Raises:
        InputError: unusable output folder, a pattern matching nothing, a bad mask, grid too large for the
            memory, a checkpoint that is missing or does not load strictly, outputs that would collide with
            each other or an input, or samples of another job under the same names.
    """
    ranks = ranks or Ranks()

    def local_checks() -> tuple[torch.device, tuple[list[GenerationInput], list[str]]]:
        check_output_dir(config.output.dir)
        return ranks.device(resolve_device(config.device)), expand_inputs(config)

    device, (inputs, problems) = agreed(ranks, local_checks)
    declared = [(str(i.config.mask) if i.config.mask else None, i.stem, i.source) for i in inputs]
    agreed(ranks, lambda: run_paths(config, declared).check("generate"))  # before any mask is read
    plan, mask_sha = _check_inputs(inputs, problems, device, ranks)
    return agreed(ranks, lambda: _load_and_name(config, inputs, plan, mask_sha, device, ranks))


def _check_inputs(
    inputs: list[GenerationInput], problems: list[str], device: torch.device, ranks: Ranks
) -> tuple[GenerationPlan | None, dict[int, str]]:
    """Plan every input (mask read and checked, grid, memory): the plan of a single input, and the SHA-256
    of each input's mask. With many masks every rank checks its share, and every problem, those of finding
    the masks (``problems``) included, is raised at once."""
    if len(inputs) == 1 and inputs[0].stem is None:
        plan = agreed(ranks, lambda: check_input(inputs[0].config, device))
        for warning in plan.warnings if ranks.is_main else ():
            log.warning(warning)
        mask = inputs[0].config.mask
        return plan, ({0: file_sha256(mask)} if mask is not None else {})
    mine: dict[int, tuple[str | None, str | None]] = {}
    for i in ranks.shard(range(len(inputs))):
        try:
            plan = check_input(inputs[i].config, device)
        except InputError as e:
            mine[i] = (str(e).replace("\n", "\n    "), None)
            continue
        for warning in plan.warnings:
            log.warning(warning)
        mine[i] = (None, file_sha256(plan.config.mask))  # type: ignore[arg-type]
        del plan  # many masks are not all held in memory: each is planned again when its samples run
    checked = {i: r for share in gather(mine, ranks) for i, r in share.items()}
    problems = problems + [str(checked[i][0]) for i in range(len(inputs)) if checked[i][0] is not None]
    if problems:
        raise InputError(f"{len(problems)} problem(s) with the masks:\n  " + "\n  ".join(problems))
    return None, {i: sha for i, (_, sha) in checked.items() if sha is not None}


def _load_and_name(
    config: InferConfig,
    inputs: list[GenerationInput],
    plan: GenerationPlan | None,
    mask_sha: dict[int, str],
    device: torch.device,
    ranks: Ranks,
) -> Job:
    digests = {}
    if plan is not None and plan.anatomy is not None:
        # Every sample's mask is made now (retrieval, resampling, augmentation, lesions): a request that
        # fails for one seed stops the run before the networks load and before anything is written.
        seeds = range(config.seed, config.seed + config.num_samples)
        digests = prepare_all(plan.anatomy, seeds, str(device))
        for seed in seeds if plan.anatomy.generator is None else ():  # generated masks: made per sample
            log.info("seed %d: %s", seed, describe_pick(plan, seed))
    models = load_models(plan if plan is not None else config, device)
    weights_sha = {part: file_sha256(w.path) for part, w in models.weights.items()}
    checked = []
    for i, item in enumerate(inputs):
        checksums = dict(weights_sha)
        if i in mask_sha:
            checksums["mask"] = mask_sha[i]
        if plan is not None and plan.anatomy is not None:
            checksums.update(plan.anatomy.checksums)
        checked.append(InputJob(item, checksums, job_key(item.config, checksums)))
    samples = [
        Sample(n, i, seed, item.stem, sample_files(config, seed, item.stem))
        for n, (i, item, seed) in enumerate(
            (i, item, seed)
            for i, item in enumerate(inputs)
            for seed in range(config.seed, config.seed + config.num_samples)
        )
    ]
    job = Job(config, checked, samples, models, plan, ranks, digests)
    if config.is_batch:
        if ranks.is_main:
            log.info("%d masks x %d seed(s) = %d samples:", len(inputs), config.num_samples, len(samples))
            for item in inputs:
                log.info("  %s_%s_seed<N>: %s", config.output.prefix, item.stem, item.config.mask)
        check_mask_names(config, [(str(i.input.config.mask), i.input.source) for i in checked])
    check_no_foreign_samples(job)
    return job


def describe_pick(plan: GenerationPlan, seed: int) -> str:
    """Anatomy mode: which database mask a seed uses, for the log and --dry-run."""
    assert plan.anatomy is not None
    record = plan.anatomy.sample_record(seed)
    if plan.anatomy.generator is not None:
        return describe_generated(record)
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


def describe_generated(record: dict[str, Any]) -> str:
    """A generated mask's request, snap and achieved sizes, for the log."""
    asked = ", ".join(f"{n} {s:g}" for n, s in record["request"]["controllable_anatomy_size"])
    achieved = record["achieved"]
    sizes = achieved["sizes"]
    got = ", ".join(
        f"{n} {achieved['volumes_ml'][n]:g} mL"
        + (f" (size {sizes[n]:g})" if sizes and sizes[n] is not None else "")
        for n, _ in record["request"]["controllable_anatomy_size"]
    )
    return f"generated mask: asked {asked} (size-table row {record['size_table_row']}); got {got}"


def check_no_foreign_samples(job: Job) -> None:
    """Refuse to mix jobs: samples of another config/weights/mask under the same names are not overwritten."""
    for sample in job.samples:
        recorded = recorded_job(sample.files)
        if recorded is not None and recorded != job.inputs[sample.input].key:
            raise InputError(
                f"output directory {job.config.output.dir} holds {sample.files['metadata'].name} from "
                "another job (different config, weights or mask, or an earlier maisi version); use another "
                "--output-dir or $.output.prefix, or delete those files"
            )


def write_sample(job: Job, sample: Sample, plan: GenerationPlan) -> dict[str, Any]:
    """Generate one sample from its input's plan and write its files; the metadata JSON, with their
    checksums, goes last."""
    models, seed, files = job.models, sample.seed, sample.files
    checked = job.inputs[sample.input]
    t0 = time.perf_counter()
    show = job.ranks.is_main  # one rank's bars (each obeys --no-progress, maisi.progress)
    plan = plan_for_seed(plan, seed, job.mask_digests.get(seed), str(models.device), progress=show)
    if plan.anatomy is not None and plan.anatomy.generator is not None:
        log.info("%s: %s", sample.label, describe_generated(plan.sample_record))
    generated = generate_sample(plan, models, seed, progress=show)
    ct, mask = generated.image, generated.mask
    t1 = time.perf_counter()
    write_volume(files["image"], ct)
    if "label" in files:
        assert mask is not None
        write_volume(files["label"], mask)
    if "preview" in files:
        write_preview(files["preview"], ct, mask, modality=plan.conditions.modality)
    timings = {**generated.metadata["timings_s"], "writing": time.perf_counter() - t1}
    timings["total"] = time.perf_counter() - t0
    metadata = {
        "job_key": checked.key,
        "seed": seed,
        "input": {"stem": sample.stem, "source": checked.input.source} if sample.stem is not None else None,
        "files": {k: p.name for k, p in files.items() if k != "metadata"},
        "outputs_sha256": output_checksums(files),
        **generated.metadata,  # the sample in memory: grid, conditions, sampler, HU check, versions, config
        "checkpoints": {
            part: {"path": str(w.path), "format": w.source_format, "sha256": checked.checksums[part]}
            for part, w in models.weights.items()
        },
        "mask": {"path": plan.config.mask, "sha256": checked.checksums.get("mask")}
        if plan.config.mask
        else None,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "process": {"rank": job.ranks.rank, "world_size": job.ranks.world_size},
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


def summary_line(
    done: int,
    skipped: int,
    verdicts: dict[str, bool | None],
    out: Path,
    strict: bool,
    errors: list[str] | None = None,
    by_seed: bool = True,
) -> str:
    """The run's last log line: samples generated, skipped and failed, and how the HU check judged them.

    Args:
        verdicts: HU-check verdict of each sample written or skipped, by name (its seed, or
            ``<stem>_seed<N>`` with many masks), in the job's order; None: not checked.
        errors: names of the samples that could not be generated (runtime failures); shown only when any.
        by_seed: the names are seeds (one input).
    """
    word = "seeds" if by_seed else "samples"

    def names(items: list[str]) -> str:
        return f" ({word} {', '.join(items[:10])}{', ...' if len(items) > 10 else ''})" if items else ""

    passed = sum(v is True for v in verdicts.values())
    failed = [name for name, v in verdicts.items() if v is False]
    unchecked = sum(v is None for v in verdicts.values())
    errors = errors or []
    not_done = f", {len(errors)} failed{names(errors)}" if errors else ""
    line = (
        f"finished: {done} generated, {skipped} skipped{not_done}; HU check: {passed} passed, "
        f"{len(failed)} FAILED{names(failed)}, {unchecked} not checked; output in {out}"
    )
    if strict and failed:
        line += f"; exit code 1: {len(failed)} sample(s) failed the HU check (strict quality)"
    if errors:
        line += f"; exit code 1: {len(errors)} sample(s) could not be generated (errors above)"
    return line


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a run did, over every rank: samples generated, skipped and failed (a runtime error), and each
    written or skipped sample's HU-check verdict (None: not checked), by name, in the job's order."""

    generated: int
    skipped: int
    verdicts: dict[str, bool | None]
    output_dir: Path
    strict: bool
    errors: list[str] = dataclasses.field(default_factory=list)
    by_seed: bool = True

    @property
    def failed(self) -> list[str]:
        """The samples that failed the HU check."""
        return [name for name, v in self.verdicts.items() if v is False]

    @property
    def exit_code(self) -> int:
        """1 when a sample could not be generated, or failed the HU check under strict quality; else 0."""
        return 1 if self.errors or (self.strict and self.failed) else 0

    @property
    def line(self) -> str:
        return summary_line(
            self.generated,
            self.skipped,
            self.verdicts,
            self.output_dir,
            self.strict,
            self.errors,
            self.by_seed,
        )


@contextlib.contextmanager
def process_group(config: InferConfig) -> Iterator[Ranks]:
    """This process's place in a torchrun job (a single process without torchrun), for the block."""
    ranks = init_from_env(resolve_device(config.device), backend="gloo", timeout=RANK_TIMEOUT)
    try:
        yield ranks
    finally:
        finish(ranks)


def generate_all(config: InferConfig, ranks: Ranks | None = None) -> RunSummary:
    """Generate every sample of ``config`` that is not finished (this rank's share of them); every input is
    checked before anything is written, and the output folder is locked for the run.

    Returns:
        The summary over every rank (the same on each).
    """
    ranks = ranks or Ranks()
    started = time.time()
    with contextlib.ExitStack() as held:

        def lock_early() -> bool:
            # A folder in use by another run is refused now, after the config checks, not once this run's
            # masks are made and its networks loaded; a folder that does not exist yet is locked below.
            if ranks.is_main and Path(config.output.dir).is_dir():
                held.enter_context(folder_lock(config.output.dir))
                return True
            return False

        locked = agreed(ranks, lock_early)
        job = prepare(config, ranks)
        with _locked_output(job, started, locked):
            states = _states(job)
            todo = [s for s in job.samples if not isinstance(states[s.index], _Done)]
            mine = ranks.shard(todo)  # dealt after the finished ones are known: shares even on a rerun
            if ranks.world_size > 1:
                log.info("rank %d: %d of the %d samples to generate", ranks.rank, len(mine), len(todo))
            results = _generate(job, mine, states)
            merged = {i: r for share in gather(results, ranks) for i, r in share.items()}
    merged.update({i: v for i, v in states.items() if isinstance(v, _Done)})
    verdicts, errors = {}, []
    for sample in job.samples:  # in the job's order
        result = merged[sample.index]
        if isinstance(result, _Done):
            verdicts[sample.name] = result.verdict
        else:
            errors.append(sample.name)
    generated = sum(isinstance(r, _Done) and r.generated for r in merged.values())
    skipped = len(job.samples) - generated - len(errors)
    out, strict = Path(config.output.dir), config.quality_check.fail_on_error
    return RunSummary(generated, skipped, verdicts, out, strict, errors, job.inputs[0].input.stem is None)


@dataclasses.dataclass(frozen=True)
class _Done:
    """A sample written now (generated) or found finished, and its HU-check verdict."""

    generated: bool
    verdict: bool | None


@contextlib.contextmanager
def _locked_output(job: Job, started: float, locked: bool = False) -> Iterator[None]:
    """Rank 0 creates and locks the output folder for the run (the other ranks of this torchrun job write
    under its lock; another run is refused), checks it again and writes the job's config; ``locked``: rank 0
    holds the lock already."""
    config, ranks = job.config, job.ranks
    out = Path(config.output.dir)
    with contextlib.ExitStack() as stack:

        def take() -> None:
            if not ranks.is_main:
                return
            out.mkdir(parents=True, exist_ok=True)
            if not locked:
                stack.enter_context(folder_lock(out))
            check_no_foreign_samples(job)  # again: another run may have written here meanwhile
            for path in remove_stale_temporaries(out, f"{config.output.prefix}_", started):
                log.info("removed %s, left by a run that was killed", path.name)
            write_job_config(config, job.key)
            _log_job(job)

        agreed(ranks, take)  # the other ranks start writing only once rank 0 holds the lock
        yield


def _log_job(job: Job) -> None:
    config = job.config
    where = f"grid {list(job.plan.shape)}" if job.plan is not None else f"{len(job.inputs)} masks"
    log.info(
        "preset %s, %s sampler with %d steps, %s x %d seed(s), device %s, %d process(es)",
        config.preset,
        config.sampler,
        config.num_inference_steps,
        where,
        config.num_samples,
        job.models.device,
        job.ranks.world_size,
    )


def _states(job: Job) -> dict[int, _Done | str]:
    """Every sample's state, checked by the ranks in shares: _Done when finished, else why it must be
    generated ('' when never finished)."""
    mine: dict[int, _Done | str] = {}
    for sample in job.ranks.shard(job.samples):
        meta = read_metadata(sample.files)
        ours = meta is not None and meta.get("job_key") == job.inputs[sample.input].key
        reason = why_not_finished(sample.files, meta) if ours else ""  # type: ignore[arg-type]
        if reason is None:
            assert meta is not None
            log.info("%s: already done, skipped (%s)", sample.label, sample.files["metadata"].name)
            mine[sample.index] = _Done(False, (meta.get("quality_check") or {}).get("passed"))
        else:
            mine[sample.index] = reason
    return {i: state for share in gather(mine, job.ranks) for i, state in share.items()}


def _plan_again(checked: InputJob) -> GenerationPlan:
    """The plan of one of many masks, made again when its samples run; the mask must be the one checked
    (its checksum is in the job key its samples record)."""
    mask = checked.input.config.mask
    assert mask is not None
    if file_sha256(mask) != checked.checksums["mask"]:
        raise InputError(f"mask {mask} changed since the job was checked; run the job again to use it")
    return plan_generation(checked.input.config)


def _generate(job: Job, samples: list[Sample], states: dict[int, _Done | str]) -> dict[int, _Done | str]:
    """Generate this rank's samples: _Done, or the error of a sample that failed (the others go on)."""
    results: dict[int, _Done | str] = {}
    planned: tuple[int, GenerationPlan] | None = None  # many masks: the last input's plan, reused
    for sample in samples:
        reason = states[sample.index]
        label = sample.label if job.ranks.world_size == 1 else f"rank {job.ranks.rank}: {sample.label}"
        if reason:
            log.warning("%s: generating again: %s", label, reason)
        try:
            if job.plan is not None:
                plan = job.plan
            else:
                if planned is None or planned[0] != sample.input:
                    planned = None  # the previous mask is dropped before the next one is read
                    planned = (sample.input, _plan_again(job.inputs[sample.input]))
                plan = planned[1]
            meta = write_sample(job, sample, plan)
        except InputError as e:
            log.error("%s: not generated: %s", label, e)
            results[sample.index] = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - one sample's failure must not stop the others
            log.error("%s: runtime failure, not generated: %s: %s", label, type(e).__name__, e, exc_info=True)
            results[sample.index] = f"{type(e).__name__}: {e}"
            continue
        quality = describe_quality(meta["quality_check"])
        modality = meta["conditions"]["modality"]
        units = "MR units" if is_mr(modality) else "HU"
        log.info(
            "%s: wrote %s in %.1f s (%s %s; %s)",
            label,
            sample.files["image"].name,
            meta["timings_s"]["total"],
            units,
            meta[range_key(modality)],
            quality,
        )
        results[sample.index] = _Done(True, (meta.get("quality_check") or {}).get("passed"))
    return results
