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
    """Write the state (with the RNG states, for the record) under a temporary name, then rename."""
    payload = {"format": FORMAT, **asdict(state), "rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        payload["rng_cuda"] = torch.cuda.get_rng_state_all()
    path = state_path(output_dir)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_train_state(output_dir: str | Path, stage: str) -> TrainState:
    """The state to resume from; refuses another stage's run (the config is compared by the caller).

    Raises:
        InputError: no state, or one of another stage.
        CheckpointError: an unreadable state file.
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
    if raw["stage"] != stage:
        raise InputError(f"--resume: {output_dir} holds a '{raw['stage']}' run, not '{stage}'")
    fields = {k: raw[k] for k in TrainState.__dataclass_fields__ if k in raw}
    return TrainState(**fields)


def check_fresh_output(output_dir: str | Path) -> None:
    """A new run must not write into another run's folder."""
    folder = Path(output_dir)
    marker = folder / "train_config.json"
    if state_path(folder).exists() or marker.exists():
        what = json.loads(marker.read_text()).get("stage", "a") if marker.exists() else "a"
        raise InputError(f"output directory {folder} holds {what} run already; pass --resume to continue it or "
                         "choose another output_dir")  # fmt: skip
