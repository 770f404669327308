"""The files of one generated sample: their names, the job key in their metadata, whether they are finished.

A sample is finished when its metadata (written last) records this job's key and every other file still
matches the SHA-256 recorded there. Used by :mod:`maisi.generation_run`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from maisi.config import InferConfig, to_jsonable
from maisi.files import file_sha256


def job_key(config: InferConfig, checksums: dict[str, str]) -> str:
    """Identity of what a sample depends on besides its seed (not where it is written, nor how many)."""
    resolved = to_jsonable(config)
    for key in ("output", "num_samples", "seed", "device", "masks", "datalist"):  # the mask is in "mask"
        resolved.pop(key)
    resolved["quality_check"].pop("fail_on_error")  # how a failure is reported, not what is generated
    text = json.dumps({"config": resolved, "sha256": checksums}, sort_keys=True)
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
