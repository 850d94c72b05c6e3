"""Whole training runs in-process (composer.run.train): exact resume, gradient checkpointing,
NaN guard, init_from, early stopping, TensorBoard."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_helpers import TINY, metrics, run_inprocess

from composer.callbacks import NonFiniteLoss
from composer.errors import ConfigError
from composer.lit import LitComposer
from composer.model import ComposedModel

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    """Stop after 6 of 12 steps, resume with ckpt_path: the same validation losses, to 1e-6
    (dropout on, so the random streams must be restored too)."""
    common = ["model.dropout=0.1", "scheduler.decay_steps=12", "trainer.val_check_interval=3"]
    full = run_inprocess(tmp_path / "full", *common, "trainer.max_steps=12")
    half = run_inprocess(tmp_path / "half", *common, "trainer.max_steps=6")
    last = tmp_path / "half" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    resumed = run_inprocess(tmp_path / "resumed", *common, "trainer.max_steps=12", f"ckpt_path={last}")

    assert half["steps"] == 6 and resumed["steps"] == full["steps"] == 12
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in full["history"]] == [3, 6, 9, 12]
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    assert full["val_loss"] < full["history"][0]["val_loss"]  # it did learn something
    a = ComposedModel.from_pretrained(tmp_path / "full" / "model").state_dict()
    b = ComposedModel.from_pretrained(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("mode", ["every_layer", "attention", "ffn"])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, mode):
    plain = run_inprocess(tmp_path / "plain", "model.num_layers=2")
    ckpt = run_inprocess(tmp_path / mode, "model.num_layers=2", f"model.gradient_checkpointing={mode}")
    for a, b in zip(plain["history"], ckpt["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


def test_without_checkpoint_files_the_run_is_the_same(tmp_path):
    saved = run_inprocess(tmp_path / "a")
    unsaved = run_inprocess(tmp_path / "b", "callbacks.checkpoint.enabled=false")
    assert unsaved["val_loss"] == pytest.approx(saved["val_loss"], abs=1e-7)
    assert not (tmp_path / "b" / "checkpoints").exists() and unsaved.get("checkpoint_last") is None


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss turns NaN at step 8 (checkpoints at 3 and 6): training stops at the next check
    with a message naming step 8; last.ckpt stays the finite one of step 6."""
    step = LitComposer.training_step

    def poisoned(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 7 else loss

    monkeypatch.setattr(LitComposer, "training_step", poisoned)
    with pytest.raises(NonFiniteLoss, match="at step 8") as info:
        run_inprocess(tmp_path, "trainer.max_steps=20", "trainer.log_every_n_steps=50")
    assert "last.ckpt" in str(info.value)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    record = metrics(tmp_path)
    assert record["status"] == "failed" and "at step 8" in record["error"]
    assert not (tmp_path / "model").exists()  # no export of NaN weights


def test_init_from_starts_from_the_saved_weights_and_config(tmp_path):
    from composer.config import load_config
    from composer.run import prepare

    first = run_inprocess(tmp_path / "first", "model.hidden_size=48", "model.num_heads=3")
    saved = ComposedModel.from_pretrained(tmp_path / "first" / "model")
    # the preset says hidden_size=128; init_from keeps the saved 48, the dropout override applies
    data_only = [o for o in TINY if not o.startswith("model.")]
    overrides = [*data_only, f"init_from={tmp_path / 'first' / 'model'}", "model.dropout=0.2"]
    prepared = prepare(load_config(overrides), overrides)
    assert prepared.model.config.hidden_size == 48 and prepared.model.config.dropout == 0.2
    state = prepared.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items())
    cont = run_inprocess(
        tmp_path / "second",
        f"init_from={tmp_path / 'first' / 'model'}",
        "trainer.max_steps=3",
        "model.hidden_size=48",
        "model.num_heads=3",
    )
    assert cont["history"][0]["val_loss"] < first["history"][0]["val_loss"]  # it starts trained
    with pytest.raises(ConfigError, match="model.num_layers.*init_from"):
        run_inprocess(tmp_path / "third", f"init_from={tmp_path / 'first' / 'model'}", "model.num_layers=2")


def test_early_stopping_and_tensorboard(tmp_path):
    record = run_inprocess(
        tmp_path,
        "logger=tensorboard",
        "optim.lr=1e-9",
        "scheduler=constant",
        "callbacks.early_stopping={patience: 1, min_delta: 0.1}",
        "trainer.max_steps=30",
        "trainer.val_check_interval=2",
    )
    assert record["status"] == "completed"
    assert record["steps"] < 30  # no improvement of 0.1 with a vanishing learning rate: stopped early
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "metrics.csv").is_file()  # CSV is always written (README), TensorBoard besides it
    assert math.isfinite(record["val_loss"])


def test_compile_runs_the_model_under_torch_compile(tmp_path):
    """compile=true wraps the model in place (inductor; only built here); a run with the
    aot_eager backend goes through dynamo and AOT autograd and matches the eager run."""
    from composer.config import load_config
    from composer.run import prepare

    prepared = prepare(load_config([*TINY, "compile=true"]), TINY)
    assert prepared.model._compiled_call_impl is not None
    assert "embed.weight" in prepared.lit.model.state_dict()  # names unchanged (no _orig_mod.)
    eager = run_inprocess(tmp_path / "eager", "trainer.max_steps=3")
    compiled = run_inprocess(tmp_path / "compiled", "trainer.max_steps=3", "compile={backend: aot_eager}")
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-5)
