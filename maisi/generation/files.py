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
from maisi.files import file_sha256

# Settings that change how fast or in how much memory a sample is made, never what is made, so a rerun that
# changes only them skips the finished samples: torch.compile (the same arithmetic, fused) and the tiled
# decoder's budget (exact tiles; only their size changes). The precision stays in: it changes the numbers.
SPEED_ONLY = ("compile", "decoding.memory_budget_mb")


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


def check_outputs(
    config: InferConfig,
    masks: list[tuple[str, str]],
    weights: list[tuple[str, str]],
    samples: list[tuple[str, dict[str, Path]]],
) -> None:
    """Refuse, before any work, outputs that would collide with each other or overwrite an input, and
    masks that are this job's own outputs (a pattern matching the output folder).

    Args:
        config: the job's config.
        masks: (path, where the config names it) of every mask of the job.
        weights: (part, path) of every checkpoint.
        samples: (name, files) of every sample.

    Raises:
        InputError: listing every problem.
    """
    out = os.path.realpath(config.output.dir)
    inputs: dict[str, str] = {}
    problems = []
    for path, source in masks:
        mask = os.path.realpath(path)
        inputs[mask] = f"the mask of {source}"
        if os.path.dirname(mask) == out and os.path.basename(mask).startswith(f"{config.output.prefix}_"):
            problems.append(
                f"{source}: {mask} is named like this job's outputs in its output folder "
                f"(prefix '{config.output.prefix}_'); a generated mask is not an input: narrow the pattern "
                "or move the masks"
            )
    for part, path in weights:
        inputs.setdefault(os.path.realpath(path), f"the {part} checkpoint")
    claimed: dict[str, str] = {}
    for name, files in samples:
        for path in files.values():
            real = os.path.realpath(path)
            if real in inputs:
                problems.append(f"{path}: an output of sample {name} would overwrite {inputs[real]}")
            elif real in claimed:
                problems.append(f"{path}: samples {claimed[real]} and {name} would both write it")
            claimed.setdefault(real, name)
    if problems:
        raise InputError(
            f"refusing to generate: {len(problems)} problem(s) with the outputs in {config.output.dir}:\n  "
            + "\n  ".join(problems)
        )
