"""Data modules for training: ``recall`` (synthetic, the default), ``text``, ``tokens``, ``classification``.

    dm = build_datamodule(cfg.data, seed=cfg.seed, model_max_positions=256)
    dm.setup("fit")                        # builds the tokenizer / data; cheap to call again
    dm.vocab_size, dm.tokenizer, dm.task, dm.num_classes, dm.metric, dm.seq_len, dm.batch_size
    batch = next(iter(dm.train_dataloader()))   # {"input_ids": [B, T], "labels": [B, T] or [B], ...}

Each config in conf/data/ has a ``name`` the factory dispatches on; every other key is a keyword
argument of the data module class (see their docstrings for meanings and defaults).

The data module classes (and with them torch and Lightning) are imported on first use, so tools
that only read or write files (``composer-prepare``) start quickly.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, Optional

from ..config import to_container
from ..contract.options import IGNORE_INDEX, did_you_mean
from ..errors import ConfigError, Problem

# data=<name> -> (module, class)
DATAMODULES: dict[str, tuple[str, str]] = {
    "recall": ("recall", "RecallDataModule"),
    "text": ("text", "TextDataModule"),
    "tokens": ("tokens", "TokensDataModule"),
    "classification": ("classification", "ClassificationDataModule"),
}
_LAZY = {cls: module for module, cls in DATAMODULES.values()} | {"DataModule": "common"}
_NOT_CONFIG = {"self", "seed", "model_max_positions"}  # arguments given by the trainer, not data.*


def __getattr__(name: str) -> Any:  # the classes, imported on first use
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def datamodule_class(name: str) -> type:
    """The class behind ``data=<name>``."""
    module, cls = DATAMODULES[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def options(name: str) -> dict[str, Any]:
    """The config keys of data module ``name`` with their defaults (``inspect.Parameter.empty``: required)."""
    params = inspect.signature(datamodule_class(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k not in _NOT_CONFIG}


def build_datamodule(cfg_data: Any, *, seed: int, model_max_positions: Optional[int] = None) -> Any:
    """The data module (a LightningDataModule) that ``cfg_data`` (the ``data`` config node or a dict) describes.

    Raises ConfigError for an unknown ``name`` or key (naming ``data.<key>`` and the closest match),
    DataError for unusable data (missing or empty path, ``seq_len`` over ``model_max_positions``).
    """
    raw = _plain(cfg_data)
    name = raw.pop("name", None)
    if name not in DATAMODULES:
        raise ConfigError(
            [Problem("data.name", f"unknown data module {name!r}", f"use data=<one of {', '.join(DATAMODULES)}>")]
        )
    known = options(name)
    problems = []
    for key in raw:
        if key not in known:
            hint = did_you_mean(key, known)
            problems.append(
                Problem(f"data.{key}", f"not an option of data={name}", f"{hint}options: {', '.join(known)}")
            )
    if problems:
        raise ConfigError.of(problems)
    return datamodule_class(name)(seed=seed, model_max_positions=model_max_positions, **raw)


def _plain(cfg: Any) -> dict[str, Any]:
    given = type(cfg).__name__
    cfg = to_container(cfg)
    if not isinstance(cfg, Mapping):
        raise ConfigError(
            [
                Problem(
                    "data",
                    f"expected a mapping, got {given}",
                    "select a data config: data=recall | text | tokens | classification",
                )
            ]
        )
    return dict(cfg)


__all__ = [  # noqa: F822  (the classes resolve through __getattr__)
    "DATAMODULES",
    "IGNORE_INDEX",
    "ClassificationDataModule",
    "DataModule",
    "RecallDataModule",
    "TextDataModule",
    "TokensDataModule",
    "build_datamodule",
    "datamodule_class",
    "options",
]
