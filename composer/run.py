"""One training run: validate the config, build the data, the model and the LightningModule, fit,
export, and keep the run's record (:class:`~composer.summary.RunRecord`, written as metrics.json).

    record = train(cfg, run_dir, overrides)    # metrics.json as a dict; raises (after recording it) on failure
    prepared = prepare(cfg, overrides)         # everything built and validated, nothing trained

The model config is resolved once before any data is read (a bad model fails fast), adapted to
the data (vocab_size, num_classes), and built once: ``compose`` validates before it allocates.

A resume (``ckpt_path``) is checked against the checkpoint before Lightning loads it
(:mod:`composer.resume`); in the checkpoint's own run folder it continues that folder's
metrics.csv. Ctrl-C ends the run as ``interrupted`` (:class:`RunInterrupted`, naming the last
checkpoint); a full disk is a :class:`~composer.files.NoSpaceLeft`. The run's messages go to
``train.log`` in its folder (:func:`composer.runlog.run_log`); temp files of saves that were
killed in an earlier run in the folder are removed first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import warnings
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
from .files import NoSpaceLeft, no_space, remove_orphan_temps
from .lit import LitComposer
from .memory import peak_memory, reset_peak_memory
from .model import ComposedModel, compose
from .plan import training_flops_per_token
from .resume import CheckpointInfo, check_resume, check_state, checkpoint_run_dir, read_checkpoint
from .runlog import run_log, to_log_file
from .schema import ModelConfig, resolve_model_config
from .summary import UNSET, RunRecord, answer_sample, print_summary, write_metrics
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
    resume: Optional[CheckpointInfo] = None  # ckpt_path: what the checkpoint holds (checked against the run)
    preset_vocab_size: Optional[int] = None  # the model config's vocab_size before the data's replaced it


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) ended the run; the message names the last checkpoint and how to resume."""


def prepare(cfg: Any, overrides: Sequence[str] = ()) -> Prepared:
    """Validate ``cfg`` and build the data module, the model and the LightningModule."""
    plain = check_config(cfg)
    resume = read_checkpoint(plain["ckpt_path"]) if plain.get("ckpt_path") is not None else None
    if resume is not None:
        check_resume(resume, plain)  # before any data is read
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
    preset_vocab_size = model_cfg.vocab_size
    model_cfg = fit_model_to_data(model_cfg, data, plain["data"], user_keys, source=source)
    seed_everything(plain["seed"], workers=True, verbose=False)
    model = compose(model_cfg, seed=plain["seed"])  # the one build: it validates before allocating
    if saved is not None:
        model.load_state_dict(saved.state_dict())
    if resume is not None:
        check_state(resume, model)  # every weight's name and shape, before Lightning loads them
    lit = LitComposer(
        model,
        optim=plain["optim"],
        scheduler=plain["scheduler"],
        task=data.task,
        metric=data.metric,
        compile=plain.get("compile", False),
        run_config=plain,
        run_overrides=list(overrides),
    )
    flops = None
    try:
        flops = training_flops_per_token(model, data.seq_len)  # the built model: nothing built again
    except ComposerError as exc:  # a component the planner cannot measure: no MFU, training goes on
        log.warning("no MFU: %s", exc)
    return Prepared(model, data, lit, data.tokenizer, flops, plain, resume, preset_vocab_size)


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
def train(
    cfg: Any,
    run_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    console: Any = None,
    record_early_failure: bool = True,
) -> dict:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the metrics.json record (a dict).

    On failure metrics.json records ``status: failed`` (``interrupted`` for Ctrl-C) and the error,
    then the error is raised (a full disk as :class:`~composer.files.NoSpaceLeft`). With
    ``record_early_failure=False`` a run that fails before training starts (a config or data
    error) writes no metrics.json (composer-train then removes the folder it made).
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(overrides=list(overrides), seed=cfg.get("seed"), run_dir=str(run_dir))
    with run_log(run_dir) if _is_rank_zero() else contextlib.nullcontext():  # one writer of train.log
        try:
            if _is_rank_zero():
                _remove_orphans(run_dir)
            with _cpu_threads(cfg, record):
                _run(cfg, run_dir, overrides, record, start, console)
            return record.to_dict()
        except BaseException as exc:
            error = _failed(exc, cfg, run_dir, record, start, console, record_early_failure)
            if error is not exc:
                raise error from None
            raise
        finally:
            _destroy_dist_connection()  # a later run in this process (a sweep job) starts a new group


def _failed(
    exc: BaseException, cfg: Any, run_dir: Path, record: RunRecord, start: float, console: Any, early: bool
) -> BaseException:
    """Record the failure (rank 0) and return the error to raise (a full disk: NoSpaceLeft)."""
    kept = f"the last complete checkpoint is kept: {record.checkpoint_last}" if record.checkpoint_last else ""
    error: BaseException = no_space(exc, run_dir, keep=kept) or exc
    if not _is_rank_zero():
        return error
    record.fail(error, wall_s=time.perf_counter() - start)
    to_log_file(f"run {record.status}: {record.error}", logging.ERROR)
    started = record.steps is not UNSET
    if early or started:
        try:
            write_metrics(run_dir, record)
        except OSError as write_error:
            to_log_file(f"metrics.json not written: {write_error}", logging.ERROR)
            if isinstance(error, NoSpaceLeft):
                error = error.kept("metrics.json could not record it either")
    if cfg.get("callbacks", {}).get("summary", True) and record.steps:
        print_summary(record, console)
    return error


def _remove_orphans(run_dir: Path) -> None:
    """Temp files that saves killed in an earlier run in this folder left behind (see composer.files)."""
    removed = [p for d in (run_dir, run_dir / "checkpoints", run_dir / "model") for p in remove_orphan_temps(d)]
    if removed:
        log.info("removed %d temporary file(s) of interrupted saves: %s", len(removed), ", ".join(map(str, removed)))


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
    record.vocab_size = model.config.vocab_size
    if prepared.preset_vocab_size is not None and prepared.preset_vocab_size != record.vocab_size:
        record.preset_vocab_size = prepared.preset_vocab_size
    record.task, record.metric, record.seq_len, record.batch_size = (
        data.task,
        data.metric,
        data.seq_len,
        data.batch_size,
    )
    resume_step = _resuming(prepared.resume, run_dir, record)
    trainer, parts = build_trainer(plain, run_dir, model, data, prepared.flops_per_token, resume_step)
    record.precision, record.world_size = str(trainer.precision), trainer.world_size
    log.info(
        "training %s (%s parameters) for %s steps in %s", record.model, f"{record.params:,}", trainer.max_steps, run_dir
    )
    _fit(trainer, lit, data, plain.get("ckpt_path"), record, parts)
    exported, model_dir = _export(trainer, lit, run_dir, prepared.tokenizer)
    if not trainer.is_global_zero:
        return
    record.model_dir = str(model_dir)
    record.sample = _sample(exported, prepared, parts)
    record.status, record.wall_s = "completed", time.perf_counter() - start
    write_metrics(run_dir, record)
    if plain["callbacks"].get("summary", True):
        print_summary(record, console)


def _resuming(resume: Optional[CheckpointInfo], run_dir: Path, record: RunRecord) -> Optional[int]:
    """Record a resume; its step when it continues the checkpoint's own run folder (else None)."""
    if resume is None:
        return None
    record.resumed_from = {"checkpoint": str(resume.path), "step": resume.global_step}
    own = checkpoint_run_dir(resume.path)
    if own is not None and own == run_dir.resolve():
        log.info("resuming %s at step %d (%s)", run_dir, resume.global_step, resume.path)
        return resume.global_step
    log.info(
        "resuming from %s (step %d) into the new folder %s; the checkpoint's folder is left as it was",
        resume.path,
        resume.global_step,
        run_dir,
    )
    return None


def _fit(trainer: Any, lit: LitComposer, data: Any, ckpt_path: Any, record: RunRecord, parts: TrainerParts) -> None:
    """``trainer.fit``; Ctrl-C (Lightning then exits with status 1) becomes :class:`RunInterrupted`."""
    handler = signal.getsignal(signal.SIGINT)
    interrupted = False
    try:
        with warnings.catch_warnings():  # resuming into a new folder: said in the log above
            warnings.filterwarnings("ignore", message=r".*dirpath has changed.*")
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            # the folder holds train.log (and .hydra/) before metrics.csv: nothing of the logger's is lost
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            trainer.fit(lit, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        if not trainer.interrupted:
            raise
        interrupted = True
    finally:
        _restore_sigint(handler)
        _collect(record, trainer, lit, parts)
        peak = peak_memory()
        record.peak_rss_mb, record.peak_gpu_mb = peak["peak_rss_mb"], peak["peak_gpu_mb"]
    if interrupted or trainer.interrupted:
        raise RunInterrupted(_interrupted_message(record))


def _restore_sigint(handler: Any) -> None:
    """Lightning ignores SIGINT once it has caught one; give it back its earlier handler."""
    with contextlib.suppress(ValueError, TypeError):  # not the main thread / not settable here
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and handler is not None:
            signal.signal(signal.SIGINT, handler)


def _interrupted_message(record: RunRecord) -> str:
    steps = record.steps if record.steps is not UNSET else 0
    last = record.checkpoint_last
    if last:
        return f"interrupted at step {steps}; the last checkpoint is {last} (resume: composer-train ckpt_path={last})"
    return f"interrupted at step {steps}, before any checkpoint was written"


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
        last, best = parts.checkpoint.last_model_path or None, parts.checkpoint.best_model_path or None
        record.checkpoint_last = last if last and Path(last).is_file() else None
        record.checkpoint_best = best if best and Path(best).is_file() else None


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


__all__ = ["Prepared", "RunInterrupted", "prepare", "train"]
