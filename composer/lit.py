"""The LightningModule: a composed model, its loss, optimizer, schedule and validation metrics.

    lit = LitComposer(model, optim=cfg.optim, scheduler=cfg.scheduler, task="lm", metric="answer_accuracy")
    Trainer(max_steps=100).fit(lit, datamodule=dm)

Batches are dicts: ``input_ids`` [B, T], ``labels`` [B, T] (lm; -100 = no loss, shifted inside the
model) or [B] (classification), optional ``attention_mask`` [B, T].

Logged (names as in metrics.csv): ``train_loss`` (cross-entropy + MoE aux loss), ``train_aux_loss``
(MoE models), ``val_loss`` (token-weighted cross-entropy, no aux loss), ``val_ppl`` = exp(val_loss) (lm only),
``val_accuracy`` (argmax accuracy on the positions that carry a label: the recall answers, or
the class of each sequence). Nothing in the training step reads a tensor on the host: losses
are logged as tensors and Lightning converts them every ``log_every_n_steps``.

Checkpoints also carry the random-number-generator states (restored just before the first
training batch after a resume, so dropout continues exactly), the validation history and, under
``checkpoint["composer"]``, the run's training config (``config``: plain data, as composed) and the
model's resolved config (``model_config``): a resume compares them with its own before Lightning
loads the weights (:mod:`composer.resume`). Everything in them loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torchmetrics import SumMetric

from .contract.options import IGNORE_INDEX
from .model import ComposedModel
from .optim import build_optimizer, build_scheduler


class LitComposer(L.LightningModule):
    """Trains a :class:`~composer.model.ComposedModel`.

    Args:
        model: the model to train (built by ``compose`` or ``ComposedModel.from_pretrained``).
        optim: the ``optim`` config (name, lr, weight_decay, betas, eps, fused, decay_embeddings).
        scheduler: the ``scheduler`` config (name, warmup_steps, min_lr, decay_steps).
        task: "lm" (labels [B, T]) or "classification" (labels [B]).
        metric: "answer_accuracy" / "accuracy" to report ``val_accuracy``; None for loss only.
        compile: run the model under ``torch.compile`` (in place: parameter names unchanged); a
            mapping is passed to it as keyword arguments, e.g. ``{"mode": "max-autotune"}``.
        run_config: the training config as plain data, stored in every checkpoint (for resumes),
            with ``run_overrides``, the command line that made it.
    """

    def __init__(
        self,
        model: ComposedModel,
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        task: str = "lm",
        metric: Optional[str] = None,
        compile: bool | Mapping[str, Any] = False,
        run_config: Optional[Mapping[str, Any]] = None,
        run_overrides: Optional[list[str]] = None,
    ):
        super().__init__()
        self.run_config = dict(run_config) if run_config is not None else None
        self.run_overrides = [str(o) for o in run_overrides or []]
        self.model = model
        self.optim_cfg = dict(optim)
        self.scheduler_cfg = dict(scheduler)
        self.task = task
        self.metric = metric
        # sums over the validation set; "disable": no NaN check (it would read the tensor on the host)
        self.val_loss_sum = SumMetric(nan_strategy="disable")
        self.val_count = SumMetric(nan_strategy="disable")
        self.val_correct = SumMetric(nan_strategy="disable")
        self.val_history: list[dict[str, float]] = []  # one entry per validation: step, val_loss, ...
        self.best_val_loss = math.inf
        self.progress: dict[str, float] = {}  # shown by the progress bar; refreshed at log intervals
        self._rng_to_restore: Optional[dict] = None
        if compile:
            self.model.compile(**(dict(compile) if isinstance(compile, Mapping) else {}))

    def on_fit_start(self) -> None:
        enable_tf32(self.device)

    # ------------------------------------------------------------------ steps
    def forward(self, batch: Mapping[str, Tensor], return_logits: bool = True) -> Any:
        return self.model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels"),
            return_logits=return_logits,
        )

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        out = self(batch, return_logits=False)  # the lm head's fused loss: no [B, T, V] logits
        size = batch["input_ids"].shape[0]
        self.log("train_loss", out.loss.detach(), on_step=True, on_epoch=False, batch_size=size)
        if out.aux_loss is not None:
            self.log("train_aux_loss", out.aux_loss.detach(), on_step=True, on_epoch=False, batch_size=size)
        return out.loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        out = self(batch)
        labels = batch["labels"]
        ce = out.loss if out.aux_loss is None else out.loss - out.aux_loss  # cross-entropy only
        if self.task == "lm":
            target = labels[:, 1:]  # [B, T-1]: position t predicts token t + 1
            pred = out.logits[:, :-1].argmax(-1)  # [B, T-1]
        else:
            target, pred = labels.reshape(-1), out.logits.argmax(-1)  # [B]
        valid = target != IGNORE_INDEX
        count = valid.sum()
        # a batch without any label contributes nothing (its mean loss is NaN)
        self.val_loss_sum.update(torch.where(count > 0, ce.float() * count, 0.0))
        self.val_count.update(count.float())
        self.val_correct.update(((pred == target) & valid).sum().float())

    def on_validation_epoch_end(self) -> None:
        count = self.val_count.compute().clamp(min=1)  # synchronised over processes by torchmetrics
        loss = self.val_loss_sum.compute() / count
        metrics = {"val_loss": loss}
        if self.task == "lm":
            metrics["val_ppl"] = loss.clamp(max=80).exp()
        if self.metric is not None:
            metrics["val_accuracy"] = self.val_correct.compute() / count
        for m in (self.val_loss_sum, self.val_count, self.val_correct):
            m.reset()
        # already reduced over processes by torchmetrics; sync_dist averages equal values (a no-op
        # that keeps Lightning from warning about unsynchronised epoch metrics)
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        row = {"step": float(self.global_step), **{k: float(v) for k, v in metrics.items()}}
        self.val_history.append(row)
        if row["val_loss"] < self.best_val_loss:
            self.best_val_loss = row["val_loss"]
        self.progress["val_loss"] = row["val_loss"]
        if "val_accuracy" in row:
            self.progress["val_acc"] = row["val_accuracy"]

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict:
        optimizer = build_optimizer(self.model, self.optim_cfg)
        steps = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, max_steps=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"},
        }

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["composer"] = {
            "rng": rng_states(),
            "best_val_loss": self.best_val_loss,
            "val_history": list(self.val_history),
            "model_config": self.model.config.to_dict(),
        }
        if self.run_config is not None:
            checkpoint["composer"]["config"] = self.run_config
            checkpoint["composer"]["overrides"] = self.run_overrides

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("composer", {})
        self._rng_to_restore = state.get("rng")
        self.best_val_loss = state.get("best_val_loss", math.inf)
        self.val_history = list(state.get("val_history", []))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # restored here, not at load time: creating data loader iterators in between draws from
        # the global generator, so the state is put back right before the next random draw
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def enable_tf32(device: torch.device) -> bool:
    """On Ampere or newer GPUs let float32 matmuls (and cuDNN convolutions) use TF32 tensor cores
    (``torch.set_float32_matmul_precision("high")``): the 32-true precision and the float32 parts of
    mixed precision run several times faster for a 10-bit mantissa in the products. Returns whether it
    was switched on."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, in types ``torch.load(weights_only=True)``
    accepts (Lightning loads checkpoints that way)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only where CUDA is available)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


__all__ = ["LitComposer", "enable_tf32"]
