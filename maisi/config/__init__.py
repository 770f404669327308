"""Configs: JSON files validated by JSON Schema (package data), returned as frozen dataclasses."""

from __future__ import annotations

from maisi.config.infer_config import InferConfig, check_infer_config
from maisi.config.loader import ConfigKind, load_config, load_schema, register_kind, to_jsonable
from maisi.errors import ConfigError

register_kind("infer", ConfigKind(schema="infer", dataclass=InferConfig, check=check_infer_config))

__all__ = ["ConfigError", "InferConfig", "load_config", "load_schema", "to_jsonable"]
