"""composer-plan's tables: the per-layer table (identical runs of layers collapsed, the slots that are
the same on every layer stated once in the title) and the summary, printed with rich; ``human`` writes
counts and bytes short (powers of 1000; GiB / MiB / KiB)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .plan import GiB, LayerRow, Plan


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (powers of 1000); bytes with unit='B' use GiB/MiB/KiB."""
    if unit == "B":
        for size, name in ((GiB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
            if abs(n) >= size:
                return f"{n / size:.2f} {name}"
        return f"{int(n)} B"
    for size, name in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.2f}{name}{unit}"
    return f"{n:.0f}{unit}"


_KINDS = ("block", "ffn", "norm", "position")  # stated once in the title where every layer has the same
_CKPT = {"layer": "yes", "none": "no"}  # the ckpt column: is the layer recomputed in backward
# the cost columns: LayerRow field -> header
_COSTS = {
    "params": "params",
    "flops": "FLOPs",
    "activation_bytes": "saved",
    "kv_cache_bytes": "KV",
    "state_bytes": "state",
}


_COMPACT = dict(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, show_footer=True)


def _cell(row: LayerRow, key: str) -> str:
    value = getattr(row, key)
    if key != "params" and not row.planned:
        return "?"
    if key in ("params", "flops"):
        return human(value)
    return human(value, "B") if value else "-"


def _kinds(rows: list[LayerRow], varying: list[str]) -> tuple[dict[tuple, str], list[str]]:
    """A short label per kind of layer (its mixer's type; numbered where kinds share one) and the legend
    lines of the labels that leave something out: the mixer's options and the slots that vary."""
    kinds: dict[tuple, str] = {}
    for r in rows:
        kinds.setdefault((r.attention, *(getattr(r, k) for k in varying)), r.attention.split("(")[0])
    counts = Counter(kinds.values())
    seen: Counter = Counter()
    legend = []
    for kind, name in kinds.items():
        if counts[name] > 1:
            seen[name] += 1
            kinds[kind] = name = f"{name}:{seen[name]}"
        full = ", ".join([kind[0], *(f"{k} {v}" for k, v in zip(varying, kind[1:], strict=True))])
        if full != name:
            legend.append(f"{name} = {full}")
    return kinds, legend


def layer_table(report: Plan) -> Table:
    """The layers as a table that fits 80 columns. Runs of identical layers are collapsed into one row;
    each row names its kind of layer by its mixer's type, and a legend under the table gives each kind in
    full (the mixer's options, and the block, ffn, norm or position where layers differ; one the same on
    every layer is stated once in the title). The ckpt column appears where layers checkpoint differently,
    KV and state where some layer has one. The model-level modules (and a checkpointed layer's
    recomputation) are rows too, so each column adds up to its total (the footer)."""
    rows, m = report.rows, report.memory
    same = {k: getattr(rows[0], k) for k in _KINDS if len({getattr(r, k) for r in rows}) == 1}
    labels, legend = _kinds(rows, [k for k in _KINDS if k not in same])
    ckpt = len({r.checkpointing for r in rows}) > 1
    costs = [k for k in _COSTS if k not in ("kv_cache_bytes", "state_bytes") or any(getattr(r, k) for r in rows)]
    totals = {
        "params": human(report.params_total),
        "flops": human(report.flops_forward_per_token),
        "activation_bytes": human(m.activations, "B"),
        "kv_cache_bytes": human(report.kv_cache_bytes_max - report.recurrent_state_bytes, "B"),
        "state_bytes": human(report.recurrent_state_bytes, "B"),
    }
    title = f"{report.name}: layers" + (f" (all: {', '.join(f'{k} {v}' for k, v in same.items())})" if same else "")
    caption = "\n".join(legend) + "\n" if legend else ""
    caption += (
        f"per layer: FLOPs = forward FLOPs per token; saved = activations kept for backward (batch "
        f"{report.batch_size} x {report.seq_len}, checkpointing {report.checkpointing})"
        + (f"; KV = KV cache of one sequence of {report.seq_len}" if "kv_cache_bytes" in costs else "")
        + ("; state = recurrent + convolution state per sequence" if "state_bytes" in costs else "")
    )
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left", **_COMPACT)
    table.add_column("layer", "total", justify="right", no_wrap=True)
    table.add_column("kind", overflow="fold", min_width=8)  # the one column that gives way (numbers never do)
    if ckpt:
        table.add_column("ckpt", no_wrap=True)
    for k in costs:
        table.add_column(_COSTS[k], totals[k], justify="right", no_wrap=True)
    groups: list[list[LayerRow]] = []
    for row in rows:  # collapse runs of identical layers
        if groups and replace(groups[-1][0], index=row.index) == row:
            groups[-1].append(row)
        else:
            groups.append([row])
    pad = [""] if ckpt else []
    for g in groups:
        r = g[0]
        label = labels[(r.attention, *(getattr(r, k) for k in _KINDS if k not in same))]
        idx = str(r.index) if len(g) == 1 else f"{r.index}-{g[-1].index}"
        mode = [_CKPT.get(r.checkpointing, r.checkpointing)] if ckpt else []
        table.add_row(idx, label, *mode, *(_cell(r, k) for k in costs))
    if report.model_row is not None:
        table.add_row("", "embedding+head", *pad, *(_cell(report.model_row, k) for k in costs))
    if m.recompute:  # a checkpointed layer's activations while it is recomputed in backward
        cells = {"activation_bytes": human(m.recompute, "B")}
        table.add_row("", "recompute", *pad, *(cells.get(k, "") for k in costs))
    return table


def _cache_rows(report: Plan) -> list[tuple[str, str]]:
    """The summary's cache lines: KV cache and recurrent state apart (and their sum) when a model has
    both; a model without recurrent state keeps the two KV-cache lines."""
    state, t = report.recurrent_state_bytes, report.seq_len
    kv = report.kv_cache_bytes_max - state
    rows = [("KV cache / token", human(report.kv_cache_bytes_per_token, "B"))]
    if not state:
        return rows + [(f"KV cache / sequence of {t}", human(kv, "B"))]
    rows += [(f"KV cache / sequence of {t}", human(kv, "B"))] if kv else []
    rows.append(("recurrent state / sequence (any length)", human(state, "B")))
    return rows + ([(f"KV cache + state / sequence of {t}", human(kv + state, "B"))] if kv else [])


def render(report: Plan, console: Any = None) -> None:
    """Print a plan as rich tables."""
    console = console or Console()
    console.print(layer_table(report))

    m = report.memory
    summary = Table(
        title=f"{report.name}: batch {report.batch_size} x seq_len {report.seq_len}, {report.precision}, "
        f"checkpointing {report.checkpointing}",
        title_justify="left",
        show_header=False,
    )
    summary.add_column("what")
    summary.add_column("value", justify="right")
    rows = [
        ("parameters", f"{report.params_total:,} ({human(report.params_total)})"),
        ("  embedding", f"{report.params_embedding:,}"),
        ("  non-embedding", f"{report.params_total - report.params_embedding:,}"),
        ("  trainable", f"{report.params_trainable:,}"),
        ("  active per token", f"{report.params_active:,} ({human(report.params_active)})"),
        ("FLOPs / token, forward", human(report.flops_forward_per_token, "FLOP")),
        ("FLOPs / token, training (3x forward)", human(report.flops_training_per_token, "FLOP")),
        ("FLOPs / token, checkpoint recompute", human(report.flops_recompute_per_token, "FLOP")),
        *_cache_rows(report),
        ("memory: weights", human(m.weights, "B")),
        ("memory: gradients", human(m.gradients, "B")),
        ("memory: AdamW state", human(m.optimizer, "B")),
        ("memory: activations (this setting)", human(m.activations, "B")),
        ("memory: activations, no checkpointing", human(m.activations_no_checkpointing, "B")),
        ("memory: activations, every layer checkpointed", human(m.activations_every_layer, "B")),
        ("memory: transient (logits gradients)", human(m.transient, "B")),
        ("memory: training peak (estimate)", human(m.total, "B")),
    ]
    if report.params_vocab_padding:
        rows.insert(4, ("  vocabulary padding", f"{report.params_vocab_padding:,}"))
    for what, value in rows:
        summary.add_row(what, value)
    console.print(summary)
    for note in report.notes:
        console.print(f"note: {note}")
