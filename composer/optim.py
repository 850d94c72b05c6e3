"""The optimizer and the learning-rate schedule of a training run.

    optimizer = build_optimizer(model, cfg.optim)            # AdamW, decay on matrices only
    scheduler = build_scheduler(optimizer, cfg.scheduler, max_steps=1000)   # LambdaLR, per step

Weight decay applies to parameters with ``ndim >= 2`` (linear weights and, by default, the
token / position embeddings, which are matrices too and, when tied, the output projection:
the nanoGPT / GPT-2 convention). Biases, norm weights and other vectors are never decayed.
``optim.decay_embeddings: false`` exempts the embeddings as well.

Schedules (``scheduler.name``), all with a linear warmup over ``warmup_steps`` from lr/(warmup+1)
to ``optim.lr``, then over the remaining ``decay_steps - warmup_steps`` steps:

    cosine:   lr -> min_lr along half a cosine, then min_lr
    linear:   lr -> min_lr along a straight line, then min_lr
    constant: lr
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .contract.options import is_int, is_number
from .errors import ConfigError, Problem

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)


def check_optim(cfg: Mapping[str, Any]) -> list[Problem]:
    """Every problem of the ``optim`` config."""
    problems: list[Problem] = []
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        problems.append(Problem("optim.name", f"{name!r} is not an optimizer", f"use one of {', '.join(OPTIMIZERS)}"))
    lr = cfg.get("lr")
    if not is_number(lr) or lr <= 0:
        problems.append(Problem("optim.lr", f"{lr!r} must be a positive number", "e.g. optim.lr=3e-4"))
    wd = cfg.get("weight_decay", 0.0)
    if not is_number(wd) or wd < 0:
        problems.append(Problem("optim.weight_decay", f"{wd!r} must be a number >= 0", "e.g. optim.weight_decay=0.1"))
    betas = cfg.get("betas", (0.9, 0.999))
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
        problems.append(
            Problem("optim.betas", f"{betas!r} must be two numbers in [0, 1)", "e.g. optim.betas=[0.9,0.95]")
        )
    eps = cfg.get("eps", 1e-8)
    if not is_number(eps) or eps <= 0:
        problems.append(Problem("optim.eps", f"{eps!r} must be a positive number", "e.g. optim.eps=1e-8"))
    if cfg.get("fused", "auto") not in ("auto", True, False):
        problems.append(
            Problem("optim.fused", f"{cfg.get('fused')!r} is not auto, true or false", "use optim.fused=auto")
        )
    return problems


def check_scheduler(cfg: Mapping[str, Any], lr: Any) -> list[Problem]:
    """Every problem of the ``scheduler`` config (``lr`` is optim.lr, for min_lr)."""
    problems: list[Problem] = []
    name = cfg.get("name")
    if name not in SCHEDULES:
        problems.append(Problem("scheduler.name", f"{name!r} is not a schedule", f"use one of {', '.join(SCHEDULES)}"))
    warmup = cfg.get("warmup_steps", 0)
    if not is_int(warmup) or warmup < 0:
        problems.append(
            Problem("scheduler.warmup_steps", f"{warmup!r} must be an integer >= 0", "e.g. scheduler.warmup_steps=100")
        )
    min_lr = cfg.get("min_lr", 0.0)
    if not is_number(min_lr) or min_lr < 0:
        problems.append(Problem("scheduler.min_lr", f"{min_lr!r} must be a number >= 0", "e.g. scheduler.min_lr=3e-5"))
    elif is_number(lr) and min_lr > lr:
        problems.append(
            Problem(
                "scheduler.min_lr",
                f"{min_lr} is above optim.lr={lr}",
                "set scheduler.min_lr to at most optim.lr (often lr / 10)",
            )
        )
    decay = cfg.get("decay_steps")
    if decay is not None and (not is_int(decay) or decay < 1):
        problems.append(
            Problem(
                "scheduler.decay_steps",
                f"{decay!r} must be a positive integer or null",
                "null decays over trainer.max_steps",
            )
        )
    return problems


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and the rest (not decayed); tied weights once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embeddings |= {
        id(p)
        for name, p in model.named_parameters()  # learned position tables
        if name.startswith(("position.", "layer_positions."))
    }
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim >= 2 and (decay_embeddings or id(p) not in embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters; ``fused: auto`` uses the fused kernel when every
    parameter is on CUDA."""
    problems = check_optim(cfg)
    if problems:
        raise ConfigError.of(problems)
    groups = parameter_groups(model, float(cfg.get("weight_decay", 0.0)), bool(cfg.get("decay_embeddings", True)))
    fused = cfg.get("fused", "auto")
    if fused == "auto":
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups,
        lr=float(cfg["lr"]),
        betas=tuple(float(b) for b in cfg.get("betas", (0.9, 0.999))),
        eps=float(cfg.get("eps", 1e-8)),
        fused=bool(fused) or None,
    )


def lr_factor(step: int, name: str, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps (LambdaLR convention)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return 1.0
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], max_steps: int) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step; decays over ``cfg.decay_steps`` or
    ``max_steps``."""
    lr = optimizer.defaults["lr"]
    problems = check_scheduler(cfg, lr)
    if problems:
        raise ConfigError.of(problems)
    decay_steps = int(cfg.get("decay_steps") or max_steps)
    args = (str(cfg["name"]), int(cfg.get("warmup_steps", 0)), decay_steps, float(cfg.get("min_lr", 0.0)) / lr)
    return LambdaLR(optimizer, _Factor(*args))


class _Factor:
    """A picklable schedule function (LambdaLR keeps callables that are objects in its state)."""

    def __init__(self, name: str, warmup_steps: int, decay_steps: int, min_ratio: float):
        self.name, self.warmup_steps, self.decay_steps, self.min_ratio = name, warmup_steps, decay_steps, min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.name, self.warmup_steps, self.decay_steps, self.min_ratio)


__all__ = ["build_optimizer", "build_scheduler", "check_optim", "check_scheduler", "lr_factor", "parameter_groups"]
