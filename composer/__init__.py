"""composer: declarative transformers. A YAML description in, a PyTorch model out.

from composer import load_config, compose
cfg = load_config(["model=llama3_8b", "model.num_layers=4"])
model = compose(cfg.model)
out = model(input_ids)            # out.logits [B, T, vocab]
"""

from __future__ import annotations

from . import registry
from .config import conf_dir, load_config
from .errors import (
    CheckpointError,
    ComposerError,
    ConfigError,
    DataError,
    IncompatibleVersion,
    InvalidParameter,
    MissingParameter,
    ModelError,
)
from .model import ComposedModel, ModelBuilder, ModelOutput, compose
from .schema import ModelConfig, resolve_model_config

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ComposedModel",
    "ComposerError",
    "ConfigError",
    "DataError",
    "IncompatibleVersion",
    "InvalidParameter",
    "MissingParameter",
    "ModelBuilder",
    "ModelConfig",
    "ModelError",
    "ModelOutput",
    "compose",
    "conf_dir",
    "load_config",
    "registry",
    "resolve_model_config",
]
