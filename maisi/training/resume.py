"""May a run be resumed under the config given now? Compared key by key, not by hash alone.

A training state records the hash of its run's config. Equal hashes resume at once. Otherwise the run's
config (kept in the state, or in ``train_config.json`` for states written before the state kept it) is
compared with today's: keys the schema gained since the run take their defaults, which by design keep the
old behaviour, so a run trained before a key existed still resumes. Only keys set to another value refuse,
each named with both values.

One key's default does not keep the old behaviour: ``$.diffusion.modality_dropout`` (null: MAISI's 0.1 on
presets with modality input) arrived after diffusion runs without modality dropout. For the diffusion stage
its rates are therefore compared as trained: a run whose config lacks the key trained with none (0), and a
config now resolving to other rates is refused; ``0`` resumes such a run as it started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maisi.config.schema import fill_defaults, json_path, load_schema

# Keys that may change between an interrupted run and its resumption: none of them moves the weights.
RESUMABLE_CHANGES = (
    "steps",
    "checkpoint_every",
    "validate_every",
    "log_every",
    "tensorboard",
    "device",
    "threads",
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


def config_differences(saved: dict[str, Any], current: dict[str, Any], stage: str | None = None) -> list[str]:
    """``$.path: A in the run, B now`` for every non-resumable key that differs; [] when resumable.

    Args:
        saved: the run's resolved config as it was recorded (an older version's may lack keys).
        current: today's resolved config.
        stage: the stage trained; ``diffusion`` compares the modality dropout by its rates
            (:func:`dropout_differences`) instead of its literal values.
    """
    filled = comparable(fill_defaults(saved, load_schema("train")))
    now = comparable(current)
    lines: list[str] = []
    if stage == "diffusion":
        filled, now = _without_dropout(filled), _without_dropout(now)
    _compare(filled, now, [], lines)
    if stage == "diffusion":
        lines += dropout_differences(saved, current)
    return lines


_DROPOUT = "modality_dropout"  # under "diffusion"
_DROPOUT_RATES = ("parent_rate", "unconditional_rate")


def _without_dropout(config: dict[str, Any]) -> dict[str, Any]:
    diffusion = config.get("diffusion")
    if not isinstance(diffusion, dict) or _DROPOUT not in diffusion:
        return config
    return {**config, "diffusion": {k: v for k, v in diffusion.items() if k != _DROPOUT}}


def _dropout_values(config: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded ``$.diffusion.modality_dropout`` values ({rate: value or None}); None without the key."""
    diffusion = config.get("diffusion")
    section = diffusion.get(_DROPOUT) if isinstance(diffusion, dict) else None
    if not isinstance(section, dict):
        return None
    return {rate: section.get(rate) for rate in _DROPOUT_RATES}


def dropout_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``$.diffusion.modality_dropout.<rate>: A in the run, B now`` for each rate trained with another value
    than the run's (a run saved before the key existed trained with 0); [] when both train alike."""
    from maisi.families.ct import PRESETS
    from maisi.training.diffusion import resolved_dropout_rate

    def takes_modality(config: dict[str, Any]) -> bool:
        preset = PRESETS.get(config.get("preset"))  # type: ignore[arg-type]
        return preset is not None and preset.uses_modality

    run_values, now_values = _dropout_values(saved), _dropout_values(current) or {}
    lines = []
    for rate in _DROPOUT_RATES:
        now_value = now_values.get(rate)
        now_rate = resolved_dropout_rate(now_value, takes_modality(current))
        if run_values is None:  # saved before the key existed
            run_rate, run_text = 0.0, "0 (its config predates the key: no modality dropout)"
        else:
            run_rate = resolved_dropout_rate(run_values[rate], takes_modality(saved))
            run_text = _rate_text(run_values[rate], run_rate)
        if run_rate != now_rate:
            now_text = _rate_text(now_value, now_rate)
            lines.append(
                f"$.diffusion.{_DROPOUT}.{rate}: {run_text} in the run, {now_text} now; set it to "
                f"{run_rate:g} to train on as the run started"
            )
    return lines


def _rate_text(value: Any, rate: float) -> str:
    return f"{rate:g} (null: MAISI's rate)" if value is None and rate else f"{rate:g}"


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
