"""The LightningModule on its own: overfitting one batch, precisions, validation metrics."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import small_model_dict
from test_train_helpers import Repeat
from torch.utils.data import DataLoader

from composer.lit import LitComposer
from composer.model import compose

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIM = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8}
CONSTANT = {"name": "constant", "warmup_steps": 0, "min_lr": 0.0}


def _batch(vocab: int = 32, b: int = 4, t: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _trainer(steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def test_overfits_one_batch_to_near_zero_loss():
    torch.manual_seed(0)
    model = compose(small_model_dict(vocab_size=32, hidden_size=64, num_layers=2, max_position_embeddings=16), seed=0)
    lit = LitComposer(model, OPTIM, CONSTANT)
    batch = _batch()
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            losses.append(float(outputs["loss"]))

    _trainer(150, callbacks=[Record()]).fit(lit, DataLoader(Repeat(batch, 150), batch_size=None))
    assert losses[0] > 3.0  # ~ln(32) at the start
    assert losses[-1] < 0.05, losses[-10:]
    lit.eval()
    with torch.no_grad():
        out = lit(batch)
    assert out.loss.item() < 0.05
    assert torch.equal(out.logits[:, :-1].argmax(-1), batch["labels"][:, 1:])  # every next token memorised


def test_validation_metrics_count_only_labelled_positions():
    model = compose(small_model_dict(vocab_size=32, max_position_embeddings=16), seed=0)
    lit = LitComposer(model, OPTIM, CONSTANT, metric="answer_accuracy")
    batch = _batch()
    labels = torch.full_like(batch["labels"], -100)
    labels[:, 5] = batch["input_ids"][:, 5]  # one answer per row, predicted at position 4
    batch = {"input_ids": batch["input_ids"], "labels": labels}
    trainer = _trainer(1)
    trainer.validate(lit, DataLoader(Repeat(batch, 3), batch_size=None), verbose=False)
    metrics = trainer.callback_metrics
    with torch.no_grad():
        out = model(batch["input_ids"], labels=labels)
    pred = out.logits[:, 4].argmax(-1)
    assert metrics["val_loss"].item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert metrics["val_ppl"].item() == pytest.approx(out.loss.exp().item(), rel=1e-5)
    assert metrics["val_accuracy"].item() == pytest.approx((pred == labels[:, 5]).float().mean().item())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bfloat16_precisions_train_on_cpu(precision):
    model = compose(small_model_dict(vocab_size=32, max_position_embeddings=16), seed=0)
    lit = LitComposer(model, OPTIM, CONSTANT)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            losses.append(float(outputs["loss"]))

    before = model.layers[0].attn.qkv.weight.detach().float().clone()
    _trainer(8, precision=precision, callbacks=[Record()]).fit(lit, DataLoader(Repeat(_batch(), 8), batch_size=None))
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not torch.equal(before, model.layers[0].attn.qkv.weight.detach().float())
    if precision == "bf16-true":
        assert model.embed.weight.dtype == torch.bfloat16


def test_throughput_counts_tokens_and_leaves_out_validation_time(monkeypatch):
    import time

    from composer.callbacks import Throughput

    model = compose(small_model_dict(vocab_size=32, max_position_embeddings=16), seed=0)
    lit = LitComposer(model, OPTIM, CONSTANT)
    step = LitComposer.validation_step

    def slow(self, batch, batch_idx):  # 0.3 s per validation batch
        time.sleep(0.3)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(LitComposer, "validation_step", slow)
    meter = Throughput()
    batches = DataLoader(Repeat(_batch(), 1000), batch_size=None)
    start = time.perf_counter()
    _trainer(
        6,
        callbacks=[meter],
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        log_every_n_steps=2,
    ).fit(lit, batches, DataLoader(Repeat(_batch(), 1), batch_size=None))
    wall = time.perf_counter() - start
    assert meter.tokens == 6 * 4 * 16
    assert 0 < meter.train_seconds < wall - 3 * 0.3  # three validations, none of them counted
    assert meter.tokens_per_s == pytest.approx(meter.tokens / meter.train_seconds)
