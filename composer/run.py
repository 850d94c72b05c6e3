"""One training run: validate the config, build the data, the model and the LightningModule, fit,
export, and keep the run's record (:class:`~composer.summary.RunRecord`, written as metrics.json).

    record = train(cfg, run_dir, overrides)    # metrics.json as a dict; raises (after recording it) on failure
    prepared = prepare(cfg, overrides)         # everything built and validated, nothing trained

The model config is resolved once before any data is read (a bad model fails fast), adapted to
the data (vocab_size, num_classes), and built once: ``compose`` validates before it allocates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import seed_everything
from lightning.pytorch.strategies import FSDPStrategy

from .checkpoint import load_tokenizer
from .data import build_datamodule
from .errors import ComposerError, ConfigError, Problem
from .lit import LitComposer
from .memory import peak_memory, reset_peak_memory
from .model import ComposedModel, compose
from .plan import training_flops_per_token
from .schema import ModelConfig, resolve_model_config
from .summary import RunRecord, answer_sample, print_summary, write_metrics
from .train_config import check_config, fit_model_to_data, init_from_config, overridden_model_keys
from .training import TrainerParts, build_trainer, cpu_threads

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- building
@dataclass
class Prepared:
    """Everything built before training: validated, nothing trained yet."""

    model: ComposedModel
    data: Any
    lit: LitComposer
    tokenizer: Any
    flops_per_token: Optional[float]
    config: dict  # the training config as plain data, interpolations resolved


def prepare(cfg: Any, overrides: Sequence[str] = ()) -> Prepared:
    """Validate ``cfg`` and build the data module, the model and the LightningModule."""
    plain = check_config(cfg)
    user_keys = overridden_model_keys(overrides)
    source = str(plain["init_from"]) if plain.get("init_from") is not None else ""
    saved, saved_tokenizer = None, None
    if source:
        saved = ComposedModel.from_pretrained(source)
        saved_tokenizer = load_tokenizer(source)
        model_cfg = init_from_config(saved.config, cfg.model, user_keys, source)
    else:
        model_cfg = resolve_model_config(plain["model"])  # the model is checked before any data is read
    data = _datamodule(plain, model_cfg, source, saved_tokenizer)
    model_cfg = fit_model_to_data(model_cfg, data, plain["data"], user_keys, source=source)
    seed_everything(plain["seed"], workers=True, verbose=False)
    model = compose(model_cfg, seed=plain["seed"])  # the one build: it validates before allocating
    if saved is not None:
        model.load_state_dict(saved.state_dict())
    lit = LitComposer(
        model,
        optim=plain["optim"],
        scheduler=plain["scheduler"],
        task=data.task,
        metric=data.metric,
        compile=plain.get("compile", False),
    )
    flops = None
    try:
        flops = training_flops_per_token(model, data.seq_len)  # the built model: nothing built again
    except ComposerError as exc:  # a component the planner cannot measure: no MFU, training goes on
        log.warning("no MFU: %s", exc)
    return Prepared(model, data, lit, data.tokenizer, flops, plain)


def _datamodule(plain: dict, model_cfg: ModelConfig, init_from: str, saved_tokenizer: Any) -> Any:
    """The data module, set up for fitting; with ``init_from``, on the saved model's tokenizer."""
    data_cfg = dict(plain["data"])
    if saved_tokenizer is not None and "tokenizer_path" in data_cfg and data_cfg["tokenizer_path"] is None:
        data_cfg["tokenizer_path"] = str(Path(init_from) / "tokenizer.json")  # keep the saved model's ids
    data = build_datamodule(data_cfg, seed=plain["seed"], model_max_positions=model_cfg.max_position_embeddings)
    data.prepare_data()
    data.setup("fit")
    tokenizer = data.tokenizer
    if saved_tokenizer is not None and tokenizer is not None and saved_tokenizer.to_str() != tokenizer.to_str():
        raise ConfigError(
            [
                Problem(
                    "init_from",
                    f"the tokenizer saved in {init_from} differs from the data's (data.tokenizer)",
                    "train on the same data / tokenizer settings as the saved model, or start without init_from",
                )
            ]
        )
    return data


# ----------------------------------------------------------------------------- the run
def train(cfg: Any, run_dir: str | os.PathLike, overrides: Sequence[str] = (), console: Any = None) -> dict:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the metrics.json record (a dict).

    On failure metrics.json records ``status: failed`` and the error, then the error is raised.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(overrides=list(overrides), seed=cfg.get("seed"), run_dir=str(run_dir))
    try:
        with _cpu_threads(cfg, record):
            _run(cfg, run_dir, overrides, record, start, console)
        return record.to_dict()
    except BaseException as exc:
        if _is_rank_zero():
            record.fail(exc, wall_s=time.perf_counter() - start)
            write_metrics(run_dir, record)
            if cfg.get("callbacks", {}).get("summary", True) and record.steps:
                print_summary(record, console)
        raise
    finally:
        _destroy_dist_connection()  # a later run in this process (a sweep job) starts a new group


def _is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0


@contextlib.contextmanager
def _cpu_threads(cfg: Any, record: RunRecord) -> Iterator[None]:
    """torch's intra-op threads as ``trainer.cpu_threads`` says, for the run; restored afterwards."""
    threads = cpu_threads(cfg.trainer.get("cpu_threads", "auto"), str(cfg.trainer.get("accelerator", "auto")))
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    record.cpu_threads = torch.get_num_threads() if threads is not None else None
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(cfg: Any, run_dir: Path, overrides: Sequence[str], record: RunRecord, start: float, console: Any) -> None:
    record.start_rss_mb = reset_peak_memory()
    prepared = prepare(cfg, overrides)
    model, data, lit, plain = prepared.model, prepared.data, prepared.lit, prepared.config
    record.model, record.params = model.config.name or "custom", model.num_parameters()
    record.task, record.metric, record.seq_len, record.batch_size = (
        data.task,
        data.metric,
        data.seq_len,
        data.batch_size,
    )
    trainer, parts = build_trainer(plain, run_dir, model, data, prepared.flops_per_token)
    record.precision, record.world_size = str(trainer.precision), trainer.world_size
    try:
        trainer.fit(lit, datamodule=data, ckpt_path=plain.get("ckpt_path"))
    finally:
        _collect(record, trainer, lit, parts)
        peak = peak_memory()
        record.peak_rss_mb, record.peak_gpu_mb = peak["peak_rss_mb"], peak["peak_gpu_mb"]
    if trainer.interrupted:
        raise KeyboardInterrupt("training was interrupted")
    exported, model_dir = _export(trainer, lit, run_dir, prepared.tokenizer)
    if not trainer.is_global_zero:
        return
    record.model_dir = str(model_dir)
    record.sample = _sample(exported, prepared, parts)
    record.status, record.wall_s = "completed", time.perf_counter() - start
    write_metrics(run_dir, record)
    if plain["callbacks"].get("summary", True):
        print_summary(record, console)


def _collect(record: RunRecord, trainer: Any, lit: LitComposer, parts: TrainerParts) -> None:
    """Final and best validation metrics, throughput and checkpoint paths into ``record``."""
    history = list(lit.val_history)
    last = history[-1] if history else {}
    record.steps, record.history = trainer.global_step, history
    record.val_loss, record.val_ppl = last.get("val_loss"), last.get("val_ppl")
    record.val_accuracy = last.get("val_accuracy")
    record.best_val_loss = lit.best_val_loss if history else None
    record.best_val_accuracy = max((h["val_accuracy"] for h in history if "val_accuracy" in h), default=None)
    record.tokens, record.tokens_per_s = parts.throughput.tokens, parts.throughput.tokens_per_s
    if parts.checkpoint is not None:
        record.checkpoint_last = parts.checkpoint.last_model_path or None
        record.checkpoint_best = parts.checkpoint.best_model_path or None


def _export(trainer: Any, lit: LitComposer, run_dir: Path, tokenizer: Any) -> tuple[Any, Optional[Path]]:
    """Write the trained model with save_pretrained (rank 0); returns (model on rank 0, folder)."""
    if isinstance(trainer.strategy, FSDPStrategy):  # gather the full weights (every rank takes part)
        state = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return None, None
        model = compose(lit.model.config, device="cpu")
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    else:
        if not trainer.is_global_zero:
            return None, None
        model = lit.model
    out = run_dir / "model"
    model.save_pretrained(out, tokenizer=tokenizer)
    return model, out


def _sample(model: Any, prepared: Prepared, parts: TrainerParts) -> Optional[str]:
    """A short sample for the summary: answers of one validation example, or generated text."""
    data = prepared.data
    if data.metric is not None:
        batch = next(iter(data.val_dataloader()))
        return answer_sample(model, batch, prepared.tokenizer)
    if parts.sample is not None:
        return parts.sample.last or parts.sample.generate(model)
    return None


__all__ = ["Prepared", "prepare", "train"]
