"""Resuming with ckpt_path: in the checkpoint's own folder, a finished run, another configuration,
files that are not Lightning checkpoints (nothing unpickled), and the checkpoints a run keeps."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest
import torch
from test_train_helpers import TINY, metrics, run_inprocess, train_cli

from composer.errors import ConfigError
from composer.resume import RunFinished, check_resume, config_differences, read_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
QUIET = [*TINY, "callbacks.summary=false"]


@pytest.fixture
def finished(tmp_path, capsys, monkeypatch) -> Path:
    """A 6-step run (validations at 3 and 6) in tmp_path/run, through the command line (cwd: tmp_path)."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code, _, err = train_cli([*QUIET, f"hydra.run.dir={run}"], capsys)
    assert code == 0, err
    return run


def csv_steps(run: Path, column: str) -> list[int]:
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r[column]]


def test_a_resume_continues_in_the_checkpoints_own_folder(finished, capsys):
    """ckpt_path=<run>/checkpoints/last.ckpt without hydra.run.dir: the same folder goes on (its
    metrics.csv rows kept, the bar counting steps to max_steps, a killed save's temp file removed),
    and nothing is written anywhere else."""
    orphan = finished / "checkpoints" / ".last.ckpt.k1ll3d.tmp"  # what a save killed mid-write leaves
    orphan.write_bytes(b"partial")
    capsys.readouterr()
    args = [o for o in QUIET if o != "callbacks.progress_bar=none"]
    code, out, err = train_cli(
        [*args, "callbacks.progress_bar=rich", "trainer.max_steps=9", f"ckpt_path={finished}/checkpoints/last.ckpt"],
        capsys,
    )
    assert code == 0, err
    assert "9/9" in out and "/3 " not in out  # optimizer steps of max_steps (Lightning's bar read 9/3)
    assert "dirpath has changed" not in out + err
    record = metrics(finished)
    assert record["status"] == "completed" and record["steps"] == 9
    assert record["resumed_from"]["step"] == 6 and [h["step"] for h in record["history"]] == [3, 6, 9]
    assert csv_steps(finished, "train_loss") == list(range(9))  # steps 0-5 of the first part, once each
    assert csv_steps(finished, "val_loss") == [2, 5, 8]
    assert not orphan.exists()
    assert torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    assert sorted(p.name for p in finished.parent.iterdir()) == ["run"]  # no outputs/<date>/<time> of its own


def test_resuming_a_finished_run_says_so_and_trains_nothing(finished, capsys):
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    code, out, err = train_cli([*QUIET, f"ckpt_path={finished}/checkpoints/last.ckpt"], capsys)
    assert code == 0, err
    assert "is at step 6, and trainer.max_steps=6: the run has finished, nothing to train" in out
    assert "trainer.max_steps=12" in out  # how to go on
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before  # nothing rewritten


def test_resume_into_another_configuration_names_the_keys(finished, capsys):
    """Another width or another vocabulary (other data): one ConfigError naming each key, before
    Lightning loads anything (it used to fail with a state_dict RuntimeError)."""
    before = (finished / "metrics.json").read_bytes()
    ckpt = f"ckpt_path={finished}/checkpoints/last.ckpt"
    code, _, err = train_cli(
        [*QUIET, "trainer.max_steps=9", ckpt, "model.hidden_size=64", "data.vocab_size=20"], capsys
    )
    assert code == 2
    assert "cannot resume from" in err and "(2 problems)" in err
    assert "model.hidden_size: is 64 but the checkpoint last.ckpt was trained with 32" in err
    assert "data.vocab_size: is 20 but the checkpoint last.ckpt was trained with 16" in err
    assert "init_from=" in err and "Traceback" not in err and "RuntimeError" not in err
    assert (finished / "metrics.json").read_bytes() == before
    # options that change no weight may change on a resume
    saved = read_checkpoint(finished / "checkpoints" / "last.ckpt").config
    assert (
        config_differences(saved, {**saved, "model": {**saved["model"], "gradient_checkpointing": "every_layer"}}) == []
    )


def test_a_checkpoint_without_its_config_is_checked_by_its_weights(finished, tmp_path):
    """An older (or foreign) Lightning checkpoint has no stored config: its weights' shapes are
    compared with the model's instead, still before Lightning loads it."""
    ckpt = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["composer"]["config"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with pytest.raises(ConfigError, match=r"weight\(s\) differ from this run's model") as info:
        run_inprocess(tmp_path / "other", "model.hidden_size=64", "trainer.max_steps=9", f"ckpt_path={old}")
    assert "embed.weight" in str(info.value) or "layers." in str(info.value)


class Payload:
    """Unpickling this runs code (it writes a file): a loader that unpickles arbitrary objects would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_files_that_are_not_lightning_checkpoints_are_refused_unread(tmp_path):
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "x": Payload(marker)}, hostile)
    plain_zip = tmp_path / "notes.ckpt"
    with zipfile.ZipFile(plain_zip, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    weights = tmp_path / "weights.ckpt"
    torch.save({"w": torch.ones(2)}, weights)
    cases = {hostile: "would run code from the file", plain_zip: "not a PyTorch checkpoint", weights: "not a Lightning"}
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            read_checkpoint(path)
    assert not marker.exists()  # nothing of the file was executed


def test_finished_and_mismatch_checks_from_the_stored_config(finished):
    info = read_checkpoint(finished / "checkpoints" / "last.ckpt")
    assert info.global_step == 6 and info.config["model"]["hidden_size"] == 32
    assert info.model_config["hidden_size"] == 32 and "ckpt_path" not in " ".join(info.overrides)
    with pytest.raises(RunFinished):
        check_resume(info, info.config)
    longer = {**info.config, "trainer": {**info.config["trainer"], "max_steps": 12}}
    check_resume(info, longer)  # a longer run of the same model and data is fine


def test_last_is_written_after_every_validation_and_shares_the_best_ones_file(tmp_path):
    """last.ckpt is the latest validation's state even when val_loss got worse (Lightning 2.6
    rewrote it only with a new best); when the best is the last, the two names are one file."""
    for name, extra in (
        ("steady", []),
        ("noisy", ["optim.lr=0.3", "scheduler=constant", "trainer.gradient_clip_val=null"]),
    ):
        run = tmp_path / name
        record = run_inprocess(run, "trainer.max_steps=8", "trainer.val_check_interval=2", *extra)
        last, best = run / "checkpoints" / "last.ckpt", Path(record["checkpoint_best"])
        assert torch.load(last, weights_only=True)["global_step"] == 8
        best_step = min(record["history"], key=lambda h: h["val_loss"])["step"]
        assert torch.load(best, weights_only=True)["global_step"] == best_step
        assert (best.stat().st_ino == last.stat().st_ino) == (best_step == 8), name
        if name == "noisy":
            assert best_step != 8  # this configuration's last validation is not its best
        files = [p for p in (run / "checkpoints").iterdir()]
        assert len(files) == 2 and not any(p.name.endswith(".tmp") for p in files)


def test_a_resume_into_another_folder_says_so_instead_of_lightnings_warning(tmp_path):
    import warnings

    run_inprocess(tmp_path / "a", "callbacks.summary=false")
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = run_inprocess(tmp_path / "b", "callbacks.summary=false", "trainer.max_steps=9", f"ckpt_path={ckpt}")
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert record["resumed_from"] == {"checkpoint": str(ckpt), "step": 6} and record["steps"] == 9
    assert "into the new folder" in (tmp_path / "b" / "train.log").read_text()
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6  # the old folder is left as it was
