"""May a run be resumed under the config given now? Compared key by key, not by hash alone.

A training state records the hash of its run's config. Equal hashes resume at once. Otherwise the run's
config (kept in the state, or in ``train_config.json`` for states written before the state kept it) is
compared with today's: keys the schema gained since the run take their defaults, which by design keep the
old behaviour, so a run trained before a key existed still resumes. Only keys set to another value refuse,
each named with both values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maisi.config.loader import fill_defaults, json_path, load_schema

# Keys that may change between an interrupted run and its resumption: none of them moves the weights.
RESUMABLE_CHANGES = (
    "steps",
    "checkpoint_every",
    "validate_every",
    "log_every",
    "tensorboard",
    "device",
    "output_dir",
    "autoencoder.val_method",
    "autoencoder.val_memory_budget_mb",
    "autoencoder.val_roi_size",
    "loader.num_workers",
    "loader.prefetch_factor",
    "loader.cache_rate",
)
_ABSENT = object()


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved train config (as JSON) that must not change when resuming."""
    kept = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    for dotted in RESUMABLE_CHANGES:
        section, _, key = dotted.partition(".")
        if key and isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k != key}
            if not kept[section]:  # a section of resumable keys only: configs hash as before it existed
                del kept[section]
    return kept


def saved_run_config(output_dir: str | Path, state_config: dict | None, state_sha256: str) -> dict | None:
    """The run's resolved config: from its state, else from ``train_config.json`` if that belongs to the
    state."""
    if state_config is not None:
        return state_config
    marker = Path(output_dir) / "train_config.json"
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("config_sha256") != state_sha256:
        return (
            None  # written by another run than the state's: not evidence of what the state was trained with
        )
    config = record.get("config")
    return config if isinstance(config, dict) else None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``$.path: A in the run, B now`` for every non-resumable key that differs; [] when resumable."""
    filled = comparable(fill_defaults(saved, load_schema("train")))
    lines: list[str] = []
    _compare(filled, comparable(current), [], lines)
    return lines


def _compare(run: Any, now: Any, path: list[str], out: list[str]) -> None:
    if isinstance(run, dict) and isinstance(now, dict):
        for key in sorted(set(run) | set(now)):
            _compare(run.get(key, _ABSENT), now.get(key, _ABSENT), [*path, key], out)
        return
    if run == now:
        return
    out.append(f"{json_path(path)}: {_show(run)} in the run, {_show(now)} now")


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value)
