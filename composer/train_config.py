"""Validation of a training config, before anything is built or read.

    check_config(cfg)                                  # every problem that needs no data (one ConfigError)
    check_job(cfg)                                     # ... and the model config (composer-train's pre-check)
    model_cfg = init_from_config(saved.config, cfg.model, user_keys, "runs/x/model")   # init_from=...
    model_cfg = fit_model_to_data(model_cfg, data, cfg.data, user_keys)                 # after data.setup

``check_config`` covers the trainer, optimizer, schedule, callbacks and logger groups, the seed,
``compile``, ``ckpt_path``, ``init_from`` and ``optimized_metric``; the model config is checked
when it is resolved (:func:`composer.schema.resolve_model_config`), and against the data by
:func:`fit_model_to_data`.
"""

from __future__ import annotations

import copy
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import to_container
from .contract.options import is_int
from .errors import ConfigError, Problem
from .model import ComposedModel, compose
from .optim import check_optim, check_scheduler
from .schema import ModelConfig, resolve_model_config
from .training import check_callbacks, check_logger, check_precision_for_device, check_trainer
from .weights import unique_state

# metrics.json values a sweeper can optimise (optimized_metric=...)
SWEEP_METRICS = ("best_val_loss", "val_loss", "val_ppl", "best_val_accuracy", "val_accuracy", "tokens_per_s", "wall_s")


def overridden_model_keys(overrides: Sequence[str]) -> set[str]:
    """Model options the user set on the command line: ``model.vocab_size=...`` -> "vocab_size"."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            keys.add(key[len("model.") :])
    return keys


def plain_config(cfg: Any) -> dict:
    """``cfg`` as plain Python data with every interpolation resolved (ConfigError if one fails)."""
    try:
        return to_container(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(
            [Problem(str(key), str(exc).splitlines()[0], "fix the value or the ${...} reference")]
        ) from None


def check_config(cfg: Any) -> dict:
    """Every problem of the training config that needs no data (ConfigError listing them all).
    Returns the config as plain data (:func:`plain_config`)."""
    cfg = plain_config(cfg)
    problems: list[Problem] = []
    problems += check_trainer(cfg["trainer"]) + check_precision_for_device(cfg["trainer"])
    problems += check_optim(cfg["optim"]) + check_scheduler(cfg["scheduler"], cfg["optim"].get("lr"))
    problems += check_callbacks(cfg["callbacks"]) + check_logger(cfg["logger"])
    if not is_int(cfg.get("seed")):
        problems.append(Problem("seed", f"{cfg.get('seed')!r} must be an integer", "e.g. seed=0"))
    if not isinstance(cfg.get("compile", False), (bool, dict)):
        problems.append(
            Problem(
                "compile",
                f"{cfg['compile']!r} must be true, false or a mapping of torch.compile arguments",
                "compile=true or compile='{mode: max-autotune}'",
            )
        )
    problems += _check_paths(cfg)
    if cfg.get("optimized_metric", "best_val_loss") not in SWEEP_METRICS:
        problems.append(
            Problem(
                "optimized_metric",
                f"{cfg['optimized_metric']!r} is not a metrics.json value a sweeper can optimise",
                f"use one of {', '.join(SWEEP_METRICS)}",
            )
        )
    if problems:
        raise ConfigError.of(problems)
    return cfg


def check_job(cfg: Any) -> dict:
    """What a run checks before it reads any data, all problems in one ConfigError: the training
    config (:func:`check_config`) and the model config (resolved as the run resolves it; with
    ``init_from`` the model comes from the saved folder, checked when the run loads it). Returns
    the config as plain data."""
    plain = plain_config(cfg)
    problems: list[Problem] = []
    try:
        check_config(plain)
    except ConfigError as exc:
        problems += exc.problems
    if plain.get("init_from") is None:
        try:
            resolve_model_config(plain["model"])
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError.of(problems)
    return plain


def _check_paths(cfg: Mapping[str, Any]) -> list[Problem]:
    """``ckpt_path`` (a readable checkpoint) and ``init_from`` (an existing folder; not with ckpt_path)."""
    problems = []
    if cfg.get("ckpt_path") is not None:
        path = Path(str(cfg["ckpt_path"]))
        if not path.is_file():
            problems.append(
                Problem(
                    "ckpt_path",
                    f"{path} is not a file",
                    "pass a Lightning checkpoint, e.g. outputs/<date>/<time>/checkpoints/last.ckpt",
                )
            )
        elif not zipfile.is_zipfile(path):
            problems.append(
                Problem(
                    "ckpt_path",
                    f"{path} is not a PyTorch checkpoint (truncated or corrupt?)",
                    "use another checkpoint, e.g. checkpoints/last.ckpt or a best-*.ckpt",
                )
            )
    if cfg.get("init_from") is not None and not Path(str(cfg["init_from"])).exists():
        problems.append(
            Problem(
                "init_from",
                f"{cfg['init_from']} does not exist",
                "pass a folder written by save_pretrained (e.g. outputs/<date>/<time>/model)",
            )
        )
    if cfg.get("init_from") is not None and cfg.get("ckpt_path") is not None:
        problems.append(
            Problem(
                "init_from",
                "is given together with ckpt_path",
                "use ckpt_path to resume a run, or init_from to start a new run from saved weights",
            )
        )
    return problems


# ----------------------------------------------------------------------------- the model against the data
def fit_model_to_data(
    model_cfg: ModelConfig, data: Any, data_cfg: Mapping[str, Any], user_keys: set[str], source: str = ""
) -> ModelConfig:
    """The model config adapted to the data: vocab_size follows the tokenizer unless the user set
    it (then it must be large enough); a classification task needs a classification head, whose
    num_classes comes from the data. ``source`` is "init_from" when the config was loaded.
    Returns ``model_cfg`` itself when the data changes nothing, else a re-validated copy."""
    problems: list[Problem] = []
    changes: dict[str, Any] = {}
    vocab_key = "data.tokenizer" if "tokenizer" in data_cfg else "data.vocab_size"
    vocab_src = f"{vocab_key}={data_cfg.get(vocab_key.split('.')[1])}"
    if "vocab_size" in user_keys or source:
        if model_cfg.vocab_size < data.vocab_size:
            where = "model.vocab_size" if "vocab_size" in user_keys else f"model.vocab_size (of init_from={source})"
            problems.append(
                Problem(
                    where,
                    f"{model_cfg.vocab_size} is smaller than the data's vocabulary of "
                    f"{data.vocab_size} tokens ({vocab_src})",
                    f"drop the model.vocab_size override (it follows the data) or use at least {data.vocab_size}"
                    if not source
                    else "train on data with the tokenizer saved in init_from, or start without init_from",
                )
            )
    elif model_cfg.vocab_size != data.vocab_size:
        changes["vocab_size"] = data.vocab_size
    kind = model_cfg.head.type
    if data.task == "classification":
        if kind != "classification":
            problems.append(
                Problem(
                    "model.head",
                    f"is {kind!r} but data={data.name} is a classification task",
                    "add model/head=classification (or use model=bert_tiny)",
                )
            )
        else:
            given = model_cfg.head.num_classes
            if ("head.num_classes" in user_keys or source) and given != data.num_classes:
                problems.append(
                    Problem(
                        "model.head.num_classes",
                        f"{given} but the data has {data.num_classes} classes",
                        "drop the override (it follows the data)",
                    )
                )
            elif given != data.num_classes:
                changes["head"] = {**model_cfg.to_dict()["head"], "num_classes": data.num_classes}
    elif kind == "classification":
        problems.append(
            Problem(
                "model.head",
                f"is 'classification' but data={data.name} is language modelling",
                "use model/head=lm, or classification data (a JSONL file of text and label)",
            )
        )
    if problems:
        raise ConfigError.of(problems)
    return model_cfg.replace(**changes) if changes else model_cfg


# ----------------------------------------------------------------------------- init_from
def init_from_config(saved: ModelConfig, cfg_model: Any, user_keys: set[str], source: str) -> ModelConfig:
    """The saved model's config with the user's ``model.*`` overrides applied; ConfigError naming
    each override that would change a weight's shape.

    The saved and the merged config are built once each, on the meta device; only when their
    shapes differ (or the merged config is invalid) is each override tried on its own, to name it.
    """
    if not user_keys:
        return saved
    values = {key: to_container(OmegaConf.select(cfg_model, key)) for key in sorted(user_keys)}
    base = saved.to_dict()
    want = _shapes(compose(saved, device="meta"))
    merged: Optional[ComposedModel] = None
    failure: Optional[ConfigError] = None
    try:
        merged = compose(_with_values(base, values), device="meta")
    except ConfigError as exc:
        failure = exc
    changed = _changed(want, _shapes(merged)) if merged is not None else []
    if merged is not None and not changed:
        return merged.config
    problems = _culprits(base, values, want, source)  # the error path: which override is it?
    if problems:
        raise ConfigError.of(problems)
    if failure is not None:  # the overrides are invalid only together
        raise failure
    together = ", ".join(f"model.{k}" for k in values)  # they change a shape only together
    raise ConfigError.of([_shape_problem(together, changed, source, together=True)])


def _culprits(base: dict, values: dict[str, Any], want: dict[str, tuple], source: str) -> list[Problem]:
    """The problems of each override applied alone to the saved config (invalid, or a shape changed)."""
    problems: list[Problem] = []
    for key, value in values.items():
        try:
            got = _shapes(compose(_with_values(base, {key: value}), device="meta"))
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        changed = _changed(want, got)
        if changed:
            problems.append(_shape_problem(f"model.{key}", changed, source))
    return problems


def _shape_problem(path: str, changed: list[str], source: str, together: bool = False) -> Problem:
    return Problem(
        path,
        f"{'together change' if together else 'changes'} the shape of {', '.join(changed[:4])}"
        f"{' ...' if len(changed) > 4 else ''} of the model in init_from={source}",
        f"drop {'one of these overrides' if together else 'this override'} (init_from keeps the saved "
        "architecture) or train from scratch without init_from",
    )


def _shapes(model: ComposedModel) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in unique_state(model).items()}


def _changed(want: dict[str, tuple], got: dict[str, tuple]) -> list[str]:
    return sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))


def _with_values(base: dict, values: dict[str, Any]) -> dict:
    """A copy of ``base`` with each dotted key of ``values`` set (a component named by its type
    alone, ``attention: gqa``, becomes ``{type: gqa}`` to take a nested key)."""
    data = copy.deepcopy(base)
    for dotted, value in values.items():
        keys = dotted.split(".")
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {"type": node[k]} if isinstance(node.get(k), str) else {}
            node = node[k]
        node[keys[-1]] = value
    return data


__all__ = [
    "SWEEP_METRICS",
    "check_config",
    "check_job",
    "fit_model_to_data",
    "init_from_config",
    "overridden_model_keys",
    "plain_config",
]
