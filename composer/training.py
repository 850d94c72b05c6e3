"""From a validated training config to a Lightning Trainer: strategy, callbacks, loggers.

    problems = check_trainer(cfg.trainer) + check_callbacks(cfg.callbacks) + check_logger(cfg.logger)
    trainer, parts = build_trainer(cfg, run_dir, model, data)

``trainer.val_check_interval`` counts optimizer steps (like ``max_steps``); it is handed to
Lightning in batches (x ``accumulate_grad_batches``). ``trainer=fsdp`` wraps each block class of
the model in its own FSDP unit and, with ``strategy_options.activation_checkpointing``,
recomputes whole blocks through the strategy (the model's own checkpointing is then switched off).
Any other Lightning ``Trainer`` argument may be added as ``+trainer.<name>=...``.
"""

from __future__ import annotations

import csv
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .callbacks import (
    ComposerProgressBar,
    ComposerTQDMProgressBar,
    LearningRate,
    MoEBalance,
    NanGuard,
    PlainProgress,
    SampleText,
    Throughput,
    ValidateAtEnd,
)
from .checkpoint_io import AtomicCheckpointIO, RunCheckpoint
from .config import to_container
from .contract.options import did_you_mean, is_int, is_number
from .errors import ConfigError, Problem
from .model import ComposedModel
from .weights import atomic_path

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")  # 16-true: AdamW state underflows in float16
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# keys of conf/trainer/*.yaml that are not Trainer arguments
OWN_KEYS = {"strategy_options", "cpu_threads"}
# Trainer arguments composer sets itself (from other config groups)
RESERVED = {
    "callbacks": "callbacks.*",
    "logger": "logger.*",
    "plugins": "(set by composer)",
    "default_root_dir": "the Hydra run dir (hydra.run.dir)",
    "enable_checkpointing": "callbacks.checkpoint",
    "check_val_every_n_epoch": "trainer.val_check_interval",
    "max_epochs": "trainer.max_steps",
    "enable_progress_bar": "callbacks.progress_bar",
}
PROGRESS_BARS = ("auto", "rich", "tqdm", "plain", "none")  # auto: rich on a terminal, plain lines otherwise
# the fix of a trainer step count that is not an integer >= 1 (others: "use an integer >= 1")
STEP_FIXES = {
    "val_check_interval": "validate every N optimizer steps, e.g. trainer.val_check_interval=100",
    "max_steps": "train for N optimizer steps, e.g. trainer.max_steps=1000",
}


def check_trainer(t: Mapping[str, Any]) -> list[Problem]:
    """Every problem of the ``trainer`` config."""
    return _trainer_keys(t) + _trainer_choices(t) + _trainer_numbers(t)


def _trainer_keys(t: Mapping[str, Any]) -> list[Problem]:
    """Keys composer sets itself, and keys that are not Trainer arguments."""
    problems: list[Problem] = []
    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in t:
        if key in RESERVED:
            problems.append(Problem(f"trainer.{key}", "is set by composer", f"use {RESERVED[key]} instead"))
        elif key not in allowed and key not in OWN_KEYS:
            problems.append(
                Problem(
                    f"trainer.{key}",
                    "is not a Lightning Trainer argument",
                    f"{did_you_mean(key, sorted(allowed | OWN_KEYS))}"
                    "see https://lightning.ai/docs/pytorch/stable/common/trainer.html",
                )
            )
    return problems


def _trainer_choices(t: Mapping[str, Any]) -> list[Problem]:
    """``precision``, ``accelerator`` and ``strategy``: one of the known names."""
    problems: list[Problem] = []
    if t.get("precision") not in PRECISIONS:
        problems.append(
            Problem(
                "trainer.precision", f"{t.get('precision')!r} is not a precision", f"use one of {', '.join(PRECISIONS)}"
            )
        )
    if t.get("accelerator", "auto") not in ACCELERATORS:
        problems.append(
            Problem(
                "trainer.accelerator",
                f"{t.get('accelerator')!r} is not an accelerator",
                f"use one of {', '.join(ACCELERATORS)}",
            )
        )
    strategy = t.get("strategy", "auto")
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    if strategy not in strategies:
        problems.append(
            Problem(
                "trainer.strategy",
                f"{strategy!r} is not a Lightning strategy",
                did_you_mean(strategy, strategies) + "use trainer=ddp, trainer=fsdp "
                "or one of: auto, ddp, ddp_spawn, fsdp, deepspeed",
            )
        )
    return problems


def _trainer_numbers(t: Mapping[str, Any]) -> list[Problem]:
    """Device and step counts, clipping, validation batches, CPU threads, strategy options."""
    problems: list[Problem] = []
    devices = t.get("devices", 1)
    count_ok = is_int(devices) and (devices >= 1 or devices == -1)
    if not (count_ok or isinstance(devices, (list, str))):
        problems.append(
            Problem(
                "trainer.devices",
                f"{devices!r} is not a device count",
                "use a number >= 1, -1 (all), 'auto' or a list of GPU ids",
            )
        )
    for key in ("max_steps", "val_check_interval", "accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
        value = t.get(key, 1)
        if not is_int(value) or value < 1:
            problems.append(
                Problem(
                    f"trainer.{key}", f"{value!r} must be an integer >= 1", STEP_FIXES.get(key, "use an integer >= 1")
                )
            )
    clip = t.get("gradient_clip_val")
    if clip is not None and (not is_number(clip) or clip < 0):
        problems.append(
            Problem(
                "trainer.gradient_clip_val",
                f"{clip!r} must be a number >= 0 or null",
                "e.g. trainer.gradient_clip_val=1.0 (null: no clipping)",
            )
        )
    limit = t.get("limit_val_batches")
    if limit is not None and (not is_number(limit) or limit < 0):
        problems.append(
            Problem(
                "trainer.limit_val_batches",
                f"{limit!r} must be a number >= 0 or null",
                "an integer: that many batches; a float <= 1: that fraction; null: all",
            )
        )
    threads = t.get("cpu_threads", "auto")
    if threads not in ("auto", None) and (not is_int(threads) or threads < 1):
        problems.append(
            Problem(
                "trainer.cpu_threads",
                f"{threads!r} must be auto, null or an integer >= 1",
                "auto: one thread per idle core; null: torch's default",
            )
        )
    opts = t.get("strategy_options") or {}
    if not isinstance(opts, Mapping):
        problems.append(
            Problem(
                "trainer.strategy_options",
                f"{opts!r} must be a mapping",
                "e.g. trainer.strategy_options={find_unused_parameters: false}",
            )
        )
    return problems


def check_callbacks(c: Mapping[str, Any]) -> list[Problem]:
    """Every problem of the ``callbacks`` config."""
    return _check_progress(c) + _check_checkpoint(c.get("checkpoint") or {}) + _check_early_stopping(c)


def _check_progress(c: Mapping[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    bar = c.get("progress_bar", "auto")
    if bar not in PROGRESS_BARS:
        problems.append(
            Problem(
                "callbacks.progress_bar", f"{bar!r} is not a progress bar", f"use one of {', '.join(PROGRESS_BARS)}"
            )
        )
    interval = c.get("progress_every_s", 30)
    if not is_number(interval) or interval < 0:
        problems.append(
            Problem(
                "callbacks.progress_every_s",
                f"{interval!r} must be a number of seconds >= 0",
                "e.g. 30: a plain progress line at most every 30 s (0: at every log interval)",
            )
        )
    return problems


def _check_checkpoint(ckpt: Mapping[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    every = ckpt.get("every_n_train_steps")
    if every is not None and (not is_int(every) or every < 1):
        problems.append(
            Problem(
                "callbacks.checkpoint.every_n_train_steps",
                f"{every!r} must be an integer >= 1 or null",
                "null saves after each validation only",
            )
        )
    top_k = ckpt.get("save_top_k", 1)
    if not is_int(top_k) or top_k < -1:
        problems.append(
            Problem(
                "callbacks.checkpoint.save_top_k",
                f"{top_k!r} must be an integer >= -1",
                "1 keeps the best checkpoint, -1 keeps all, 0 none",
            )
        )
    return problems


def _check_early_stopping(c: Mapping[str, Any]) -> list[Problem]:
    early = c.get("early_stopping")
    if early is None:
        return []
    if not isinstance(early, Mapping):
        return [
            Problem(
                "callbacks.early_stopping",
                f"{early!r} must be a mapping or null",
                "e.g. callbacks.early_stopping={patience: 3}",
            )
        ]
    if not is_int(early.get("patience", 3)) or early.get("patience", 3) < 1:
        return [
            Problem(
                "callbacks.early_stopping.patience",
                f"{early.get('patience')!r} must be an integer >= 1",
                "validations without improvement before stopping, e.g. 3",
            )
        ]
    return []


def check_logger(lg: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for key in lg:
        if key != "tensorboard":
            problems.append(
                Problem(
                    f"logger.{key}",
                    "is not a logger option (CSV is always written)",
                    "use logger=csv or logger=tensorboard",
                )
            )
    if lg.get("tensorboard") and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        problems.append(
            Problem(
                "logger.tensorboard",
                "needs the tensorboard package",
                "pip install 'transformer-composer[tensorboard]' or use logger=csv",
            )
        )
    return problems


def check_precision_for_device(t: Mapping[str, Any]) -> list[Problem]:
    """What the CPU cannot do: float16 AMP (Lightning would silently switch to bf16-mixed) and FSDP."""
    accelerator = t.get("accelerator", "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    problems = []
    if on_cpu and t.get("precision") == "16-mixed":
        problems.append(
            Problem(
                "trainer.precision",
                "16-mixed (float16 autocast with a gradient scaler) needs a CUDA GPU",
                "use trainer.precision=bf16-mixed (or bf16-true) on CPUs",
            )
        )
    if on_cpu and str(t.get("strategy", "")).startswith("fsdp"):
        problems.append(
            Problem(
                "trainer.strategy",
                "fsdp (Lightning's FSDPStrategy) needs CUDA GPUs",
                "use trainer=ddp (gloo) on CPUs, or run on GPUs",
            )
        )
    return problems


def cpu_threads(setting: Any, accelerator: str = "auto") -> Optional[int]:
    """The intra-op thread count for a CPU run (None: leave torch's default; accelerators: None).

    ``auto``: one thread per idle core (cores minus the 1-minute load average, at least 1).
    Busy cores make extra OpenMP threads wait on each other: on a loaded 2-core machine a small
    model trains several times slower with 2 threads than with 1.
    """
    if accelerator not in ("cpu", "auto") or (accelerator == "auto" and torch.cuda.is_available()):
        return None
    if setting is None:
        return None
    cores = os.cpu_count() or 1
    if setting == "auto":
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this platform
            return None
        return max(1, min(cores, round(cores - load)))
    return int(setting)


def progress_bar(c: Mapping[str, Any]) -> str:
    """``callbacks.progress_bar`` with ``auto`` decided: rich on a terminal, plain lines otherwise."""
    bar = c.get("progress_bar", "auto")
    if bar == "auto":
        return "rich" if sys.stdout.isatty() else "plain"
    return bar


@dataclass
class TrainerParts:
    """What ``build_trainer`` made besides the Trainer, for the run summary."""

    throughput: Throughput
    checkpoint: Optional[ModelCheckpoint] = None
    sample: Optional[SampleText] = None
    loggers: list[Logger] = field(default_factory=list)


def block_classes(model: ComposedModel) -> set[type]:
    """The classes of the model's blocks (FSDP wrap units / activation-checkpointing units)."""
    return {type(layer) for layer in model.layers}


def build_strategy(t: Mapping[str, Any], model: ComposedModel) -> Any:
    """``trainer.strategy`` as Lightning understands it (a name, or a configured Strategy)."""
    name = t.get("strategy", "auto")
    opts = dict(t.get("strategy_options") or {})
    if name == "fsdp":
        blocks = block_classes(model)
        if opts.pop("activation_checkpointing", False):
            model.set_gradient_checkpointing("none")  # the strategy recomputes whole blocks instead
            opts["activation_checkpointing_policy"] = blocks
        return FSDPStrategy(auto_wrap_policy=blocks, **opts)
    if name.startswith("ddp") and opts:
        start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}.get(name, "popen")
        return DDPStrategy(start_method=start, **opts)
    return name


class _KeepingWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, but a resumed run keeps the rows of the steps before its
    checkpoint (Lightning's deletes an existing metrics.csv) and drops the later ones (logged after
    the checkpoint by the interrupted run: they are trained again)."""

    def __init__(self, log_dir: str, before_step: int):
        self.before_step = before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), [r for r in reader if _csv_step(r) < self.before_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)  # the new rows extend this header


def _csv_step(row: Mapping[str, Any]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class ResumedCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``metrics.csv`` on after the rows of a resumed run's first ``before_step``
    steps (Lightning's CSV ``step`` is the 0-based index of the step's batch)."""

    def __init__(self, *args: Any, before_step: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.before_step = before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self.before_step)
        return self._experiment


def build_loggers(lg: Mapping[str, Any], run_dir: Path, resume_step: Optional[int] = None) -> list[Logger]:
    """CSV (``run_dir/metrics.csv``, always) and TensorBoard (``run_dir/tensorboard``). ``resume_step``:
    the step of the checkpoint a run resumes in its own folder (metrics.csv keeps the rows before it)."""
    csv_logger = (
        CSVLogger(save_dir=str(run_dir), name="", version="")
        if resume_step is None
        else ResumedCSVLogger(save_dir=str(run_dir), name="", version="", before_step=resume_step)
    )
    loggers: list[Logger] = [csv_logger]
    if lg.get("tensorboard"):
        loggers.append(
            TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
        )
    return loggers


def build_callbacks(
    c: Mapping[str, Any], run_dir: Path, data: Any, flops_per_token: Optional[float], precision: str
) -> tuple[list[Callback], TrainerParts]:
    parts = TrainerParts(throughput=Throughput(flops_per_token, precision))
    callbacks: list[Callback] = [ValidateAtEnd(), parts.throughput]
    if c.get("nan_guard", True):
        callbacks.append(NanGuard())
    if c.get("lr_monitor", True):
        callbacks.append(LearningRate())
    callbacks.append(MoEBalance(run_dir / "expert_load.jsonl"))  # no-op without MoE layers
    bar = progress_bar(c)
    if bar == "rich":
        callbacks.append(ComposerProgressBar(leave=True))
    elif bar == "tqdm":
        callbacks.append(ComposerTQDMProgressBar())
    # plain lines: on stdout when they are the progress display, in train.log always
    callbacks.append(PlainProgress(float(c.get("progress_every_s", 30)), to_console=bar == "plain"))
    early = c.get("early_stopping")
    if early:
        callbacks.append(
            EarlyStopping(
                monitor="val_loss",
                mode="min",
                patience=int(early.get("patience", 3)),
                min_delta=float(early.get("min_delta", 0.0)),
                check_on_train_epoch_end=False,
                check_finite=True,
            )
        )
    sample = c.get("sample_text") or {}
    if sample.get("enabled", True) and data.tokenizer is not None and data.task == "lm" and data.metric is None:
        parts.sample = SampleText(
            data.tokenizer,
            prompt=sample.get("prompt") or "",
            max_new_tokens=int(sample.get("max_new_tokens", 64)),
            every_n_validations=int(sample.get("every_n_validations", 1)),
            temperature=float(sample.get("temperature", 0.8)),
            top_k=sample.get("top_k", 40),
        )
        callbacks.append(parts.sample)
    ckpt = c.get("checkpoint") or {}
    if ckpt.get("enabled", True):
        parts.checkpoint = RunCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="best-step{step}-val_loss{val_loss:.4f}",
            auto_insert_metric_name=False,
            monitor="val_loss",
            mode="min",
            save_top_k=int(ckpt.get("save_top_k", 1)),
            save_last=bool(ckpt.get("save_last", True)),
            every_n_train_steps=ckpt.get("every_n_train_steps"),
            save_on_train_epoch_end=False,
        )
        callbacks.append(parts.checkpoint)
    return callbacks, parts


def build_trainer(
    cfg: Any,
    run_dir: Path,
    model: ComposedModel,
    data: Any,
    flops_per_token: Optional[float] = None,
    resume_step: Optional[int] = None,
) -> tuple[L.Trainer, TrainerParts]:
    """The Trainer for ``cfg`` (already validated; a DictConfig or plain data) writing into ``run_dir``
    (``resume_step``: a resume in the run's own folder, see :func:`build_loggers`)."""
    cfg = to_container(cfg)
    t = dict(cfg["trainer"])
    callbacks, parts = build_callbacks(cfg["callbacks"], run_dir, data, flops_per_token, t["precision"])
    parts.loggers = build_loggers(cfg["logger"], run_dir, resume_step)
    args = {k: v for k, v in t.items() if k not in OWN_KEYS}
    args["strategy"] = build_strategy(t, model)
    args["val_check_interval"] = int(t["val_check_interval"]) * int(t.get("accumulate_grad_batches", 1))
    args.update(
        check_val_every_n_epoch=None,  # the training stream is endless: validate by step count
        max_epochs=-1,
        callbacks=callbacks,
        logger=parts.loggers,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        enable_checkpointing=parts.checkpoint is not None,
        enable_progress_bar=progress_bar(cfg["callbacks"]) in ("rich", "tqdm"),
        enable_model_summary=False,
    )
    try:
        trainer = L.Trainer(**args)
    except (ValueError, TypeError, MisconfigurationException) as exc:  # Lightning's own argument checks
        raise ConfigError([Problem("trainer", str(exc).splitlines()[0], "fix the trainer.* settings")]) from None
    return trainer, parts


__all__ = [
    "ResumedCSVLogger",
    "TrainerParts",
    "block_classes",
    "build_callbacks",
    "build_loggers",
    "build_strategy",
    "build_trainer",
    "check_callbacks",
    "check_logger",
    "check_precision_for_device",
    "check_trainer",
    "cpu_threads",
    "progress_bar",
]
