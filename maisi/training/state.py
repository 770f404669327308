"""Resumable training state: written atomically to ``<output_dir>/state/last.pt``, read with weights_only."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from maisi.atomic import atomic_path
from maisi.errors import CheckpointError, InputError

FORMAT = "maisi-train-state"


@dataclass
class TrainState:
    stage: str
    step: int
    config_sha256: str
    model: dict[str, Any]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    scaler: dict[str, Any]
    stage_state: dict[str, Any]
    config: dict[str, Any] | None = None  # the resolved config as JSON; None in states of older versions


def state_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "state" / "last.pt"


def save_train_state(output_dir: str | Path, state: TrainState) -> Path:
    """Write the state under a temporary name, then rename.

    No random-number state is saved: every step re-seeds from (seed, step, rank) and draws its batch from a
    generator seeded the same way, so the step is all a resumed run needs (states of older versions hold
    ``rng_cpu``/``rng_cuda``, which loading ignores).
    """
    payload = {"format": FORMAT, **asdict(state)}
    path = state_path(output_dir)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


# What a state must hold to be resumed, with the type each entry must have.
REQUIRED_FIELDS: dict[str, type] = {
    "stage": str,
    "step": int,
    "config_sha256": str,
    "model": dict,
    "optimizer": dict,
    "lr_scheduler": dict,
    "scaler": dict,
    "stage_state": dict,
}


def _check_fields(raw: dict[str, Any], path: Path) -> None:
    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if missing:
        raise CheckpointError(
            f"{path}: training state lacks {', '.join(missing)} (truncated or edited?); it cannot be resumed"
        )
    wrong = [
        f"{k} is {type(raw[k]).__name__}, expected {t.__name__}"
        for k, t in REQUIRED_FIELDS.items()
        if not isinstance(raw[k], t) or (t is int and isinstance(raw[k], bool))
    ]
    if raw.get("config") is not None and not isinstance(raw["config"], dict):
        wrong.append(f"config is {type(raw['config']).__name__}, expected dict")
    if wrong:
        raise CheckpointError(f"{path}: training state is damaged: {'; '.join(wrong)}")


def load_train_state(output_dir: str | Path, stage: str) -> TrainState:
    """The state to resume from; refuses another stage's run (the config is compared by the caller).

    Raises:
        InputError: no state, or one of another stage.
        CheckpointError: an unreadable state file, or one lacking entries (each named).
    """
    path = state_path(output_dir)
    if not path.is_file():
        raise InputError(f"--resume: {output_dir} holds no training state ({path} is missing)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a maisi training state")
    _check_fields(raw, path)
    if raw["stage"] != stage:
        raise InputError(f"--resume: {output_dir} holds a '{raw['stage']}' run, not '{stage}'")
    fields = {k: raw[k] for k in TrainState.__dataclass_fields__ if k in raw}
    return TrainState(**fields)


def check_restorable(
    state: TrainState, model: torch.nn.Module, stage_state: dict[str, Any], path: Path
) -> None:
    """The state fits the networks built now (checked before anything is written).

    Raises:
        CheckpointError: naming the missing, unexpected or reshaped weights and the missing entries.
    """
    now = model.state_dict()
    problems = []
    missing = sorted(set(now) - set(state.model))
    unexpected = sorted(set(state.model) - set(now))
    reshaped = [
        k
        for k in sorted(set(now) & set(state.model))
        if getattr(state.model[k], "shape", None) != now[k].shape
    ]
    for what, keys in (
        ("lacks weights", missing),
        ("has unexpected weights", unexpected),
        ("has weights of another shape", reshaped),
    ):
        if keys:
            more = " ..." if len(keys) > 5 else ""
            problems.append(f"model {what}: {', '.join(keys[:5])}{more} ({len(keys)})")
    for what, needed, saved in (
        ("optimizer", ("state", "param_groups"), state.optimizer),
        ("stage_state", tuple(stage_state), state.stage_state),
    ):
        lacking = [k for k in needed if k not in saved]
        if lacking:
            problems.append(f"{what} lacks {', '.join(lacking)}")
    if problems:
        raise CheckpointError(
            f"{path}: training state does not fit the {state.stage} networks: " + "; ".join(problems)
        )


def read_run_record(output_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``train_config.json`` ({stage, config_sha256, config}), None when there is none.

    Raises:
        InputError: the file exists but is not such a record.
    """
    marker = Path(output_dir) / "train_config.json"
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        problem = f"{marker}: unreadable run record ({e}); restore it or choose another output_dir"
        raise InputError(problem) from None
    expected = (("stage", str), ("config_sha256", str), ("config", dict))
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in expected):
        raise InputError(
            f"{marker}: not a maisi run record (stage, config_sha256, config); restore it or "
            "choose another output_dir"
        )
    return record
