"""``composer-report <sweep dir>``: one table and one figure for a Hydra multirun folder.

    composer-train -m model/attention=mha,gqa,mqa seed=1,2,3 hydra.sweep.dir=multirun/mixers
    composer-report multirun/mixers

Reads every run of the sweep (each job folder's ``.hydra/``, ``metrics.json`` and ``metrics.csv``;
Optuna's ``optimization_results.yaml`` when present) and writes into the sweep folder:

- ``report.md``:  the table (one row per distinct configuration, mean ± std over seeds), the best
  Optuna trial, and the runs that failed (with their error) or are missing / unfinished;
- ``report.csv``: the same table with the mean and the std of each metric in separate columns;
- ``report.png``: validation curves per configuration (line: mean over seeds, band: min..max;
  a single validation is a point) with the training loss when validation is sparse, and the
  optimized metric per configuration (std over seeds) on an axis fitted to the values
  (:mod:`composer.report_figure`).

A configuration is a run's overrides without ``seed``; the columns are the overrides whose value
differs between runs (or that the sweep command swept). Rows are sorted by ``optimized_metric``
(the runs' config; Optuna's direction, else smaller is better for losses). The table is printed
to the terminal too. A sweep that is still running or partly failed is reported as it stands; a
run whose metrics.json is not what composer-train writes (a field of the wrong type) is listed as
invalid, with the file and the field, and left out of the table. Errors (not a folder, no runs in
it) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from rich.console import Console
from rich.table import Table

from .cli import run as run_tool
from .errors import ConfigError, Problem
from .report_figure import Series, band, write_figure
from .weights import atomic_write

# (metrics.json key, column title); a column appears when some run has the value
METRICS = (
    ("val_loss", "final val_loss"),
    ("best_val_loss", "best val_loss"),
    ("val_accuracy", "final val_accuracy"),
    ("best_val_accuracy", "best val_accuracy"),
)
MAXIMIZED = ("val_accuracy", "best_val_accuracy", "tokens_per_s")
# (key, column title): peak memory, shown when some run recorded it; rss_growth_mb = peak - start
MEMORY = (("peak_rss_mb", "peak RSS MiB"), ("rss_growth_mb", "RSS growth MiB"), ("peak_gpu_mb", "peak GPU MiB"))
TRAILING = (("tokens_per_s", "tokens/s"), ("wall_s", "wall s"))  # columns after the metrics: means only
SKIP_DIRS = {".hydra", ".submitit", "checkpoints", "model", "tensorboard", "__pycache__"}


# ----------------------------------------------------------------------------- reading
@dataclass
class Run:
    """One job folder of the sweep. ``status``: completed | failed | interrupted | unfinished (no
    metrics.json) | invalid (a metrics.json composer-train did not write: skipped)."""

    path: Path
    num: Optional[int]
    overrides: list[str]
    status: str  # completed | failed | interrupted | unfinished | invalid
    error: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    optimized_metric: Optional[str] = None

    @property
    def seed(self) -> Optional[str]:
        seed = self.metrics.get("seed")  # the run's own record (also when seed was left at its default)
        return str(seed) if seed is not None else parse_overrides(self.overrides).get("seed")


def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``["+model.x=1", "seed=2"]`` -> ``{"model.x": "1", "seed": "2"}`` (``~key`` -> ``{"key": "~"}``)."""
    out = {}
    for item in overrides:
        key, eq, value = str(item).partition("=")
        if key.startswith("~"):
            out[key[1:]] = "~"
        elif eq:
            out[key.lstrip("+")] = value
    return out


def read_curves(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Validation and training rows of a run's metrics.csv: ``{"val_loss": [(step, value), ...],
    "val_accuracy": ..., "train_loss": ...}``.

    Lightning's CSV ``step`` is the 0-based index of the step's batch; +1 gives steps done (as in
    metrics.json's history). A file cut mid-write (a running job) yields the complete rows.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    try:
        rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    except (OSError, csv.Error, UnicodeDecodeError):
        return curves
    for row in rows:
        for key in ("val_loss", "val_accuracy", "train_loss"):
            try:
                value, step = float(row.get(key) or "nan"), int(float(row.get("step") or "nan"))
            except ValueError:
                continue
            if math.isfinite(value):
                curves.setdefault(key, []).append((step + 1, value))
    return curves


def _job_dirs(sweep: Path) -> list[Path]:
    """Folders under ``sweep`` that hold a run (``.hydra/overrides.yaml`` or ``metrics.json``)."""
    found, stack = [], [sweep]
    while stack:
        folder = stack.pop()
        is_run = (folder / ".hydra" / "overrides.yaml").is_file() or (folder / "metrics.json").is_file()
        if folder != sweep and is_run:
            found.append(folder)
            continue
        stack.extend(
            p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP_DIRS and not p.name.startswith(".")
        )
    return found


# metrics.json fields the report reads, with the types composer-train writes
NUMBER_FIELDS = ("val_loss", "best_val_loss", "val_accuracy", "best_val_accuracy", "val_ppl", "params",
                 "tokens_per_s", "wall_s", "steps", "tokens", "peak_rss_mb", "start_rss_mb", "peak_gpu_mb")  # fmt: skip


def _invalid_field(record: Any) -> Optional[str]:
    """What is wrong with a metrics.json's contents (None: it reads as composer-train writes it)."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    for key, kinds in (("status", (str,)), ("error", (str, type(None))), ("overrides", (list,))):
        if key in record and not isinstance(record[key], kinds):
            return f"field {key!r} is {record[key]!r} ({type(record[key]).__name__})"
    if not all(isinstance(o, str) for o in record.get("overrides") or []):
        return "field 'overrides' holds something other than strings"
    for key in NUMBER_FIELDS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"field {key!r} is {value!r} ({type(value).__name__}), not a number"
    if (
        record.get("seed") is not None
        and not isinstance(record["seed"], (int, str))
        or isinstance(record.get("seed"), bool)
    ):
        return f"field 'seed' is {record['seed']!r}"
    return None


def _read_record(path: Path) -> tuple[dict, Optional[str]]:
    """(metrics.json's contents, why it is skipped or None); ({}, None) when there is none."""
    if not path.is_file():
        return {}, None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{path}: unreadable ({type(exc).__name__}); skipped"
    problem = _invalid_field(record)
    if problem is not None:
        return {}, f"{path}: {problem}; skipped (not a metrics.json as composer-train writes it)"
    return record, None


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def read_run(folder: Path) -> Run:
    record, invalid = _read_record(folder / "metrics.json")
    overrides = record.get("overrides") or _yaml(folder / ".hydra" / "overrides.yaml") or []
    overrides = overrides if isinstance(overrides, list) else []
    num = _dig(_yaml(folder / ".hydra" / "hydra.yaml"), "hydra", "job", "num")
    if not isinstance(num, int) or isinstance(num, bool):
        num = int(folder.name) if folder.name.isdigit() else None
    optimized = _dig(_yaml(folder / ".hydra" / "config.yaml"), "optimized_metric")
    status, error = record.get("status") or "unfinished", record.get("error")
    if invalid is not None:
        status, error = "invalid", invalid
    elif status not in ("completed", "failed", "interrupted"):
        status, error = "unfinished", "no metrics.json yet: still running, or stopped before it finished"
    return Run(
        path=folder,
        num=num,
        overrides=[str(o) for o in overrides],
        status=status,
        error=error,
        metrics=record,
        curves=read_curves(folder / "metrics.csv"),
        optimized_metric=optimized if isinstance(optimized, str) else None,
    )


@dataclass
class Sweep:
    """A multirun folder: its runs, the jobs it should have, the sweep's own settings."""

    path: Path
    runs: list[Run]
    swept: list[str]  # override keys shown as columns (seed excluded)
    expected: Optional[int]  # jobs the sweep launches (None: unknown)
    metric: str  # the sort metric
    maximize: bool
    optuna: Optional[dict] = None  # optimization_results.yaml

    @property
    def missing(self) -> list[int]:
        if self.expected is None:
            return []
        have = {r.num for r in self.runs}
        return [i for i in range(self.expected) if i not in have]


def _sweep_settings(hydra_cfg: dict, whole_sweep: bool) -> tuple[list[str], Optional[int], Optional[str]]:
    """(swept keys, expected number of jobs, Optuna's direction) from the ``hydra`` node of the
    sweep's multirun.yaml (``whole_sweep``) or, where the sweeper writes none (Optuna), of a job's
    .hydra/hydra.yaml (whose task overrides are that job's values: no sweep syntax in them)."""
    task = _dig(hydra_cfg, "overrides", "task") if whole_sweep else []
    task = [str(t) for t in task] if isinstance(task, list) else []
    sweeper = _dig(hydra_cfg, "sweeper")
    sweeper = sweeper if isinstance(sweeper, dict) else {}
    target = str(sweeper.get("_target_", ""))
    params = sweeper.get("params") or {}
    keys, expected = [], 1
    try:
        parsed = OverridesParser.create().parse_overrides([*task, *(f"{k}={v}" for k, v in params.items())])
    except HydraException:
        return [], None, None
    for o in parsed:
        if not o.is_sweep_override():
            continue
        keys.append(o.get_key_element().lstrip("+"))
        if expected is not None and (o.is_choice_sweep() or o.is_range_sweep()):
            expected *= len(list(o.sweep_string_iterator()))
        else:
            expected = None  # interval(...) / glob(...): the sweeper decides (Optuna: n_trials)
    direction = None
    if "optuna" in target.lower():
        expected = sweeper.get("n_trials")
        direction = sweeper.get("direction")
        direction = direction[0] if isinstance(direction, list) else direction
    elif not whole_sweep or (target and "BasicSweeper" not in target):
        expected = None  # unknown here, or another sweeper's own business
    return [k for k in keys if k != "seed"], expected if isinstance(expected, int) else None, direction


def read_sweep(path: str | Path, metric: Optional[str] = None) -> Sweep:
    """Every run under the multirun folder ``path``; ConfigError when it is not one."""
    sweep = Path(path)
    if not sweep.is_dir():
        raise ConfigError(
            [
                Problem(
                    "sweep_dir",
                    f"{sweep} is not a folder",
                    "pass a multirun folder, e.g. multirun/<date>/<time> (hydra.sweep.dir)",
                )
            ],
            header="invalid composer-report argument",
        )
    runs = sorted(
        (read_run(f) for f in _job_dirs(sweep)),
        key=lambda r: (r.num is None, r.num if r.num is not None else 0, str(r.path)),
    )
    if not runs and ((sweep / ".hydra").is_dir() or (sweep / "metrics.json").is_file()):
        raise ConfigError(
            [
                Problem(
                    "sweep_dir",
                    f"{sweep} is a single run's folder, not a sweep",
                    "pass the folder of a composer-train -m sweep (multirun/<date>/<time>); a single "
                    "run's summary is its metrics.json",
                )
            ],
            header="invalid composer-report argument",
        )
    if not runs:
        raise ConfigError(
            [
                Problem(
                    "sweep_dir",
                    f"{sweep} holds no runs (no job folder with .hydra/ or metrics.json)",
                    "pass the folder composer-train -m wrote (multirun/<date>/<time>) once its first job has started",
                )
            ],
            header="invalid composer-report argument",
        )
    multirun = _yaml(sweep / "multirun.yaml")
    if isinstance(multirun, dict):
        swept, expected, direction = _sweep_settings(_dig(multirun, "hydra"), whole_sweep=True)
    else:
        job = next(
            (_yaml(r.path / ".hydra" / "hydra.yaml") for r in runs if (r.path / ".hydra" / "hydra.yaml").is_file()),
            None,
        )
        swept, expected, direction = _sweep_settings(_dig(job, "hydra"), whole_sweep=False)
    parsed = [parse_overrides(r.overrides) for r in runs]
    order: list[str] = []
    for p in parsed:
        order += [k for k in p if k not in order]
    varying = [k for k in order if k != "seed" and len({p.get(k) for p in parsed}) > 1]
    columns = [k for k in order if k in varying or k in swept] + [k for k in swept if k not in order]
    known = sorted({k for r in runs for k, v in r.metrics.items() if isinstance(v, (int, float))})
    if metric is not None and any(r.status == "completed" for r in runs) and metric not in known:
        raise ConfigError(
            [Problem("--metric", f"no run of {sweep} has {metric!r}", f"use one of {', '.join(known)}")],
            header="invalid composer-report argument",
        )
    optimized = next((r.optimized_metric for r in runs if r.optimized_metric), None) or "best_val_loss"
    metric = metric or optimized
    # the search's direction belongs to its metric; other metrics: higher is better for accuracies
    maximize = direction == "maximize" if direction and metric == optimized else metric in MAXIMIZED
    optuna = _yaml(sweep / "optimization_results.yaml")
    return Sweep(sweep, runs, columns, expected, metric, maximize, optuna if isinstance(optuna, dict) else None)


# ----------------------------------------------------------------------------- the table
@dataclass
class Row:
    """One configuration: its swept values and its runs' statistics."""

    values: dict[str, str]
    runs: list[Run]
    stats: dict[str, tuple[float, Optional[float]]]  # metric -> (mean, std over seeds; None for one seed)

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed"]

    def label(self) -> str:
        return ", ".join(f"{k.split('/')[-1].split('.')[-1]}={_short(v)}" for k, v in self.values.items()) or "all"


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if value.lstrip("-").isdigit() else f"{number:.4g}"


def _stats(values: list[float]) -> Optional[tuple[float, Optional[float]]]:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def build_table(sweep: Sweep) -> list[Row]:
    """One row per configuration (runs grouped by their swept values, seeds pooled), sorted by the
    sweep's metric (best first; configurations without a completed run last)."""
    groups: dict[tuple, list[Run]] = {}
    for run in sweep.runs:
        parsed = parse_overrides(run.overrides)
        groups.setdefault(tuple(parsed.get(k, "") for k in sweep.swept), []).append(run)
    rows = []
    for key, runs in groups.items():
        done = [r for r in runs if r.status == "completed"]
        stats = {}
        for name in (
            *(m for m, _ in METRICS),
            "params",
            "tokens_per_s",
            "wall_s",
            *(m for m, _ in MEMORY),
            sweep.metric,
        ):
            s = _stats([_value(r.metrics, name) for r in done])
            if s is not None:
                stats[name] = s
        rows.append(Row(dict(zip(sweep.swept, key, strict=True)), runs, stats))
    sign = -1.0 if sweep.maximize else 1.0
    rows.sort(key=lambda r: (sweep.metric not in r.stats, sign * r.stats.get(sweep.metric, (0.0, None))[0]))
    return rows


def _value(record: dict, name: str) -> Any:
    if name == "rss_growth_mb":
        peak, start = record.get("peak_rss_mb"), record.get("start_rss_mb")
        return peak - start if isinstance(peak, (int, float)) and isinstance(start, (int, float)) else None
    return record.get(name)


def _fmt(stat: Optional[tuple[float, Optional[float]]], digits: int = 4) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def table_columns(sweep: Sweep, rows: list[Row]) -> list[tuple[str, str]]:
    """(key, title) of the metric columns that some row has (plus the sort metric, unless it is
    one of the trailing throughput, time and memory columns)."""
    metrics = [(k, t) for k, t in METRICS if any(k in r.stats for r in rows)]
    if sweep.metric not in {k for k, _ in (*metrics, *TRAILING, *MEMORY)}:
        metrics.append((sweep.metric, sweep.metric))
    return metrics


def trailing_columns(rows: list[Row]) -> list[tuple[str, str]]:
    """Throughput, time and the memory figures some row recorded."""
    return [*TRAILING, *((k, t) for k, t in MEMORY if any(k in r.stats for r in rows))]


def table_text(sweep: Sweep, rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the human-readable table (report.md and the terminal)."""
    metrics, trailing = table_columns(sweep, rows), trailing_columns(rows)
    header = [
        *sweep.swept,
        "seeds",
        "params",
        *(t + (" *" if k == sweep.metric else "") for k, t in (*metrics, *trailing)),
    ]
    cells = []
    for r in rows:
        seeds = f"{len(r.done)}/{len(r.runs)}"
        params = r.stats.get("params")
        means = [r.stats[k][0] if k in r.stats else None for k, _ in trailing]  # means only
        cells.append(
            [
                *(_short(v) for v in r.values.values()),
                seeds,
                f"{params[0]:,.0f}" if params else "-",
                *(_fmt(r.stats.get(k)) for k, _ in metrics),
                *("-" if m is None else f"{m:,.0f}" if i != 1 else f"{m:.1f}" for i, m in enumerate(means)),
            ]
        )
    return header, cells


def write_csv(sweep: Sweep, rows: list[Row], path: Path) -> None:
    stats = [k for k, _ in (*table_columns(sweep, rows), *trailing_columns(rows))]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            *sweep.swept,
            "runs",
            "completed",
            "failed",
            "seeds",
            "params",
            *(f"{k}_{s}" for k in stats for s in ("mean", "std")),
        ]
    )
    for r in rows:
        params = r.stats.get("params")
        cells = [
            *r.values.values(),
            len(r.runs),
            len(r.done),
            sum(x.status == "failed" for x in r.runs),
            " ".join(str(x.seed) for x in r.done if x.seed is not None),
            int(params[0]) if params else "",
        ]
        for k in stats:
            mean, std = r.stats.get(k, (None, None))
            cells += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
        writer.writerow(cells)
    atomic_write(path, out.getvalue())


def problems_text(sweep: Sweep) -> list[str]:
    """One line per failed / unfinished run and per job that has no folder yet."""
    lines = []
    for r in sweep.runs:
        if r.status != "completed":
            where = f"job {r.num}" if r.num is not None else str(r.path)
            error = " ".join((r.error or "").split())  # one line
            lines.append(
                f"{where} ({' '.join(o for o in r.overrides if _is_swept(o, sweep))}) {r.status}: "
                f"{error[:400] + ' ...' if len(error) > 400 else error}"
            )
    if sweep.missing:
        lines.append(
            f"missing (not started yet, or lost): job{'s' if len(sweep.missing) > 1 else ''} "
            f"{', '.join(map(str, sweep.missing))} of {sweep.expected}"
        )
    return lines


def _is_swept(override: str, sweep: Sweep) -> bool:
    key = override.partition("=")[0].lstrip("+~")
    return key in sweep.swept or key == "seed"


def write_markdown(sweep: Sweep, rows: list[Row], path: Path, figure: Optional[Path]) -> None:
    header, cells = table_text(sweep, rows)
    done = sum(r.status == "completed" for r in sweep.runs)
    lines = [
        f"# Sweep report: {sweep.path}",
        "",
        f"{done} of {len(sweep.runs) + len(sweep.missing)} runs completed; "
        f"rows sorted by {sweep.metric} ({'higher' if sweep.maximize else 'lower'} is better, marked *); "
        "mean ± std over seeds (sample std, shown with 2+ seeds).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    if sweep.optuna:
        lines += [
            "",
            f"Optuna best value: {sweep.optuna.get('best_value')} with "
            f"{', '.join(f'{k}={v}' for k, v in (sweep.optuna.get('best_params') or {}).items())}",
        ]
    problems = problems_text(sweep)
    if problems:
        lines += ["", "## Not completed", ""] + [f"- {p}" for p in problems]
    if figure is not None:
        lines += ["", f"![validation curves and {sweep.metric}]({figure.name})"]
    atomic_write(path, "\n".join(lines) + "\n")


def print_table(sweep: Sweep, rows: list[Row], console: Any = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 200)  # a log file keeps whole cells
    header, cells = table_text(sweep, rows)
    table = Table(title=f"{sweep.path} (sorted by {sweep.metric}, {'max' if sweep.maximize else 'min'})")
    for i, title in enumerate(header):
        table.add_column(title, justify="left" if i < len(sweep.swept) else "right")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    for line in problems_text(sweep):
        console.print(f"[yellow]{line}[/yellow]", highlight=False)


# ----------------------------------------------------------------------------- the figure
def figure_series(sweep: Sweep, rows: list[Row]) -> list[Series]:
    """The rows as :mod:`composer.report_figure` draws them."""
    series = []
    for row in rows:
        curves = [r.curves for r in row.runs]
        bands = {k: b for k in ("val_loss", "val_accuracy", "train_loss") if (b := band(curves, k)) is not None}
        series.append(Series(row.label(), bands, row.stats.get(sweep.metric)))
    return series


# ----------------------------------------------------------------------------- entry points
def report(sweep_dir: str | Path, metric: Optional[str] = None, plot: bool = True, console: Any = None) -> Sweep:
    """Write report.md / report.csv / report.png into ``sweep_dir`` and print the table."""
    sweep = read_sweep(sweep_dir, metric)
    rows = build_table(sweep)
    figure = sweep.path / "report.png"
    has_figure = plot and write_figure(figure, figure_series(sweep, rows), sweep.metric, sweep.maximize)
    write_csv(sweep, rows, sweep.path / "report.csv")
    write_markdown(sweep, rows, sweep.path / "report.md", figure if has_figure else None)
    print_table(sweep, rows, console)
    return sweep


def main_(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="composer-report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_dir", help="a multirun folder (hydra.sweep.dir), e.g. multirun/<date>/<time>")
    parser.add_argument(
        "--metric", default=None, help="sort by this metrics.json value (default: the runs' optimized_metric)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip report.png")
    args = parser.parse_args(argv)
    report(args.sweep_dir, metric=args.metric, plot=not args.no_plot)
    return 0


def main() -> None:
    """Entry point of ``composer-report``."""
    sys.exit(run_tool(main_))


if __name__ == "__main__":
    main()
