"""What a run tells its user: plain progress lines and train.log when stdout is not a terminal,
Ctrl-C (exit 130, status interrupted), a full disk, a misspelt key before torch is imported, and
no folder left behind by a run that fails its checks."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_helpers import TINY, cli, cli_env, metrics, train_cli

from composer import checkpoint_io
from composer.callbacks import PlainProgress
from composer.checkpoint_io import AtomicCheckpointIO
from composer.files import NoSpaceLeft, remove_orphan_temps
from composer.training import progress_bar
from composer.weights import atomic_path

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
WITH_BAR = [o for o in TINY if o != "callbacks.progress_bar=none"]


def test_a_log_that_is_not_a_terminal_gets_plain_progress_lines_and_train_log(tmp_path):
    run = tmp_path / "run"
    res = cli([*WITH_BAR, "callbacks.progress_every_s=0", f"hydra.run.dir={run}"], cwd=tmp_path)  # stdout: a pipe
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert "step 1/6 (17%) | loss " in res.stdout and " tok/s | ETA " in res.stdout
    assert sum(line.startswith("step ") and "validation" not in line for line in lines) == 6  # every log interval
    assert any(line.startswith("step 3/6 validation: val_loss ") for line in lines)
    assert "━" not in res.stdout  # no rich bar drawn into the log
    log = (run / "train.log").read_text()
    assert "[composer.progress][INFO] - step 6/6 (100%) | loss" in log and "step 6/6 validation: val_loss" in log
    assert "composer-train: completed" in log and "last checkpoint: " in log  # the summary too


def test_plain_lines_at_most_every_interval_and_the_bar_on_a_terminal(tmp_path, monkeypatch):
    """progress_every_s: one line at the first log interval, then none within the interval (only
    validations); auto picks the rich bar on a terminal, plain lines elsewhere."""
    res = cli([*WITH_BAR, "callbacks.progress_every_s=100000", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [line for line in res.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and steps[0].startswith("step 1/6 (17%) | loss ")
    assert steps[1].startswith("step 3/6 validation: ") and steps[2].startswith("step 6/6 validation: ")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert progress_bar({"progress_bar": "auto"}) == "rich"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert progress_bar({"progress_bar": "auto"}) == "plain" and progress_bar({"progress_bar": "tqdm"}) == "tqdm"


def test_the_tqdm_bar_counts_optimizer_steps(tmp_path, capsys):
    code, out, err = train_cli(
        [*WITH_BAR, "callbacks.progress_bar=tqdm", "callbacks.summary=false", f"hydra.run.dir={tmp_path}/run"], capsys
    )
    assert code == 0, err
    assert "train: 100%" in out and "6/6" in out  # steps of trainer.max_steps


def test_eta_and_rate_in_a_plain_line():
    class Trainer:
        global_step, max_steps = 50, 400

    bar = PlainProgress(every_s=0)
    bar._start, bar._start_step = 0.0, 0
    assert bar.line(Trainer, {"loss": 1.23456, "tok/s": 12345}, now=10.0) == (
        "step 50/400 (12%) | loss 1.2346 | 12,345 tok/s | ETA 1m10s"
    )


def test_ctrl_c_exits_130_names_the_last_checkpoint_and_records_interrupted(tmp_path):
    run = tmp_path / "run"
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
        while time.monotonic() < deadline and proc.poll() is None and not last.exists():
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)  # mid-training
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert f"the last checkpoint is {last}" in err and f"ckpt_path={last}" in err and "Traceback" not in err
    record = metrics(run)
    assert record["status"] == "interrupted" and record["error_type"] == "RunInterrupted"
    assert record["steps"] >= 2 and record["checkpoint_last"] == str(last)


def test_a_full_disk_during_training_is_named_and_recorded(tmp_path, capsys, monkeypatch):
    """The second checkpoint save hits ENOSPC: one line naming the folder, the first checkpoint
    intact, the failure in metrics.json, no temp file left."""
    run = tmp_path / "run"
    save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    code, _, err = train_cli([*TINY, "callbacks.summary=false", f"hydra.run.dir={run}"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and f"no space left on {run / 'checkpoints'}" in err and "Traceback" not in err
    assert f"the last complete checkpoint is kept: {run / 'checkpoints' / 'last.ckpt'}" in err
    record = metrics(run)
    assert record["status"] == "failed" and record["error_type"] == "NoSpaceLeft" and "no space left" in record["error"]
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert not any(name.endswith(".tmp") for name in files)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    good = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", full)
    with pytest.raises(NoSpaceLeft, match=f"no space left on {tmp_path} while writing last.ckpt"):
        io.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_orphan_temp_files_are_the_ones_atomic_writes_make(tmp_path):
    """The temp names of both atomic writers; a SIGKILL mid-write leaves such a file (the writers
    remove theirs on any exception): the next start removes it and nothing else."""
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "model.safetensors") as tmp:
        name = tmp.name
        raise KeyboardInterrupt
    killed = [tmp_path / name, tmp_path / f".meta.json.{os.getpid()}.0badc0de.tmp"]  # weights / data.util
    for path in killed:
        path.write_bytes(b"partial")
    keep = [tmp_path / ".hidden-config", tmp_path / "notes.tmp", tmp_path / "last.ckpt"]
    for path in keep:
        path.write_text("not ours")
    assert sorted(remove_orphan_temps(tmp_path)) == sorted(killed)
    assert all(p.exists() for p in keep)


def test_a_misspelt_key_is_reported_before_torch_or_lightning_is_imported(tmp_path):
    code = (
        "import sys\n"
        "from composer.train import main\n"
        "try:\n"
        "    main(['model.hidden_sise=3'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert "did you mean 'hidden_size'" in res.stderr
    assert res.stdout.strip() == "exit 2 False False"
    assert not (tmp_path / "outputs").exists()


def test_a_run_that_fails_its_checks_leaves_no_folder(tmp_path, capsys):
    """A model error stops before Hydra makes the folder; a data error (found when the run reads
    its data) removes the folder Hydra made, and the empty folders above it."""
    out = tmp_path / "outputs"
    code, _, err = train_cli([*TINY, "model.hidden_size=31", f"paths.output_root={out}"], capsys)
    assert code == 2 and "model.hidden_size: 31 is not divisible" in err
    assert not out.exists()
    code, _, err = train_cli([*TINY, "data.num_pairs=6", f"paths.output_root={out}"], capsys)
    assert code == 2 and "data.seq_len" in err
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")  # a folder holding other files stays
    code, _, _ = train_cli([*TINY, "data.num_pairs=6", f"hydra.run.dir={tmp_path / 'mine'}"], capsys)
    assert code == 2 and (tmp_path / "mine" / "notes.txt").exists()


def test_run_log_exists_without_hydra(tmp_path):
    from test_train_helpers import run_inprocess

    run_inprocess(tmp_path, "callbacks.summary=false")
    log = (tmp_path / "train.log").read_text()
    assert "step 3/6 validation" in log and "training tiny" in log
    assert Path(tmp_path / "metrics.json").exists()
