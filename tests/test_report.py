"""composer-report on sweep folders laid out as composer-train writes them (written here by hand,
so that running, failed and missing jobs, Optuna results and bad arguments are quick to set up;
tests/test_sweeps.py reports on real sweeps)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import yaml
from test_train_helpers import cli_env

from composer.cli import run
from composer.report import main_ as report_main
from composer.report import parse_overrides, read_curves, read_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(
    sweep: Path,
    num: int,
    overrides: list[str],
    metrics: Optional[dict] = None,
    curve: Optional[list[tuple[int, float, float]]] = None,
    metric: str = "best_val_loss",
    sweeper: Optional[dict] = None,
) -> Path:
    """A job folder: .hydra/ (overrides, job number, config), metrics.csv rows (step, val_loss,
    val_accuracy) and metrics.json (None: the run has not finished)."""
    run = sweep / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra = {"job": {"num": num}, "overrides": {"task": overrides}, "sweeper": sweeper or {}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": metric, "seed": 0}))
    if curve is not None:
        lines = ["epoch,lr,step,tokens_per_s,train_loss,val_accuracy,val_loss,val_ppl"]
        for step, loss, acc in curve:
            lines += [f"0,0.001,{step - 1},1000.0,{loss + 0.1},,,", f"0,,{step - 1},,,{acc},{loss},2.0"]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    if metrics is not None:
        record = {
            "status": "completed",
            "error": None,
            "overrides": overrides,
            "params": 1000,
            "tokens_per_s": 500.0,
            "wall_s": 10.0,
            **metrics,
        }
        (run / "metrics.json").write_text(json.dumps(record))
    return run


def multirun_yaml(sweep: Path, task: list[str], sweeper: Optional[dict] = None) -> None:
    sweeper = sweeper or {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}, "sweeper": sweeper}}))


def report(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run(report_main, argv)  # what the composer-report script does
    out = capsys.readouterr()
    return code, out.out, out.err


def rows(sweep: Path) -> list[dict]:
    with open(sweep / "report.csv") as f:
        return list(csv.DictReader(f))


def test_overrides_parse_into_keys():
    assert parse_overrides(["+model.x=1", "seed=3", "~trainer.y", "model/attention=gqa", "a=b=c"]) == {
        "model.x": "1",
        "seed": "3",
        "trainer.y": "~",
        "model/attention": "gqa",
        "a": "b=c",
    }


def test_mean_and_std_over_seeds_and_the_sort(tmp_path, capsys):
    sweep = tmp_path / "s"  # no multirun.yaml: the columns are the overrides that differ
    losses = {"a": [1.0, 2.0, 3.0], "b": [0.5, 0.7, 0.9]}
    num = 0
    for name, values in losses.items():
        for seed, loss in enumerate(values, 1):
            make_run(
                sweep,
                num,
                [f"model/attention={name}", "trainer.max_steps=6", f"seed={seed}"],
                {"val_loss": loss + 0.5, "best_val_loss": loss, "best_val_accuracy": loss / 10},
                curve=[(3, loss + 1, 0.1), (6, loss, 0.2)],
            )
            num += 1
    code, out, _ = report([str(sweep)], capsys)
    assert code == 0
    table = rows(sweep)
    assert [r["model/attention"] for r in table] == ["b", "a"]  # lower best_val_loss first
    assert "trainer.max_steps" not in table[0]  # the same in every run: not a column
    assert float(table[1]["best_val_loss_mean"]) == pytest.approx(2.0)
    assert float(table[1]["best_val_loss_std"]) == pytest.approx(1.0)  # sample std of 1, 2, 3
    assert float(table[1]["val_loss_mean"]) == pytest.approx(2.5) and table[1]["seeds"] == "1 2 3"
    md = (sweep / "report.md").read_text()
    assert "| a | 3/3 | 1,000 | 2.5000 ± 1.0000 | 2.0000 ± 1.0000 |" in md
    assert "![validation curves" in md and (sweep / "report.png").read_bytes()[:8] == PNG
    lines = out.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("│ b "))) < lines.index(
        next(x for x in lines if x.startswith("│ a "))
    )  # the terminal table, best first

    code, _, _ = report([str(sweep), "--metric", "best_val_accuracy"], capsys)
    assert code == 0 and [r["model/attention"] for r in rows(sweep)] == ["a", "b"]  # accuracy: higher first

    code, _, _ = report([str(sweep), "--metric", "wall_s"], capsys)  # a trailing column: marked, not repeated
    header = next(x for x in (sweep / "report.md").read_text().splitlines() if x.startswith("| model/attention"))
    assert header.count("wall") == 1 and "| wall s * |" in header and code == 0
    assert list(rows(sweep)[0]).count("wall_s_mean") == 1


def test_running_failed_and_missing_jobs_are_named(tmp_path, capsys):
    sweep = tmp_path / "partial"
    sweep.mkdir()
    multirun_yaml(sweep, ["model.hidden_size=32,64", "seed=1,2,3"])  # 6 jobs
    for num, seed in enumerate((1, 2, 3)):
        make_run(
            sweep,
            num,
            ["model.hidden_size=32", f"seed={seed}"],
            {"val_loss": 1.0 + num, "best_val_loss": 1.0},
            curve=[(5, 1.5, 0.3), (10, 1.0 + num, 0.4)],
        )
    make_run(sweep, 3, ["model.hidden_size=64", "seed=1"], curve=[(5, 1.2, 0.5)])  # still running
    failed = make_run(sweep, 4, ["model.hidden_size=64", "seed=2"])
    (failed / "metrics.json").write_text(
        json.dumps(
            {"status": "failed", "error": "CUDA out of memory\nmore", "overrides": ["model.hidden_size=64", "seed=2"]}
        )
    )
    code, out, _ = report([str(sweep)], capsys)
    assert code == 0
    md = (sweep / "report.md").read_text()
    assert "3 of 6 runs completed" in md
    assert "- job 3 (model.hidden_size=64 seed=1) unfinished: no metrics.json yet" in md
    assert "- job 4 (model.hidden_size=64 seed=2) failed: CUDA out of memory more\n" in md  # on one line
    assert "- missing (not started yet, or lost): job 5 of 6" in md
    assert "job 5" in out and "CUDA out of memory" in out
    table = {r["model.hidden_size"]: r for r in rows(sweep)}
    assert table["32"]["completed"] == "3" and table["64"]["completed"] == "0" and table["64"]["failed"] == "1"
    assert table["64"]["best_val_loss_mean"] == ""  # nothing completed: no statistics
    sweep_info = read_sweep(sweep)
    assert sweep_info.expected == 6 and sweep_info.missing == [5]
    # the curves include the running job's first validation
    assert (sweep / "report.png").read_bytes()[:8] == PNG


def test_peak_memory_columns_appear_when_runs_recorded_them(tmp_path, capsys):
    for num, (seed, peak) in enumerate(((1, 900.0), (2, 1100.0))):
        make_run(
            tmp_path,
            num,
            ["trainer.precision=bf16-mixed", f"seed={seed}"],
            {"best_val_loss": 1.0, "peak_rss_mb": peak, "start_rss_mb": 600.0, "peak_gpu_mb": None},
        )
    code, out, _ = report([str(tmp_path)], capsys)
    assert code == 0 and "peak RSS MiB" in out and "peak GPU MiB" not in out  # no run used a GPU
    row = rows(tmp_path)[0]
    assert float(row["peak_rss_mb_mean"]) == pytest.approx(1000.0)
    assert float(row["rss_growth_mb_mean"]) == pytest.approx(400.0)  # peak - start, per run
    assert "| 1,000 | 400 |" in (tmp_path / "report.md").read_text()


def test_curves_come_from_metrics_csv_validation_rows(tmp_path):
    run = make_run(tmp_path, 0, ["seed=1"], curve=[(50, 2.0, 0.3), (100, 1.5, 0.6)])
    with open(run / "metrics.csv", "a") as f:
        f.write("0,,149,,,0.7,1.")  # a row being written by a running job
    curves = read_curves(run / "metrics.csv")
    assert curves["val_loss"][:2] == [(50, 2.0), (100, 1.5)] and curves["val_accuracy"][:2] == [(50, 0.3), (100, 0.6)]


def test_optuna_results_and_direction(tmp_path, capsys):
    """The Optuna sweeper writes no multirun.yaml: its settings come from the jobs' hydra.yaml."""
    sweep = tmp_path / "optuna"
    sweep.mkdir()
    sweeper = {
        "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        "direction": "maximize",
        "n_trials": 3,
        "params": {"optim.lr": "tag(log, interval(1e-4, 1e-2))"},
    }
    (sweep / "optimization_results.yaml").write_text(
        yaml.safe_dump({"name": "optuna", "best_params": {"optim.lr": 0.003}, "best_value": 0.9})
    )
    for num, (lr, acc, loss) in enumerate(((0.001, 0.5, 1.0), (0.003, 0.9, 2.0))):
        make_run(
            sweep,
            num,
            [f"optim.lr={lr}"],
            {"best_val_accuracy": acc, "best_val_loss": loss},
            metric="best_val_accuracy",
            sweeper=sweeper,
        )
    code, _, _ = report([str(sweep), "--metric", "best_val_loss"], capsys)
    assert code == 0 and [r["optim.lr"] for r in rows(sweep)] == ["0.001", "0.003"]  # a loss: lower first
    code, _, _ = report([str(sweep)], capsys)
    assert code == 0
    assert [r["optim.lr"] for r in rows(sweep)] == ["0.003", "0.001"]  # the study's metric and direction
    md = (sweep / "report.md").read_text()
    assert "Optuna best value: 0.9 with optim.lr=0.003" in md and "2 of 3 runs completed" in md
    assert "job 2 of 3" in md  # the third trial has not started
    assert "![" not in md and not (sweep / "report.png").exists()  # no validation curves logged: no figure


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    code, _, err = report([str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "is not a folder" in err and "multirun/<date>/<time>" in err
    code, _, err = report([str(tmp_path)], capsys)
    assert code == 2 and "holds no runs" in err
    single = make_run(tmp_path, 0, ["seed=1"], {"best_val_loss": 1.0})
    code, _, err = report([str(single)], capsys)
    assert code == 2 and "single run's folder, not a sweep" in err
    code, _, err = report([str(tmp_path), "--metric", "bleu"], capsys)
    assert code == 2 and "--metric" in err and "best_val_loss" in err


@pytest.mark.slow
def test_console_script_exits_2_without_traceback(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "composer.report", str(tmp_path / "missing")],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "record, named",
    [
        ({"status": "completed", "val_loss": "low", "overrides": ["seed=2"]}, "'val_loss'"),
        ({"status": 5, "overrides": ["seed=2"]}, "'status'"),
        ({"status": "completed", "overrides": "seed=2"}, "'overrides'"),
        ({"status": "completed", "seed": {"a": 1}, "overrides": []}, "'seed'"),
        (["not", "a", "record"], "JSON list"),
    ],
)
def test_a_metrics_json_with_odd_field_types_is_listed_as_invalid(tmp_path, capsys, record, named):
    make_run(tmp_path, 0, ["seed=1"], {"best_val_loss": 1.0}, curve=[(10, 1.0, 0.5)])
    bad = make_run(tmp_path, 1, ["seed=2"], curve=[(10, 2.0, 0.5)])
    (bad / "metrics.json").write_text(json.dumps(record))
    code, out, err = report([str(tmp_path)], capsys)
    assert code == 0, err
    md = (tmp_path / "report.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith("- job 1"))
    assert "invalid" in line and str(bad / "metrics.json") in line and named in line and "skipped" in line
    assert "1 of 2 runs completed" in md


def _series(tmp_path: Path, points: int):
    from composer.report import build_table, figure_series

    for num, seed in enumerate((1, 2)):
        for attn, offset in (("mha", 0.0), ("gqa", 0.01)):
            curve = [(10 * (i + 1), 2.0 - 0.1 * i + offset + 0.001 * seed, 0.5) for i in range(points)]
            final = curve[-1][1]
            make_run(tmp_path, 2 * num + (attn == "gqa"), [f"model/attention={attn}", f"seed={seed}"],
                     {"best_val_loss": final}, curve=curve)  # fmt: skip
    sweep = read_sweep(tmp_path)
    return sweep, figure_series(sweep, build_table(sweep))


def test_a_sweep_that_validated_once_is_drawn_as_points_with_the_training_loss(tmp_path):
    """One validation per run: markers (a line of one point draws nothing), a training-loss panel,
    the panel saying so; the sort metric on an axis fitted to values 2.00x apart by 0.01."""
    from composer.report_figure import figure

    sweep, series = _series(tmp_path, points=1)
    fig = figure(series, sweep.metric, sweep.maximize)
    train, val, acc, metric = fig.axes
    assert train.get_ylabel() == "train_loss" and val.get_ylabel() == "val_loss"
    assert "one validation per run" in val.get_title()
    drawn = [line for line in val.get_lines() if line.get_marker() == "o"]  # (the error bars' caps are lines too)
    assert len(drawn) == 2 and all(len(line.get_xdata()) == 1 for line in drawn)
    assert all(label.endswith("(1 point)") for label in val.get_legend_handles_labels()[1])
    low, high = metric.get_xlim()
    assert 1.9 < low < 2.0 < high < 2.1  # not from zero: the 0.01 between the two is visible
    assert [t.get_text() for t in metric.get_yticklabels()] == [s.label for s in series]


def test_curves_with_several_validations_are_lines_without_the_training_panel(tmp_path):
    from composer.report_figure import figure

    sweep, series = _series(tmp_path, points=4)
    fig = figure(series, sweep.metric, sweep.maximize)
    assert [ax.get_ylabel() for ax in fig.axes[:2]] == ["val_loss", "val_accuracy"]
    assert "one validation" not in fig.axes[0].get_title()
    assert all(len(line.get_xdata()) == 4 for line in fig.axes[0].get_lines())
