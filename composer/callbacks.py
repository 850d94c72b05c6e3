"""Training callbacks: throughput / MFU, NaN guard, final validation, text samples, progress bar.

    Throughput(flops_per_token=..., precision="bf16-mixed")   # tokens_per_s and mfu every log interval
    LearningRate()             # lr every log interval
    NanGuard()                 # stops at the first non-finite loss; never lets a NaN checkpoint be written
    ValidateAtEnd()            # validates (and checkpoints) after the last step
    SampleText(tokenizer)      # text data: prints a generated sample after validations
    MoEBalance(path)           # MoE: aux-loss-free bias updates after optimizer steps; expert load at log intervals
    ComposerProgressBar()      # rich progress bar showing loss / val_loss / tokens/s (optimizer steps)
    PlainProgress(every_s=30)  # plain lines (step, loss, tokens/s, ETA) for logs that are not a terminal

Host reads (``float(tensor)``) happen only at log intervals, before validations and before
checkpoints, never every step.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar

from .errors import ComposerError
from .runlog import to_log_file

progress_log = logging.getLogger("composer.progress")

# Approximate dense peak FLOP/s per device: (16-bit tensor cores, 32-bit). Matched by substring of
# torch.cuda.get_device_name(), first match wins. 32-bit runs use the TF32 peak (half the 16-bit
# one) when TF32 matmuls are allowed (torch.set_float32_matmul_precision("high")).
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]
TF32_DEVICES = ("H200", "H100", "A100", "L40S", "L4", "A10", "RTX 4090", "RTX 3090")


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak FLOP/s of one ``device`` at ``precision``; None for CPUs and unknown accelerators."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, single in PEAK_FLOPS:
        if key in name:
            if not str(precision).startswith("32") and not str(precision).startswith("64"):
                return half
            tf32 = key in TF32_DEVICES and torch.get_float32_matmul_precision() != "highest"
            return half / 2 if tf32 else single
    return None


def _should_log(trainer: L.Trainer) -> bool:
    # the same test Lightning's own LearningRateMonitor uses: True on log_every_n_steps boundaries
    return trainer._logger_connector.should_update_logs


class Throughput(Callback):
    """Logs ``tokens_per_s`` (all processes together) and ``mfu`` (model FLOPs utilisation,
    accelerators with a known peak only) every ``log_every_n_steps``; validation time excluded.

    ``flops_per_token``: training FLOPs of one token (``composer.plan.training_flops_per_token``).
    After training, ``tokens``, ``train_seconds`` and ``tokens_per_s`` hold the run's totals.
    """

    def __init__(self, flops_per_token: Optional[float] = None, precision: str = "32-true"):
        self.flops_per_token = flops_per_token
        self.precision = precision
        self.tokens = 0
        self.train_seconds = 0.0
        self._peak: Optional[float] = None
        self._mark = 0.0
        self._mark_tokens = 0
        self._paused = True

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._peak = peak_flops(pl_module.device, self.precision)
        self._paused = True  # the clock starts with the first batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._paused:  # first batch, or the first after a validation (and its checkpoint)
            self._mark, self._mark_tokens, self._paused = time.perf_counter(), self.tokens, False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.tokens += batch["input_ids"].numel() * trainer.world_size  # shape only: no device read
        if not _should_log(trainer):
            return
        tps = self._lap(pl_module)
        pl_module.log("tokens_per_s", tps, on_step=True, on_epoch=False, rank_zero_only=True)
        if self._peak and self.flops_per_token:
            mfu = self.flops_per_token * tps / (self._peak * trainer.world_size)
            pl_module.log("mfu", mfu, on_step=True, on_epoch=False, rank_zero_only=True)
        progress = getattr(pl_module, "progress", None)
        if progress is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                progress["loss"] = float(loss.detach())  # one host read per log interval
            progress["tok/s"] = round(tps)

    def _lap(self, pl_module: L.LightningModule) -> float:
        """Tokens per second since the last mark; the time is added to ``train_seconds``."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # once per log interval, for honest timing
        now = time.perf_counter()
        seconds = now - self._mark
        tps = (self.tokens - self._mark_tokens) / seconds if seconds > 0 else 0.0
        self.train_seconds += seconds
        self._mark, self._mark_tokens = now, self.tokens
        return tps

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not self._paused:
            self._lap(pl_module)
            self._paused = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._paused:
            self._lap(pl_module)
            self._paused = True


class LearningRate(Callback):
    """Logs ``lr`` (the scheduled learning rate of the step) every ``log_every_n_steps``; every
    parameter group follows the same schedule, so one value describes them all."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.optimizers and _should_log(trainer):
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
            pl_module.log("lr", lr, on_step=True, on_epoch=False, rank_zero_only=True)


def moe_layers(module: Any) -> list[tuple[str, Any]]:
    """(label, module) of every mixture-of-experts layer in ``module`` (those with ``take_expert_load``);
    the label is ``layer_<i>`` for a model's layer i."""
    found = []
    for name, m in module.named_modules():
        if callable(getattr(m, "take_expert_load", None)):
            index = re.search(r"(?:^|\.)layers\.(\d+)\.", name + ".")
            found.append((f"layer_{index.group(1)}" if index else name, m))
    return found


class MoEBalance(Callback):
    """Mixture-of-experts upkeep. After every optimizer step (a post-step hook on each optimizer, so only
    steps actually taken count), each MoE layer's ``after_optimizer_step``: the aux-loss-free bias update
    from the step's load, summed over processes. At log intervals, each layer's expert load since the
    last log: ``expert_load_max_mean/layer_<i>`` (the busiest expert's slots over the mean; 1 = balanced)
    in the metrics and, with ``path``, one JSON line per layer with every expert's share of the slots
    (``{"step", "layer", "max_mean", "share"}``). The loads stay on the device between log intervals."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path
        self._layers: list[tuple[str, Any]] = []
        self._handles: list[Any] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._layers = moe_layers(pl_module)
        if self._layers:
            for optimizer in trainer.optimizers:
                self._handles.append(optimizer.register_step_post_hook(lambda *_: self.balance(trainer)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def balance(self, trainer: L.Trainer) -> None:
        def summed(t: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(t, reduce_op="sum")

        for _, layer in self._layers:
            layer.after_optimizer_step(summed if trainer.world_size > 1 else None)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._layers or not _should_log(trainer):
            return
        loads = [layer.take_expert_load() for _, layer in self._layers]
        flat = torch.cat(loads).double().cpu().tolist()  # the one host read of the interval
        rows, start = [], 0
        for (label, _), load in zip(self._layers, loads, strict=True):
            counts, start = flat[start : start + load.numel()], start + load.numel()
            total = sum(counts)
            if total <= 0:
                continue
            max_mean = max(counts) * len(counts) / total
            pl_module.log(f"expert_load_max_mean/{label}", max_mean, on_step=True, on_epoch=False, rank_zero_only=True)
            share = [c / total for c in counts]
            rows.append({"step": trainer.global_step, "layer": label, "max_mean": max_mean, "share": share})
        if self.path is not None and rows and trainer.is_global_zero:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)


class NonFiniteLoss(ComposerError):
    """Training diverged: the loss (or a weight) became NaN or infinite."""


class NanGuard(Callback):
    """Stops training at the first non-finite loss, naming the optimizer step, and refuses to
    write a checkpoint from then on (so the last checkpoint on disk is the last good one).

    The per-step test stays on the device (no host read); the flag is read at log intervals,
    before each validation and before each checkpoint is written. Checkpoints also require
    every weight to be finite.
    """

    def __init__(self) -> None:
        self._first_bad: Optional[torch.Tensor] = None  # step of the first bad loss, -1 while none
        self._step = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step + 1  # the optimizer step this batch belongs to (1-based)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach()
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        step = torch.full((), self._step, dtype=torch.long, device=loss.device)
        newly_bad = ~torch.isfinite(loss) & (self._first_bad < 0)
        self._first_bad = torch.where(newly_bad, step, self._first_bad)
        if _should_log(trainer):
            self.check(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.check(trainer, pl_module, weights=True)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, weights: bool = False) -> None:
        """Raise NonFiniteLoss if any process saw a bad loss (or, with ``weights``, holds a bad weight)."""
        first = int(self._first_bad) if self._first_bad is not None else -1
        bad_weight = False
        if weights:
            flags = [torch.isfinite(p.detach()).all() for p in pl_module.parameters() if p.numel()]
            bad_weight = bool(flags) and not bool(torch.stack(flags).all())
        local_bad = first >= 0 or bad_weight
        if not trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            return
        where = f"at step {first}" if first >= 0 else f"by step {trainer.global_step}"
        what = "the training loss became NaN/Inf" if first >= 0 or not bad_weight else "a weight became NaN/Inf"
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = f"the last good checkpoint is kept: {ckpt}" if ckpt else "no checkpoint had been written yet"
        raise NonFiniteLoss(
            f"{what} {where} (training stopped); {kept}. Fix: lower optim.lr, set "
            "trainer.gradient_clip_val (e.g. 1.0), raise scheduler.warmup_steps, or use "
            "trainer.precision=bf16-mixed instead of 16-mixed"
        )


class ValidateAtEnd(Callback):
    """Asks Lightning to stop at ``max_steps`` itself, which makes it validate (and checkpoint)
    after the last step even when max_steps is not a multiple of val_check_interval."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class SampleText(Callback):
    """After every ``every_n_validations``-th validation, generates ``max_new_tokens`` tokens after
    ``prompt`` (or after the first tokens of a validation sequence) and prints them (rank 0).
    The last sample is kept in ``self.last`` for the run summary."""

    def __init__(
        self,
        tokenizer: Any,
        prompt: str = "",
        max_new_tokens: int = 64,
        every_n_validations: int = 1,
        temperature: float = 0.8,
        top_k: Optional[int] = 40,
        prompt_tokens: int = 16,
    ):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.every = max(1, every_n_validations)
        self.temperature = temperature
        self.top_k = top_k
        self.prompt_tokens = prompt_tokens
        self.last: Optional[str] = None
        self._count = 0
        self._val_prompt: Optional[torch.Tensor] = None

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._val_prompt is None and batch_idx == 0:
            self._val_prompt = batch["input_ids"][:1, : self.prompt_tokens].detach()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._count += 1
        if self._count % self.every:
            return
        self.last = self.generate(pl_module.model)
        pl_module.print(f"[step {trainer.global_step}] sample: {self.last!r}")

    @torch.no_grad()
    def generate(self, model: Any) -> str:
        """Sampled text from ``model`` (its own seeded generator: the training's random stream is
        not touched, so resumed runs stay exact)."""
        device = next(model.parameters()).device
        if self.prompt:
            ids = torch.tensor([self.tokenizer.encode(self.prompt).ids], dtype=torch.long, device=device)
        elif self._val_prompt is not None:
            ids = self._val_prompt.to(device)
        else:
            ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        ids = ids[:, : max(1, model.config.max_position_embeddings - 1)]
        room = model.config.max_position_embeddings - ids.shape[1]
        out = model.generate(
            ids,
            max_new_tokens=max(1, min(self.max_new_tokens, room)),
            do_sample=True,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self._count,
        )
        return self.tokenizer.decode(out[0].tolist())


class _StepBar:
    """The bar counts optimizer steps up to ``trainer.max_steps`` (Lightning's counts the batches of
    the current epoch against the steps left, which after a resume reads e.g. ``450/49``)."""

    trainer: L.Trainer

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches  # type: ignore[misc]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning shows batch_idx + 1: make it the optimizer steps done
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)  # type: ignore[misc]


class ComposerProgressBar(_StepBar, RichProgressBar):
    """Rich progress bar showing the values the module refreshes at log intervals (loss, tok/s,
    val_loss) instead of Lightning's per-step tensors (which would read the device every step)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:  # a resume starts part-way
            self.progress.reset(
                self.train_progress_bar_id,
                total=self.total_train_batches,
                completed=trainer.global_step,
                description=self._get_train_description(trainer.current_epoch),
            )

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.update(getattr(pl_module, "progress", {}))
        return {k: _short(v) for k, v in items.items()}

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class ComposerTQDMProgressBar(_StepBar, TQDMProgressBar):
    """The tqdm variant (``callbacks.progress_bar=tqdm``)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.initial = bar.n = trainer.global_step  # a resume starts part-way (and tqdm's rate counts from there)
        bar.set_description("train")
        bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.update(getattr(pl_module, "progress", {}))
        return items


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainProgress(Callback):
    """Plain progress lines for logs that are not a terminal (SLURM, CI, ``nohup``, ``| tee``):
    ``step 50/400 (12%) | loss 1.2345 | 12,345 tok/s | ETA 1m20s`` at the first log interval, then
    at log intervals at most every ``every_s`` seconds, and a line per validation (rank 0).

    ``to_console``: print them (stdout); they also go to the run's log file (``train.log``) either
    way, so a run shown with a progress bar still leaves its progress in the file.
    """

    def __init__(self, every_s: float = 30.0, to_console: bool = True):
        self.every_s = float(every_s)
        self.to_console = to_console
        self._start: Optional[float] = None
        self._start_step = 0
        self._last: Optional[float] = None

    def emit(self, text: str) -> None:
        if self.to_console:
            print(text, flush=True)
        to_log_file(text, logger=progress_log)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step, self._last = time.perf_counter(), trainer.global_step, None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or not _should_log(trainer):
            return
        now = time.perf_counter()
        if self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        self.emit(self.line(trainer, getattr(pl_module, "progress", {}), now))

    def line(self, trainer: L.Trainer, progress: dict, now: float) -> str:
        """The progress line at step ``trainer.global_step``."""
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total > 0 else f"step {step}"]
        if isinstance(progress.get("loss"), float) and math.isfinite(progress["loss"]):
            parts.append(f"loss {progress['loss']:.4f}")
        if progress.get("tok/s"):
            parts.append(f"{progress['tok/s']:,.0f} tok/s")
        done = step - self._start_step
        if total > 0 and done > 0 and self._start is not None:
            parts.append(f"ETA {_duration((now - self._start) / done * (total - step))}")
        return " | ".join(parts)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        history = getattr(pl_module, "val_history", None)
        if not history:
            return
        values = " | ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "step")
        self.emit(f"step {trainer.global_step}/{trainer.max_steps} validation: {values}")


__all__ = [
    "ComposerProgressBar",
    "ComposerTQDMProgressBar",
    "LearningRate",
    "MoEBalance",
    "NanGuard",
    "NonFiniteLoss",
    "PlainProgress",
    "SampleText",
    "Throughput",
    "ValidateAtEnd",
    "peak_flops",
]
