"""The record of a run: :class:`RunRecord`, written as ``metrics.json`` (atomically), and the closing
summary table.

metrics.json keys: ``status`` ("running" | "completed" | "failed" | "interrupted"), ``error``
(message or null), ``overrides`` (the command-line overrides), ``seed``, ``run_dir``, ``resumed_from``
(a resumed run: the checkpoint and its step), ``cpu_threads``, ``start_rss_mb``; the run's ``model``,
``params``, ``vocab_size`` and ``preset_vocab_size`` (when the data's vocabulary replaced the
preset's), ``task``, ``metric``, ``seq_len``, ``batch_size``, ``precision``, ``world_size``;
``steps``, ``history`` (every validation: step and metrics), ``val_loss`` / ``val_ppl`` /
``val_accuracy`` (last validation), ``best_val_loss`` / ``best_val_accuracy``, ``tokens``,
``tokens_per_s``, ``checkpoint_last`` / ``checkpoint_best`` (with checkpoints on), ``peak_rss_mb`` /
``peak_gpu_mb``; ``model_dir`` and ``sample`` (completed runs), ``error_type`` (failed and
interrupted runs), ``wall_s``. A key the run did not get to is left out (a run that failed while
reading its data has no ``steps``); a value it reached without one is null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .contract.options import IGNORE_INDEX
from .runlog import to_log_file
from .weights import atomic_write


class _Unset:
    """The value of a :class:`RunRecord` field the run has not reached (false, like a missing key)."""

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()


@dataclass
class RunRecord:
    """One run's metrics.json, filled in by the run as it gets there (fields in the file's order).

    Fields left UNSET are not written; ``None`` is written as null.
    """

    status: str = "running"  # running | completed | failed | interrupted
    error: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    seed: Any = None
    run_dir: str = UNSET
    resumed_from: Optional[dict[str, Any]] = UNSET  # {"checkpoint": path, "step": n}
    # set up: the thread count and the resident set the run starts from (MiB)
    cpu_threads: Optional[int] = UNSET
    start_rss_mb: Optional[float] = UNSET
    # built: the model, the data and the trainer
    model: str = UNSET
    params: int = UNSET
    vocab_size: int = UNSET
    preset_vocab_size: int = UNSET  # when the data's vocabulary replaced the preset's
    task: str = UNSET
    metric: Optional[str] = UNSET
    seq_len: int = UNSET
    batch_size: int = UNSET
    precision: str = UNSET
    world_size: int = UNSET
    # trained (also after a failure during fit)
    steps: int = UNSET
    history: list[dict[str, float]] = UNSET
    val_loss: Optional[float] = UNSET
    val_ppl: Optional[float] = UNSET
    val_accuracy: Optional[float] = UNSET
    best_val_loss: Optional[float] = UNSET
    best_val_accuracy: Optional[float] = UNSET
    tokens: int = UNSET
    tokens_per_s: float = UNSET
    checkpoint_last: Optional[str] = UNSET  # with callbacks.checkpoint enabled
    checkpoint_best: Optional[str] = UNSET
    peak_rss_mb: Optional[float] = UNSET
    peak_gpu_mb: Optional[float] = UNSET
    # finished
    model_dir: str = UNSET  # completed runs
    sample: Optional[str] = UNSET  # completed runs
    error_type: str = UNSET  # failed runs: the exception's class name
    wall_s: float = UNSET

    def to_dict(self) -> dict[str, Any]:
        """The fields the run reached, in metrics.json's order (values as the run set them)."""
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not UNSET}

    def fail(self, exc: BaseException, wall_s: float) -> None:
        """Record ``exc`` as the reason the run failed (a KeyboardInterrupt: it was interrupted)."""
        interrupted = isinstance(exc, KeyboardInterrupt)
        self.status = "interrupted" if interrupted else "failed"
        self.error = str(exc) or ("interrupted (Ctrl-C)" if interrupted else type(exc).__name__)
        self.error_type, self.wall_s = type(exc).__name__, wall_s


def _clean(value: Any) -> Any:
    """JSON-safe: tensors to numbers, non-finite floats to null, paths to strings."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_metrics(run_dir: Path, record: RunRecord) -> Path:
    """Write ``run_dir/metrics.json`` atomically (JSON-safe: non-finite numbers as null); returns its path."""
    path = Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(_clean(record.to_dict()), indent=2) + "\n")
    return path


def _token(tokenizer: Any, i: int) -> str:
    if tokenizer is None:
        return str(i)
    text = tokenizer.decode([i])
    return repr(text) if text.strip() != text or not text else text


@torch.no_grad()
def answer_sample(
    model: Any, batch: Mapping[str, torch.Tensor], tokenizer: Any = None, row: int = 0, limit: int = 12
) -> str:
    """One validation example's predicted vs true answers (positions that carry a label).

    lm task: ``input_ids`` / ``labels`` [B, T]; classification: ``labels`` [B] (``row`` only).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = batch["input_ids"][row : row + 1].to(device)  # [1, T]
    mask = batch.get("attention_mask")
    mask = mask[row : row + 1].to(device) if mask is not None else None
    logits = model(ids, attention_mask=mask).logits
    model.train(was_training)
    labels = batch["labels"][row : row + 1].to(device)
    if logits.dim() == 2:  # classification: [1, K]
        pred, true = int(logits.argmax(-1)), int(labels.reshape(-1)[0])
        return f"predicted class {pred}, true class {true} ({'right' if pred == true else 'wrong'})"
    target = labels[0, 1:]  # position t predicts token t + 1
    pred = logits[0, :-1].argmax(-1)
    where = (target != IGNORE_INDEX).nonzero().flatten().tolist()
    if not where:
        return "no labelled position in this example"
    right = sum(int(pred[i] == target[i]) for i in where)
    parts = []
    for i in where[:limit]:
        p, t = int(pred[i]), int(target[i])
        after = _token(tokenizer, int(ids[0, i]))
        parts.append(
            f"{after}: {_token(tokenizer, p)} ok"
            if p == t
            else f"{after}: {_token(tokenizer, p)} (true {_token(tokenizer, t)})"
        )
    more = f", ... ({len(where) - limit} more)" if len(where) > limit else ""
    return f"{right}/{len(where)} answers right (token before the answer: predicted answer): " + ", ".join(parts) + more


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def summary_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the closing summary."""
    rows = [
        ("model", _model_row(record)),
        ("steps", _steps_row(record)),
        ("final val loss", _fmt(record.get("val_loss"))),
        ("best val loss", _fmt(record.get("best_val_loss"))),
    ]
    if record.get("val_accuracy") is not None:
        kind = record.get("metric") or "accuracy"
        rows += [
            (f"final val {kind}", _fmt(record.get("val_accuracy"))),
            (f"best val {kind}", _fmt(record.get("best_val_accuracy"))),
        ]
    if record.get("val_ppl") is not None:
        rows.append(("val perplexity", _fmt(record.get("val_ppl"), 2)))
    tps = record.get("tokens_per_s")
    rows += [
        ("tokens/s", f"{tps:,.0f}" if isinstance(tps, (int, float)) else "-"),
        ("wall time", f"{record.get('wall_s', 0.0):.1f} s"),
    ]
    if record.get("sample"):
        rows.append(("sample", str(record["sample"])))
    return rows


def _model_row(record: Mapping[str, Any]) -> str:
    text = f"{record.get('model', '')} ({_fmt(record.get('params'))} parameters"
    vocab, preset = record.get("vocab_size"), record.get("preset_vocab_size")
    if isinstance(vocab, int) and isinstance(preset, int) and vocab != preset:
        text += f"; vocabulary {vocab:,} from the data, the preset's is {preset:,}"
    return text + ")"


def _steps_row(record: Mapping[str, Any]) -> str:
    resumed = record.get("resumed_from")
    steps = _fmt(record.get("steps"))
    if isinstance(resumed, Mapping) and isinstance(resumed.get("step"), int):
        return f"{steps} (resumed at step {resumed['step']:,}; tokens/s and wall time: this part)"
    return steps


def path_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, path) of the files the run wrote: printed below the table, one per line, never wrapped
    (so they can be copied)."""
    return [
        ("last checkpoint", _fmt(record.get("checkpoint_last"))),
        ("best checkpoint", _fmt(record.get("checkpoint_best"))),
        ("exported model", _fmt(record.get("model_dir"))),
    ]


def print_summary(record: RunRecord, console: Optional[Any] = None) -> None:
    """The closing rich table."""
    console = console or Console()
    values = record.to_dict()
    table = Table(title=f"composer-train: {record.status}", show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for label, value in summary_rows(values):
        table.add_row(label, escape(value))  # values are plain text, not rich markup
    console.print(table)
    for label, path in path_rows(values):
        console.print(f"[bold]{label}:[/bold] {escape(path)}", soft_wrap=True, highlight=False)
    log_summary(record)


def log_summary(record: RunRecord) -> None:
    """The summary's rows in the run's log file (train.log), one per line."""
    values = record.to_dict()
    to_log_file(f"composer-train: {record.status}")
    for label, value in (*summary_rows(values), *path_rows(values)):
        to_log_file(f"{label}: {value}")


__all__ = [
    "UNSET",
    "RunRecord",
    "answer_sample",
    "log_summary",
    "path_rows",
    "print_summary",
    "summary_rows",
    "write_metrics",
]
