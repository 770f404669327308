"""The config kinds: for each, its schema, its dataclass and its cross-key checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from maisi.config.encode_config import EncodeConfig, check_encode_config
from maisi.config.evaluate_config import EvaluateConfig, check_evaluate_config
from maisi.config.infer_config import InferConfig, check_infer_config
from maisi.config.train_config import TrainConfig, check_train_config


@dataclass(frozen=True)
class ConfigKind:
    """What a config kind needs: its schema name, its dataclass and its cross-key checks."""

    schema: str
    dataclass: type
    check: Callable[[Any], list[str]]


KINDS: dict[str, ConfigKind] = {
    "infer": ConfigKind(schema="infer", dataclass=InferConfig, check=check_infer_config),
    "train": ConfigKind(schema="train", dataclass=TrainConfig, check=check_train_config),
    "encode": ConfigKind(schema="encode", dataclass=EncodeConfig, check=check_encode_config),
    "evaluate": ConfigKind(schema="evaluate", dataclass=EvaluateConfig, check=check_evaluate_config),
}
