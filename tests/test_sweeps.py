"""Sweeps end to end: basic multirun + composer-report, a failing job, the Optuna example, the
submitit_local and joblib launchers, and the documented SLURM launcher config (composed, not run)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from test_train_helpers import TINY, one_thread, train_cli

from composer.cli import run
from composer.report import main_ as report_main
from composer.train import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*declarative_base:DeprecationWarning"),
]  # optuna
QUIET = [*TINY, "callbacks.summary=false", "callbacks.checkpoint.enabled=false"]
PNG = b"\x89PNG\r\n\x1a\n"


def report_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run(report_main, argv)  # what the composer-report script does
    out = capsys.readouterr()
    return code, out.out, out.err


def records(sweep: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- basic sweeper
@pytest.fixture(scope="module")
def attention_sweep(tmp_path_factory) -> Path:
    """``composer-train -m model/attention=mha,mqa seed=1,2`` on the tiny config (4 runs)."""
    sweep = tmp_path_factory.mktemp("sweep") / "attention"
    with one_thread():
        main(["-m", *QUIET, "model/attention=mha,mqa", "seed=1,2", f"hydra.sweep.dir={sweep}"])
    return sweep


def test_multirun_writes_a_record_per_combination(attention_sweep):
    runs = records(attention_sweep)
    assert sorted(runs) == [0, 1, 2, 3]
    combos = {(next(o for o in r["overrides"] if o.startswith("model/attention=")), r["seed"]) for r in runs.values()}
    assert combos == {
        ("model/attention=mha", 1),
        ("model/attention=mha", 2),
        ("model/attention=mqa", 1),
        ("model/attention=mqa", 2),
    }
    assert all(r["status"] == "completed" and r["steps"] == 6 for r in runs.values())
    assert all(r["peak_rss_mb"] >= r["start_rss_mb"] > 0 for r in runs.values())  # Linux: per-run peak
    assert len({r["params"] for r in runs.values()}) == 2  # mqa has fewer key/value weights than mha


def test_report_has_one_row_per_configuration_with_mean_and_std_over_seeds(attention_sweep, capsys):
    code, out, _ = report_cli([str(attention_sweep)], capsys)
    assert code == 0
    rows = csv_rows(attention_sweep / "report.csv")
    assert [r["model/attention"] for r in rows] != [] and len(rows) == 2
    runs = records(attention_sweep).values()
    for row in rows:
        mine = [r for r in runs if f"model/attention={row['model/attention']}" in r["overrides"]]
        losses = [r["best_val_loss"] for r in mine]
        assert len(mine) == 2 and row["completed"] == "2" and row["seeds"] == "1 2"
        assert float(row["best_val_loss_mean"]) == pytest.approx(statistics.fmean(losses))
        assert float(row["best_val_loss_std"]) == pytest.approx(statistics.stdev(losses))
        assert float(row["tokens_per_s_mean"]) > 0 and float(row["wall_s_mean"]) > 0
        assert int(row["params"]) == mine[0]["params"]
    means = [float(r["best_val_loss_mean"]) for r in rows]
    assert means == sorted(means)  # sorted by optimized_metric (best_val_loss: lower first)

    md = (attention_sweep / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and "model/attention" in table[0] and "best val_loss *" in table[0]
    assert all(" ± " in line for line in table[1:])
    assert "4 of 4 runs completed" in md and "Not completed" not in md
    assert "mha" in out and "mqa" in out and "±" in out and "peak RSS MiB" in out  # the table on the terminal

    png = attention_sweep / "report.png"
    assert png.read_bytes()[:8] == PNG
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600


def test_a_failing_run_is_recorded_and_reported_while_the_others_complete(tmp_path, capsys):
    """6 recall pairs do not fit in 16 tokens (the data module finds it when the job runs): that job
    fails, the sweep goes on, and composer-train exits 1 naming it."""
    sweep = tmp_path / "failing"
    args = [o for o in QUIET if not o.startswith("data.num_pairs=")]
    code, _, err = train_cli(["-m", *args, "data.num_pairs=4,6", "seed=1", f"hydra.sweep.dir={sweep}"], capsys)
    assert code == 1 and "error in job 1" in err and "1 of 2 jobs of the sweep did not complete" in err
    runs = records(sweep)
    assert runs[0]["status"] == "completed"
    assert runs[1]["status"] == "failed" and "data.seq_len" in runs[1]["error"]

    code, out, _ = report_cli([str(sweep)], capsys)
    assert code == 0
    md = (sweep / "report.md").read_text()
    assert "1 of 2 runs completed" in md and "## Not completed" in md
    failed = [line for line in md.splitlines() if line.startswith("- job 1")]
    assert len(failed) == 1 and "data.num_pairs=6" in failed[0] and "failed" in failed[0]
    assert "too short for 6 pairs" in failed[0]  # the error itself
    assert "job 1" in out and "failed" in out
    rows = {r["data.num_pairs"]: r for r in csv_rows(sweep / "report.csv")}
    assert rows["4"]["completed"] == "1" and rows["6"]["completed"] == "0" and rows["6"]["failed"] == "1"
    assert (sweep / "report.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- Optuna
def test_optuna_example_runs_three_trials_and_survives_a_failed_one(tmp_path, capsys):
    """hparams_search=recall_lr_width with 3 heads: the widths 64 and 128 the sampler proposes
    (seeded) do not divide into 3 heads, so those trials fail; the search goes on and reports."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    args = [o for o in QUIET if not o.startswith(("model.hidden_size=", "model.num_heads="))]  # the sweeper's
    code, _, err = train_cli(
        [
            "hparams_search=recall_lr_width",
            *args,
            "model.num_heads=3",
            "hydra.sweeper.n_trials=3",
            f"hydra.sweep.dir={sweep}",
        ],
        capsys,
    )
    assert code == 0, err
    runs = records(sweep)
    assert sorted(runs) == [0, 1, 2]
    assert {r["status"] for r in runs.values()} == {"completed", "failed"}
    for r in runs.values():
        width = int(next(o for o in r["overrides"] if o.startswith("model.hidden_size=")).split("=")[1])
        assert (r["status"] == "completed") == (width % 3 == 0), r["error"]
    lrs = {next(o for o in r["overrides"] if o.startswith("optim.lr=")) for r in runs.values()}
    assert len(lrs) == 3  # the sampler proposed a learning rate per trial
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    accuracies = [r["best_val_accuracy"] for r in runs.values() if r["status"] == "completed"]
    assert results["best_value"] == pytest.approx(max(accuracies))  # direction: maximize

    code, _, _ = report_cli([str(sweep)], capsys)
    assert code == 0
    rows = csv_rows(sweep / "report.csv")
    assert len(rows) == 3 and {"optim.lr", "model.hidden_size"} <= set(rows[0])
    assert rows[0]["completed"] == "1" and float(rows[0]["best_val_accuracy_mean"]) == pytest.approx(max(accuracies))
    md = (sweep / "report.md").read_text()
    assert "Optuna best value" in md and f"{len(accuracies)} of 3 runs completed" in md
    assert "is not divisible by num_heads=3" in md  # why the failed trials failed


def test_optimized_metric_must_be_a_metrics_value(tmp_path, capsys):
    code, _, err = train_cli([*QUIET, "optimized_metric=val_acc", f"hydra.run.dir={tmp_path}/run"], capsys)
    assert code == 2 and "optimized_metric" in err and "best_val_accuracy" in err


# ----------------------------------------------------------------------------- launchers
def test_submitit_local_launcher_runs_two_jobs(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "submitit"
    code, _, err = train_cli(
        [
            "-m",
            *QUIET,
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        capsys,
    )
    assert code == 0, err
    runs = records(sweep)
    assert sorted(runs) == [0, 1] and sorted(r["seed"] for r in runs.values()) == [1, 2]
    assert all(r["status"] == "completed" for r in runs.values())
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # each job ran in its own process, through submitit
    code, _, _ = report_cli([str(sweep)], capsys)
    assert code == 0 and len(csv_rows(sweep / "report.csv")) == 1  # one configuration, 2 seeds


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "joblib"
    code, _, err = train_cli(
        ["-m", *QUIET, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", f"hydra.sweep.dir={sweep}"],
        capsys,
    )
    assert code == 0, err
    runs = records(sweep)
    assert sorted(runs) == [0, 1] and all(r["status"] == "completed" for r in runs.values())
    assert runs[0]["val_loss"] != runs[1]["val_loss"]


def test_slurm_launcher_config_composes_into_an_sbatch_script(tmp_path, monkeypatch):
    """hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml) follows the trainer's shape; submitit
    turns it into the sbatch script it would submit (a stand-in srun: no cluster here)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from composer.config import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose(
            "train",
            [
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "trainer=ddp",
                "trainer.devices=4",
                "trainer.num_nodes=2",
            ],
            return_hydra_config=True,
        )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (2, 4, 4)

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    # what the launcher does before submitting (hydra_submitit_launcher.submitit_launcher.launch)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=str(tmp_path / "logs"), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in ("_target_", "submitit_folder")}
    )
    script = executor._executor._make_submission_file_text("composer-train", "0")
    for line in (
        "--partition=gpu",
        "--nodes=2",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--time=240",
        "--cpus-per-task=8",
    ):
        assert f"#SBATCH {line}\n" in script, line


def test_ddp_jobs_need_a_launcher_whose_command_lightning_can_rerun():
    from omegaconf import OmegaConf

    from composer.errors import ConfigError
    from composer.train import check_launcher

    ddp2 = OmegaConf.create({"strategy": "ddp", "devices": 2})
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
    local = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"}
    for launcher in (joblib, local):
        with pytest.raises(ConfigError, match="hydra.launcher") as info:
            check_launcher(ddp2, OmegaConf.create(launcher))
        assert "trainer.devices=1" in str(info.value)
    check_launcher(ddp2, OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}))
    check_launcher(
        ddp2, OmegaConf.create({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"})
    )  # SLURM starts every rank itself
    check_launcher(OmegaConf.create({"strategy": "ddp", "devices": [3]}), OmegaConf.create(joblib))
    check_launcher(OmegaConf.create({"strategy": "auto", "devices": 2}), OmegaConf.create(local))


def test_a_job_that_fails_before_its_run_is_recorded_as_failed(tmp_path, capsys):
    """A sweep job stopped before train() (e.g. by check_launcher) still gets a metrics.json: status,
    error, overrides, seed and error_type, as composer-report reads them; an existing one is kept."""
    from types import SimpleNamespace

    from composer.errors import ConfigError
    from composer.train import _job_failed

    hc = SimpleNamespace(job=SimpleNamespace(num=3), runtime=SimpleNamespace(output_dir=str(tmp_path)))
    _job_failed(ConfigError("no launcher"), hc, ["seed=2"], 2)
    assert "error in job 3 (seed=2)" in capsys.readouterr().err
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record == {
        "status": "failed",
        "error": "invalid configuration: no launcher",
        "overrides": ["seed=2"],
        "seed": 2,
        "error_type": "ConfigError",
    }
    _job_failed(ValueError("later"), hc, ["seed=2"], 2)  # train() wrote its own record: left alone
    assert json.loads((tmp_path / "metrics.json").read_text()) == record
