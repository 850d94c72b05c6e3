"""The record of a run: ``metrics.json`` (written atomically) and the closing summary table.

metrics.json keys: ``status`` ("completed" | "failed"), ``error`` (message or null),
``val_loss`` / ``val_ppl`` / ``val_accuracy`` (last validation), ``best_val_loss`` /
``best_val_accuracy``, ``params``, ``tokens``, ``tokens_per_s``, ``wall_s``, ``steps``,
``overrides`` (the command-line overrides), ``history`` (every validation: step and metrics),
``checkpoint_last`` / ``checkpoint_best`` / ``model_dir`` (paths), ``sample``, and the run's
``model``, ``task``, ``metric``, ``precision``, ``world_size``, ``seed``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from .weights import atomic_write

IGNORE_INDEX = -100


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


def write_metrics(run_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write ``run_dir/metrics.json`` atomically; returns its path."""
    path = Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(_clean(dict(record)), indent=2) + "\n")
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
        ("model", f"{record.get('model', '')} ({_fmt(record.get('params'))} parameters)"),
        ("steps", _fmt(record.get("steps"))),
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


def path_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, path) of the files the run wrote: printed below the table, one per line, never wrapped
    (so they can be copied)."""
    return [
        ("last checkpoint", _fmt(record.get("checkpoint_last"))),
        ("best checkpoint", _fmt(record.get("checkpoint_best"))),
        ("exported model", _fmt(record.get("model_dir"))),
    ]


def print_summary(record: Mapping[str, Any], console: Optional[Any] = None) -> None:
    """The closing rich table."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    status = record.get("status", "completed")
    table = Table(title=f"composer-train: {status}", show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for label, value in summary_rows(record):
        table.add_row(label, escape(value))  # values are plain text, not rich markup
    console.print(table)
    for label, path in path_rows(record):
        console.print(f"[bold]{label}:[/bold] {escape(path)}", soft_wrap=True, highlight=False)


__all__ = ["answer_sample", "path_rows", "print_summary", "summary_rows", "write_metrics"]
