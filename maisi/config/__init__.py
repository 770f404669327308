"""Configs: JSON files validated by JSON Schema (package data), returned as frozen dataclasses.

Pure: importing this package imports neither torch nor MONAI (``--help`` of every CLI stays fast).
"""

from __future__ import annotations

from maisi.config.encode_config import EncodeConfig
from maisi.config.evaluate_config import EvaluateConfig
from maisi.config.infer_config import InferConfig
from maisi.config.loader import load_config
from maisi.config.schema import load_schema, to_jsonable
from maisi.config.train_config import TrainConfig
from maisi.errors import ConfigError

__all__ = [
    "ConfigError",
    "EncodeConfig",
    "EvaluateConfig",
    "InferConfig",
    "TrainConfig",
    "load_config",
    "load_schema",
    "to_jsonable",
]
