"""The ``composer-train`` command: the run folder, errors, sweeps, kill-and-resume, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_helpers import TINY, cli, cli_env, metrics, run_inprocess, train_cli

from composer.model import ComposedModel

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_main_job_writes_the_whole_run_folder(tmp_path):
    run = tmp_path / "run"
    args = [o for o in TINY if o != "callbacks.progress_bar=none"]  # with the rich progress bar
    res = cli([*args, f"hydra.run.dir={run}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for text in (
        "final val loss",
        "best val loss",
        "answer_accuracy",
        "tokens/s",
        "wall time",
        "exported model",
        "answers right",
    ):
        assert text in res.stdout, text
    # the paths whole on one line each, however long (a table would wrap them): they can be copied
    assert f"last checkpoint: {run / 'checkpoints' / 'last.ckpt'}\n" in res.stdout
    assert f"exported model: {run / 'model'}\n" in res.stdout

    assert {p.name for p in (run / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert {p.name for p in run.iterdir()} == {
        ".hydra", "train.log", "metrics.csv", "metrics.json", "checkpoints", "model"
    }  # fmt: skip
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for column in ("step", "train_loss", "val_loss", "val_ppl", "val_accuracy", "lr", "tokens_per_s"):
        assert column in rows[0], column
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [2, 5]  # validations after steps 3 and 6
    assert sum(1 for r in rows if r["train_loss"]) == 6  # log_every_n_steps=1

    record = metrics(run)
    assert record["status"] == "completed" and record["error"] is None
    assert record["steps"] == 6 and record["overrides"] == [*args, f"hydra.run.dir={run}"][:-1]
    assert [h["step"] for h in record["history"]] == [3, 6]
    assert record["best_val_loss"] == min(h["val_loss"] for h in record["history"])
    assert record["val_loss"] == record["history"][-1]["val_loss"]
    assert 0.0 <= record["val_accuracy"] <= 1.0 and record["tokens_per_s"] > 0 and record["wall_s"] > 0
    assert record["tokens"] == 6 * 8 * 16  # steps x batch x seq_len

    ckpts = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and len(ckpts) == 2 and Path(record["checkpoint_best"]).name in ckpts
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # plain data only
    assert last["global_step"] == 6

    model = ComposedModel.from_pretrained(run / "model")
    assert record["params"] == model.num_parameters()
    assert record["vocab_size"] == 16 and record["preset_vocab_size"] == 256  # the data's vocabulary (README)
    assert "vocabulary 16 from the" in res.stdout  # (the table wraps the rest)
    assert (
        "model: tiny (16,992 parameters; vocabulary 16 from the data, the preset's is 256)"
        in (run / "train.log").read_text()
    )
    # recall ids are symbols: no tokenizer.json (text, tokens and classification data save theirs)
    assert sorted(p.name for p in (run / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert "composer-train: completed" in (run / "train.log").read_text()
    state = model.state_dict()
    for key, value in last["state_dict"].items():
        assert torch.equal(state[key.removeprefix("model.")], value), key


BAD_DATA = {
    "missing": (["data.path={tmp}/nope.txt"], "nope.txt"),
    "empty": (["data.path={tmp}/empty.txt"], "empty.txt"),
    "not_utf8": (["data.path={tmp}/latin1.txt"], "latin1.txt"),
    "too_long": (
        ["data.path={tmp}/text.txt", "data.seq_len=64", "model.max_position_embeddings=32"],
        "max_position_embeddings",
    ),
    "too_short": (["data.path={tmp}/short.txt"], "short.txt"),
}


@pytest.fixture
def texts(tmp_path) -> Path:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (tmp_path / "short.txt").write_text("just a few words\n")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return tmp_path


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_and_exit_2(texts, capsys, case):
    extra, named = BAD_DATA[case]
    small = [o for o in TINY if not o.startswith("data.")]
    code, out, err = train_cli(
        [
            *small,
            "data=text",
            "data.seq_len=16",
            *[e.format(tmp=texts) for e in extra],
            f"hydra.run.dir={texts / case}",
        ],
        capsys,
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err
    assert "Traceback" not in err + out
    assert not (texts / case).exists()  # a run that fails its checks leaves nothing behind


def test_bad_data_through_the_console_script(texts):
    exe = Path(sys.executable).with_name("composer-train")
    res = subprocess.run(
        [str(exe), "data=text", f"data.path={texts}/nope.txt", f"hydra.run.dir={texts}/run"],
        cwd=texts,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "nope.txt" in res.stderr
    assert "Traceback" not in res.stderr


def test_forced_small_vocabulary_is_a_config_error(texts, capsys):
    small = [o for o in TINY if not o.startswith("data.")]
    code, _, err = train_cli(
        [
            *small,
            "data=text",
            f"data.path={texts}/text.txt",
            "data.seq_len=16",
            "model.vocab_size=8",
            f"hydra.run.dir={texts}/run",
        ],
        capsys,
    )
    assert code == 2
    assert "model.vocab_size" in err and "data.tokenizer=char" in err and "Traceback" not in err


def test_bad_override_is_a_config_error_before_hydra_starts(tmp_path, capsys):
    code, _, err = train_cli(["trainer.max_step=5", f"hydra.run.dir={tmp_path}/run"], capsys)
    assert code == 2 and "did you mean 'max_steps'" in err
    assert not (tmp_path / "run").exists()


def test_multirun_writes_one_record_per_run_and_survives_a_failing_run(tmp_path, capsys):
    """Two overrides swept (2 x 2 runs); 6 recall pairs do not fit in 16 tokens, which only the data
    module finds (when the job runs): those runs fail and are recorded as failed, the others
    complete, the sweep finishes, and composer-train exits 1 naming the failed jobs."""
    sweep = tmp_path / "sweep"
    args = [o for o in TINY if not o.startswith("data.num_pairs=")]
    code, out, err = train_cli(["-m", *args, "seed=1,2", "data.num_pairs=4,6", f"hydra.sweep.dir={sweep}"], capsys)
    assert code == 1, err
    assert "2 of 4 jobs of the sweep did not complete" in err
    assert "  job 1 (seed=1 data.num_pairs=6): invalid configuration: data.seq_len" in err and "  job 3 (" in err
    assert "configurations with a failed job: data.num_pairs=6 (2 jobs)" in err and f"composer-report {sweep}" in err
    records = {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(records) == [0, 1, 2, 3]
    for r in records.values():
        pairs = 6 if "data.num_pairs=6" in r["overrides"] else 4
        if pairs == 4:
            assert r["status"] == "completed" and r["steps"] == 6
        else:
            assert r["status"] == "failed" and "data.seq_len" in r["error"]
    assert {
        tuple(sorted(o for o in r["overrides"] if o.startswith(("seed=", "data.num_pairs=")))) for r in records.values()
    } == {
        ("data.num_pairs=4", "seed=1"),
        ("data.num_pairs=4", "seed=2"),
        ("data.num_pairs=6", "seed=1"),
        ("data.num_pairs=6", "seed=2"),
    }
    seeds_done = {r["seed"]: r["val_loss"] for r in records.values() if r["status"] == "completed"}
    assert sorted(seeds_done) == [1, 2] and seeds_done[1] != seeds_done[2]


def test_a_sweep_with_an_invalid_job_starts_none(tmp_path, capsys):
    """num_heads=3 does not divide hidden_size=32 and a sliding window without its size (which it
    now has by default) is fine: every job's model is resolved before the first one runs, so the
    sweep stops at once (exit 2), naming the bad job, and no folder is made."""
    sweep = tmp_path / "sweep"
    args = [o for o in TINY if not o.startswith("model.num_heads=")]
    argv = ["-m", *args, "model.num_heads=2,3", "model/attention=mha,sliding_window", f"hydra.sweep.dir={sweep}"]
    code, _, err = train_cli(argv, capsys)
    assert code == 2
    assert "2 of 4 jobs of the sweep are invalid (none was started)" in err
    assert "jobs 2, 3 (model.num_heads=3 model/attention=" not in err  # one line per configuration
    assert "job 2 (model.num_heads=3 model/attention=mha): model.hidden_size: 32 is not divisible" in err
    assert "job 3 (model.num_heads=3 model/attention=sliding_window)" in err
    assert "Traceback" not in err and not sweep.exists()


def test_optuna_sweeper_receives_the_optimized_metric(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    code, _, err = train_cli(
        [
            "-m",
            *TINY,
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.seed=0",
            "optim.lr=interval(0.001,0.01)",
            f"hydra.sweep.dir={sweep}",
        ],
        capsys,
    )
    assert code == 0, err
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    values = [json.loads(p.read_text())["best_val_loss"] for p in sweep.glob("*/metrics.json")]
    assert len(values) == 2 and best == pytest.approx(min(values))


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    run = tmp_path / "killed"
    args = [*TINY, "trainer.max_steps=100000", "trainer.val_check_interval=2", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "composer.train", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists() and torch.load(last, weights_only=True)["global_step"] >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.3)  # somewhere in the middle of training (possibly of a checkpoint write)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = torch.load(last, weights_only=True)  # complete and loadable
    step = ckpt["global_step"]
    assert step >= 4 and step % 2 == 0
    assert not (run / "metrics.json").exists() or metrics(run)["status"] != "completed"
    resumed = run_inprocess(
        tmp_path / "resumed", "trainer.val_check_interval=2", f"trainer.max_steps={step + 4}", f"ckpt_path={last}"
    )
    assert resumed["status"] == "completed" and resumed["steps"] == step + 4
    assert [h["step"] for h in resumed["history"]] == list(range(2, step + 5, 2))  # old validations kept


def test_ddp_with_two_cpu_processes_writes_one_run_folder(tmp_path):
    res = cli(
        [
            *TINY,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
        ],
        cwd=tmp_path,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # one folder for both processes
    run = runs[0]
    assert len(list(tmp_path.rglob("metrics.json"))) == 1 and len(list(tmp_path.rglob(".hydra"))) == 1
    record = metrics(run)
    assert record["status"] == "completed" and record["world_size"] == 2 and record["steps"] == 4
    assert record["tokens"] == 4 * 2 * 8 * 16  # both processes' batches
    assert (run / "model" / "model.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    shutil.rmtree(tmp_path / "outputs")


def test_ddp_inside_a_sweep_gives_each_run_its_own_folder(tmp_path):
    """Lightning's launcher re-runs the command in each new process: in a sweep that must be
    the job's own single run (its overrides, its folder), and the next job launches afresh."""
    sweep = tmp_path / "sweep"
    res = cli(
        [
            "-m",
            *TINY,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "callbacks.summary=false",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert len(list(tmp_path.rglob("metrics.json"))) == 2 and len(list(tmp_path.rglob(".hydra"))) == 2
    for job in ("0", "1"):
        record = metrics(sweep / job)
        assert record["status"] == "completed" and record["world_size"] == 2 and record["steps"] == 2
    assert not (tmp_path / "outputs").exists()
