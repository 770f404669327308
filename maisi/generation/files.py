"""The files of one generated sample: their names, the job key in their metadata, whether they are finished.

A sample is finished when its metadata (written last) records this job's key and every other file still
matches the SHA-256 recorded there. Used by :mod:`maisi.generation.run`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from maisi import seeding
from maisi.config import InferConfig, to_jsonable
from maisi.errors import InputError
from maisi.files import check_files, file_sha256
from maisi.run_paths import RunPaths

# Settings that change how fast or in how much memory a sample is made, never what is made, so a rerun that
# changes only them skips the finished samples: torch.compile (the same arithmetic, fused), the threads and
# the tiled decoder's budget (exact tiles; only their size changes). The precision stays in: it changes the
# numbers.
SPEED_ONLY = ("compile", "threads", "decoding.memory_budget_mb")


def job_key(config: InferConfig, checksums: dict[str, str]) -> str:
    """Identity of what a sample depends on besides its seed (not where it is written, nor how many, nor
    how fast: :data:`SPEED_ONLY`), the derivation of its noise streams included
    (:data:`maisi.seeding.STREAMS`: samples made under another one are generated again, not mixed in)."""
    resolved = to_jsonable(config)
    for key in ("output", "num_samples", "seed", "device", "masks", "datalist"):  # the mask is in "mask"
        resolved.pop(key)
    resolved["quality_check"].pop("fail_on_error")  # how a failure is reported, not what is generated
    for path in SPEED_ONLY:
        *parents, leaf = path.split(".")
        node = resolved
        for part in parents:
            node = node[part]
        node.pop(leaf)
    text = json.dumps(
        {"config": resolved, "sha256": checksums, "noise_streams": seeding.STREAMS}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def sample_files(config: InferConfig, seed: int, stem: str | None = None) -> dict[str, Path]:
    """The files of a sample; ``stem`` names its mask in a job of many masks."""
    middle = f"_{stem}" if stem is not None else ""
    out, stem, fmt = (
        Path(config.output.dir),
        f"{config.output.prefix}{middle}_seed{seed}",
        config.output.format,
    )
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


def sample_name(seed: int, stem: str | None) -> str:
    """How messages and the summary name a sample: its seed, or with many masks '<stem>_seed<N>'."""
    return str(seed) if stem is None else f"{stem}_seed{seed}"


def run_paths(config: InferConfig, inputs: list[tuple[str | None, str | None, str]]) -> RunPaths:
    """What a job reads (masks, checkpoints, label dictionary, datalist, mask database and its masks, the
    mask generator's files) and writes (the output folder, under its lock, and every sample's files).

    Args:
        config: the job's config.
        inputs: (mask path or None, stem, where the config names it) of every input of the job.
    """
    paths = RunPaths()
    for mask, _, source in inputs:
        paths.read(source if source.startswith("$.mask") else f"the mask of {source}", mask)
    for part in ("autoencoder", "diffusion_unet", "controlnet"):
        paths.read(f"$.checkpoints.{part}", getattr(config.checkpoints, part))
    paths.read("$.label_dict", config.label_dict)
    if config.datalist is not None:
        paths.read("$.datalist.path", config.datalist.path)
    if config.anatomy is not None:
        generator = config.anatomy.mask_generator
        for part in ("autoencoder", "diffusion_unet", "size_conditions", "size_reference"):
            paths.read(f"$.anatomy.mask_generator.{part}", getattr(generator, part))
        for key, path in _database_files(config):
            paths.read(key, path)
    out = Path(config.output.dir)
    paths.write_into("$.output.dir", out, lock=True)
    for _, stem, _ in inputs:
        for seed in range(config.seed, config.seed + config.num_samples):
            name = sample_name(seed, stem)
            for kind, path in sample_files(config, seed, stem).items():
                paths.write(f"the {kind} of sample {name}", path, group=name)
    return paths


def _database_files(config: InferConfig) -> list[tuple[str, Path]]:
    """Anatomy mode: the mask database and each of its masks (none when the database cannot be read: the
    job's checks say why)."""
    from maisi.masks.anatomy import default_database
    from maisi.masks.database import load_database

    anatomy = config.anatomy
    assert anatomy is not None
    key = "$.anatomy.mask_database"
    try:
        path = Path(anatomy.mask_database) if anatomy.mask_database else default_database(config.preset)
        if path is None or not path.is_file():
            return []
        database = load_database(path, anatomy.mask_root, check_files=False)
    except InputError:
        return []
    return [(key, path)] + [(f"a mask of {key}", database.mask_path(e)) for e in database.entries]


def check_mask_names(config: InferConfig, masks: list[tuple[str, str]]) -> None:
    """Refuse masks that are named like this job's outputs in its output folder: a pattern matching earlier
    outputs would feed generated masks back in as inputs.

    Args:
        config: the job's config.
        masks: (path, where the config names it) of every mask of the job.

    Raises:
        InputError: listing every such mask.
    """
    out = os.path.realpath(config.output.dir)
    problems = []
    for path, source in masks:
        mask = os.path.realpath(path)
        if os.path.dirname(mask) == out and os.path.basename(mask).startswith(f"{config.output.prefix}_"):
            problems.append(
                f"{source}: {mask} is named like this job's outputs in its output folder "
                f"(prefix '{config.output.prefix}_'); a generated mask is not an input: narrow the pattern "
                "or move the masks"
            )
    if problems:
        raise InputError(
            f"refusing to generate: {len(problems)} problem(s) with the outputs in {config.output.dir}:\n  "
            + "\n  ".join(problems)
        )


def declared_paths(config: InferConfig) -> RunPaths:
    """What the job reads and writes (:func:`maisi.generation.files.run_paths`), from the config alone.

    Raises:
        InputError: the datalist of $.datalist cannot be read.
    """
    from maisi.generation.inputs import expand_inputs

    inputs, _ = expand_inputs(config)
    if config.is_batch:  # the clearer refusal first: a pattern matching earlier outputs
        check_mask_names(config, [(str(i.config.mask), i.source) for i in inputs])
    return run_paths(
        config, [(str(i.config.mask) if i.config.mask else None, i.stem, i.source) for i in inputs]
    )


def check_input_files(config: InferConfig) -> None:
    """The mask and label dictionary the config names are there (checked before the heavy imports). The
    masks of $.masks and $.datalist are checked later, with what they hold, so that every problem of every
    mask is listed at once.

    Raises:
        InputError: each missing file, named by its key.
    """
    check_files({"$.mask": config.mask, "$.label_dict": config.label_dict})
