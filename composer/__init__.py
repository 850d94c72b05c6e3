"""composer: declarative transformers. A YAML description in, a PyTorch model out.

    from composer import load_config, compose
    cfg = load_config(["model=llama3_8b", "model.num_layers=4"])
    model = compose(cfg.model)
    out = model(input_ids)            # out.logits [B, T, vocab]

The public names below are imported on first use (PEP 562), so importing a low layer of the package
(``composer.contract``, ``composer.errors``) or a component module does not import the model, Hydra
or Lightning.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import Any

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

__version__ = "0.1.0"


def _warn_if_mosaicml() -> None:
    """MosaicML Composer owns the import name ``composer`` too: in one environment their files mix."""
    try:
        other = importlib.metadata.distribution("mosaicml")
    except importlib.metadata.PackageNotFoundError:
        return
    warnings.warn(
        f"MosaicML Composer (mosaicml {other.version}) is installed in this environment and uses the import "
        "name 'composer' too; the two packages overwrite each other. Use a separate virtual environment for "
        "transformer-composer, or `pip uninstall mosaicml` (then reinstall transformer-composer)",
        stacklevel=3,
    )


_warn_if_mosaicml()

_LAZY = {  # public name -> the module that defines it
    "ComposedModel": "model",
    "ModelBuilder": "model",
    "ModelOutput": "model",
    "compose": "model",
    "ModelConfig": "schema",
    "resolve_model_config": "schema",
    "conf_dir": "config",
    "load_config": "config",
}
_MODULES = ("registry", "generation", "weights", "checkpoint", "plan", "hf", "schema", "model", "config")

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'composer' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_MODULES})
