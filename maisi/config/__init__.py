"""Configs: JSON files validated by JSON Schema (package data), returned as frozen dataclasses."""

from __future__ import annotations

from maisi.config.encode_config import EncodeConfig, check_encode_config
from maisi.config.evaluate_config import EvaluateConfig, check_evaluate_config
from maisi.config.infer_config import InferConfig, check_infer_config
from maisi.config.train_config import TrainConfig, check_train_config
from maisi.config.loader import ConfigKind, load_config, load_schema, register_kind, to_jsonable
from maisi.errors import ConfigError

register_kind("infer", ConfigKind(schema="infer", dataclass=InferConfig, check=check_infer_config))
register_kind("train", ConfigKind(schema="train", dataclass=TrainConfig, check=check_train_config))
register_kind("encode", ConfigKind(schema="encode", dataclass=EncodeConfig, check=check_encode_config))
register_kind("evaluate", ConfigKind(schema="evaluate", dataclass=EvaluateConfig, check=check_evaluate_config))

__all__ = ["ConfigError", "EncodeConfig", "EvaluateConfig", "InferConfig", "TrainConfig", "load_config", "load_schema", "to_jsonable"]
