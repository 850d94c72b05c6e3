"""Benchmark 2: the Lightning loop vs a bare PyTorch loop over the same composed model; host reads per step.

    python -m benchmarks.bench_lightning [--device cuda] [--quick]

Both loops train the same composed model on the same batches with composer's AdamW (fused on CUDA), its
warmup + cosine schedule, gradient clipping at 1.0 and the same precision (CPU: 32-true; CUDA: bf16-mixed).
The Lightning side is composer's own: ``LitComposer`` with the trainer's callbacks (throughput, NaN guard,
learning rate, stop at max_steps) and the CSV logger, validation off. Runs alternate A B A B; per-step time
is measured over the steps after the first few (one synchronisation at each end).

Host reads: during the Lightning steps between two log intervals, every ``Tensor.item`` / ``__float__`` /
``__int__`` / ``__bool__`` / ``tolist`` call is counted (on CUDA each one is a host-device synchronisation;
CUDA also runs with ``torch.cuda.set_sync_debug_mode("warn")`` and counts the warnings).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks import harness
from benchmarks.models import Shape, build_composed, random_batch
from composer.callbacks import LearningRate, NanGuard, Throughput, ValidateAtEnd
from composer.lit import LitComposer
from composer.optim import build_optimizer, build_scheduler

# fused AdamW on every device (composer's choice on CUDA): the foreach kernel reads its CPU step counters with .item()
OPTIM = {"name": "adamw", "lr": 3e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "fused": True}
SCHEDULE = {"name": "cosine", "warmup_steps": 2, "min_lr": 3e-5}
HOST_READS = ("item", "__float__", "__int__", "__bool__", "tolist")


class Repeat(Dataset):
    """The same ready-made batch ``n`` times."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.batch


@contextlib.contextmanager
def count_host_reads(counter: dict[str, int]) -> Iterator[None]:
    """Count calls of the Tensor methods that read a value on the host (``counter[name] += 1``)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name: str, fn: Any) -> Any:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter[name] = counter.get(name, 0) + 1
            return fn(self, *args, **kwargs)

        return counted

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


class StepClock(L.Callback):
    """Times steps ``skip``..end (synchronised at both ends) and counts host reads inside the steps that do
    not log (``log_every_n_steps`` apart; the last step logs too). Put it last in the callback list."""

    def __init__(self, skip: int, device: torch.device):
        self.skip, self.device = skip, device
        self.start: Optional[tuple[float, float]] = None
        self.end: Optional[tuple[float, float]] = None
        self.reads: dict[str, int] = {}
        self.sync_warnings = 0
        self.quiet_steps = 0
        self._batch: dict[str, int] = {}
        self._ctx: Optional[contextlib.ExitStack] = None
        self._caught: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            harness.sync(self.device)
            self.start = (time.perf_counter(), time.process_time())
        if batch_idx >= self.skip:
            self._batch = {}
            self._ctx = contextlib.ExitStack()
            self._ctx.enter_context(count_host_reads(self._batch))
            if self.device.type == "cuda":
                self._caught = self._ctx.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._ctx is None:
            return
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self._ctx.close()
        self._ctx = None
        if not trainer._logger_connector.should_update_logs:  # composer's own logging test: a quiet step
            self.quiet_steps += 1
            for k, v in self._batch.items():
                self.reads[k] = self.reads.get(k, 0) + v
            self.sync_warnings += sum("synchroniz" in str(w.message) for w in self._caught)

    def on_train_end(self, trainer, pl_module) -> None:
        harness.sync(self.device)
        self.end = (time.perf_counter(), time.process_time())


def lightning_run(
    model: torch.nn.Module, batch: dict, steps: int, skip: int, device: torch.device, precision: str, root: str
) -> StepClock:
    clock = StepClock(skip, device)
    lit = LitComposer(model, OPTIM, SCHEDULE, task="lm")
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=L.pytorch.loggers.CSVLogger(root, name="", version=""),
        default_root_dir=root,
        callbacks=[ValidateAtEnd(), Throughput(None, precision), NanGuard(), LearningRate(), clock],
    )
    trainer.fit(lit, DataLoader(Repeat(batch, steps), batch_size=None))
    return clock


def bare_run(
    model: torch.nn.Module, batch: dict, steps: int, skip: int, device: torch.device, precision: str
) -> tuple[float, float]:
    """The same training in a plain loop; returns (wall, cpu) seconds for steps ``skip``..end."""
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, SCHEDULE, max_steps=steps)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    model.train()
    start = (0.0, 0.0)
    for i, b in enumerate(DataLoader(Repeat(batch, steps), batch_size=None)):
        if i == skip:
            harness.sync(device)
            start = (time.perf_counter(), time.process_time())
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with amp:
            loss = model(b["input_ids"], labels=b["labels"], return_logits=False).loss  # as the training step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    harness.sync(device)
    return time.perf_counter() - start[0], time.process_time() - start[1]


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = harness.cli_args(__doc__.splitlines()[0], argv)
    log, device, env = harness.start("lightning", args)
    shape = Shape.from_args(args, device)
    cuda = device.type == "cuda"
    precision = "bf16-mixed" if cuda else "32-true"
    steps, skip = (6, 2) if args.quick else (30, 5) if cuda else (12, 2)
    reps = args.rounds or (1 if args.quick else 3)
    model = build_composed(shape, device)
    ids = random_batch(shape, torch.device("cpu"))
    batch = {"input_ids": ids, "labels": ids.clone()}
    log(f"{shape.describe()}, {precision}, {steps} steps x {reps} runs each (timing after step {skip})")
    per_step: dict[str, dict[str, list[float]]] = {
        "lightning": {"wall": [], "cpu": []},
        "bare": {"wall": [], "cpu": []},
    }
    reads: dict[str, int] = {}
    sync_warnings = quiet = 0
    with tempfile.TemporaryDirectory() as root:
        for rep in range(reps):
            clock = lightning_run(model, batch, steps, skip, device, precision, root)
            n = steps - skip
            per_step["lightning"]["wall"].append((clock.end[0] - clock.start[0]) / n)
            per_step["lightning"]["cpu"].append((clock.end[1] - clock.start[1]) / n)
            for k, v in clock.reads.items():
                reads[k] = reads.get(k, 0) + v
            sync_warnings += clock.sync_warnings
            quiet += clock.quiet_steps
            wall, cpu = bare_run(model, batch, steps, skip, device, precision)
            per_step["bare"]["wall"].append(wall / n)
            per_step["bare"]["cpu"].append(cpu / n)
            log(
                f"run {rep + 1}/{reps}: lightning {per_step['lightning']['wall'][-1] * 1e3:.0f} ms/step, "
                f"bare {per_step['bare']['wall'][-1] * 1e3:.0f} ms/step (wall)"
            )
    clock_name = "cpu" if harness.uses_cpu_time(device) else "wall"
    med = {k: statistics.median(v[clock_name]) for k, v in per_step.items()}
    ratio = med["bare"] / med["lightning"]  # Lightning's speed relative to the bare loop
    log(
        f"lightning runs at x{ratio:.3f} the bare loop's speed; host reads inside non-logging steps: {reads or 0}"
        + (f"; sync warnings: {sync_warnings}" if cuda else "")
    )
    what = f"Lightning loop vs bare loop ({shape.describe()}, {precision}; {clock_name} clock)"
    # on CPUs the model checks the token-id range each step (one read; accelerators skip it)
    allowed = 0.0 if cuda else 1.0
    rows = [
        harness.row(env, what, "Lightning / bare loop speed", ratio, 0.95),
        harness.row(
            env,
            what,
            "host reads (.item/float/int/bool/tolist) per non-logging step"
            + ("" if cuda else " (CPU: 1 = the id-range check)"),
            sum(reads.values()) / max(1, quiet),
            allowed,
            higher_is_better=False,
        ),
    ]
    if cuda:
        rows.append(
            harness.row(
                env,
                what,
                "CUDA sync warnings (set_sync_debug_mode) in non-logging steps",
                sync_warnings,
                0.0,
                higher_is_better=False,
                fmt="{:.0f}",
            )
        )
    result = {
        "env": env,
        "shape": shape.__dict__,
        "precision": precision,
        "per_step_s": per_step,
        "medians_s": med,
        "ratio": ratio,
        "host_reads": reads,
        "quiet_steps": quiet,
        "sync_warnings": sync_warnings,
        "rows": rows,
    }
    return harness.finish("lightning", result, rows, args)


if __name__ == "__main__":
    run()
