"""``report.png`` of ``composer-report``: the curves of each configuration and its sort metric.

    fig = figure(series, metric="best_val_loss", maximize=False)   # a matplotlib Figure (None: nothing to draw)
    write_figure(path, series, metric, maximize)                   # report.png, atomically

One panel per validation metric (``val_loss``, ``val_accuracy``): per configuration the mean over
seeds as a line and the min..max over seeds as a band. A curve of a single point (a run that
validated once, as short sweeps do) is drawn as a marker with its min..max as an error bar, and
the panel says so; when validation is that sparse the training loss (every log interval, from
metrics.csv) gets a panel too, so the figure still shows how training went. The last panel shows
the sort metric per configuration as a point with its std over seeds on an axis fitted to the
values (not from zero: the differences between configurations are what it is for).

matplotlib is imported only when a figure is made (about a second).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .weights import atomic_path

# (steps, mean, min, max) of a metric over the seeds of a configuration
Band = tuple[list[int], list[float], list[float], list[float]]
CURVES = ("val_loss", "val_accuracy")
SPARSE = 3  # fewer validations than this per configuration: the training loss is drawn too


@dataclass
class Series:
    """One configuration of the sweep as the figure draws it."""

    label: str
    curves: dict[str, Band] = field(default_factory=dict)  # metric -> band ("val_loss", "train_loss", ...)
    stat: Optional[tuple[float, Optional[float]]] = None  # the sort metric: mean, std over seeds (None: one seed)


def band(curves: list[dict[str, list[tuple[int, float]]]], key: str) -> Optional[Band]:
    """(steps, mean, min, max) of ``key`` over the runs' curves (``{metric: [(step, value), ...]}``) that have it."""
    by_step: dict[int, list[float]] = {}
    for run in curves:
        for step, value in run.get(key, []):
            by_step.setdefault(step, []).append(value)
    if not by_step:
        return None
    steps = sorted(by_step)
    return (
        steps,
        [statistics.fmean(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def panels(series: list[Series]) -> list[str]:
    """The curve panels to draw, in order (``train_loss`` first when validation is sparse)."""
    keys = [k for k in CURVES if any(k in s.curves for s in series)]
    points = max((len(s.curves["val_loss"][0]) for s in series if "val_loss" in s.curves), default=0)
    if points < SPARSE and any("train_loss" in s.curves for s in series):
        keys.insert(0, "train_loss")
    return keys


def _draw_curve(ax: Any, band: Band, color: Any, label: str) -> None:
    steps, mean, low, high = band
    if len(steps) == 1:  # one point: a marker, its spread as an error bar (a line of one point is invisible)
        yerr = [[mean[0] - low[0]], [high[0] - mean[0]]]
        ax.errorbar(steps, mean, yerr=yerr, fmt="o", color=color, label=f"{label} (1 point)", capsize=3, markersize=6)
        return
    ax.plot(steps, mean, color=color, label=label, linewidth=1.6, marker="o" if len(steps) <= 12 else None)
    ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)


def _curve_panel(ax: Any, key: str, series: list[Series], colors: list[Any]) -> None:
    single = True
    for s, color in zip(series, colors, strict=True):
        band = s.curves.get(key)
        if band is None:
            continue
        single = single and len(band[0]) == 1
        _draw_curve(ax, band, color, s.label)
    what = "train_loss (every log interval: validation is sparse)" if key == "train_loss" else key
    if single:
        note = "one validation per run: a point, bar min..max" if key != "train_loss" else "one point per run"
    else:
        note = "mean over seeds, band: min..max"
    ax.set(xlabel="optimizer step", ylabel=key)
    ax.set_title(f"{what}\n({note})", fontsize=9)
    ax.grid(alpha=0.3)


def fitted_limits(values: list[float], errors: list[float]) -> tuple[float, float]:
    """An axis range that shows the differences between ``values`` (± ``errors``), not from zero."""
    low = min(v - e for v, e in zip(values, errors, strict=True))
    high = max(v + e for v, e in zip(values, errors, strict=True))
    span = high - low or abs(high) * 0.05 or 1.0
    return low - 0.3 * span, high + 0.3 * span


def _metric_panel(ax: Any, metric: str, series: list[Series], colors: list[Any], maximize: bool) -> None:
    drawn = [(s, c) for s, c in zip(series, colors, strict=True) if s.stat is not None]
    means = [s.stat[0] for s, _ in drawn]
    errors = [s.stat[1] or 0.0 for s, _ in drawn]
    y = list(range(len(drawn)))
    for i, ((_, color), mean, err) in enumerate(zip(drawn, means, errors, strict=True)):
        ax.errorbar([mean], [i], xerr=[err] if err else None, fmt="o", color=color, capsize=4, markersize=7)
        text = f"{mean:.4g}" + (f" ± {err:.2g}" if err else "")
        ax.annotate(text, (mean, i), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xlim(*fitted_limits(means, errors))
    ax.set_yticks(y, [s.label for s, _ in drawn], fontsize=7)
    ax.set_ylim(len(drawn) - 0.5, -0.5)  # best on top
    better = "higher" if maximize else "lower"
    ax.set_xlabel(f"{metric} ({better} is better; axis fitted to the values)")
    ax.set_title(f"{metric}\n(mean ± std over seeds)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def figure(series: list[Series], metric: str, maximize: bool) -> Any:
    """The report's matplotlib Figure; None when there is nothing to draw yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # late: matplotlib takes ~1 s; only the figure needs it
    from matplotlib.figure import Figure  # late: matplotlib takes ~1 s; only the figure needs it

    keys = panels(series)
    with_metric = any(s.stat is not None for s in series)
    if not keys:
        return None
    count = len(keys) + (1 if with_metric else 0)
    fig = Figure(figsize=(5.5 * count, 4.2 + 0.18 * len(series)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, count, squeeze=False)[0]
    colors = palette(len(series))
    for ax, key in zip(axes, keys, strict=False):
        _curve_panel(ax, key, series, colors)
    axes[0].legend(fontsize=7, loc="best")
    if with_metric:
        _metric_panel(axes[-1], metric, series, colors, maximize)
    return fig


def write_figure(path: Path, series: list[Series], metric: str, maximize: bool) -> bool:
    """Write report.png; False (nothing written) when no run has logged a curve yet."""
    fig = figure(series, metric, maximize)
    if fig is None:
        return False
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True


def palette(n: int) -> list[Any]:
    from matplotlib import colormaps  # late: matplotlib takes ~1 s; only the figure needs it

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


__all__ = ["Band", "Series", "band", "figure", "fitted_limits", "palette", "panels", "write_figure"]
