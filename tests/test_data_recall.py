"""The recall (MQAR) data module: structure of the examples, determinism, validation set, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import small_model_dict

from composer import ConfigError, DataError, compose
from composer.data import RecallDataModule, build_datamodule

IGNORE = -100


def batches(dm, n: int) -> list[dict]:
    return list(itertools.islice(iter(dm.train_dataloader()), n))


def make(**kw) -> RecallDataModule:
    args = {"seed": 0, "vocab_size": 32, "num_pairs": 4, "seq_len": 24, "batch_size": 8, "num_val_examples": 40}
    dm = RecallDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def test_every_answer_is_the_value_paired_with_the_queried_key():
    dm = make(num_queries=3)
    num_keys = (32 - 1) // 2
    for batch in batches(dm, 3) + [next(iter(dm.val_dataloader()))]:
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.shape == labels.shape == (8, 24) and ids.dtype == labels.dtype == torch.long
        for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
            keys, values = row[0:8:2], row[1:8:2]
            assert len(set(keys)) == 4 and all(1 <= k <= num_keys for k in keys)
            assert len(set(values)) == 4 and all(num_keys < v < 32 for v in values)
            pairs = dict(zip(keys, values, strict=True))
            answers = [t for t, y in enumerate(lab) if y != IGNORE]
            assert len(answers) == 3 and all(t >= 9 for t in answers)  # after the pairs and their own key
            asked = [row[t - 1] for t in answers]
            assert len(set(asked)) == 3 and set(asked) <= set(keys)
            for t in answers:
                assert lab[t] == pairs[row[t - 1]] and row[t] == 0  # the answer is never shown
            asked_at = {a - 1 for a in answers}
            assert all(row[t] == 0 for t in range(8, 24) if t not in asked_at)  # filler besides the keys


def test_query_order_and_places_vary():
    ids = batches(make(num_queries=4, seq_len=40), 1)[0]["input_ids"]
    orders = {tuple(r[8:].tolist()) for r in ids}
    assert len(orders) == len(ids)


def test_same_seed_same_stream_other_seed_differs():
    a, b, c = batches(make(seed=5), 4), batches(make(seed=5), 4), batches(make(seed=6), 4)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])  # batches differ from each other


def test_validation_set_is_fixed_and_independent_of_the_training_seed():
    one, two = make(seed=1), make(seed=2)
    v1 = torch.cat([b["input_ids"] for b in one.val_dataloader()])
    v2 = torch.cat([b["input_ids"] for b in two.val_dataloader()])
    assert v1.shape == (40, 24) and torch.equal(v1, v2)
    v3 = torch.cat([b["input_ids"] for b in make(val_seed=7).val_dataloader()])
    assert not torch.equal(v1, v3)
    train = torch.cat([b["input_ids"] for b in batches(one, 5)])
    assert not any(torch.equal(r, v) for r in train for v in v1)


def test_interface_attributes_and_default_config():
    dm = build_datamodule({"name": "recall"}, seed=0, model_max_positions=256)
    dm.setup("fit")
    dm.setup("fit")  # idempotent
    assert (dm.task, dm.metric, dm.tokenizer, dm.num_classes) == ("lm", "answer_accuracy", None, None)
    assert (dm.vocab_size, dm.seq_len, dm.batch_size) == (64, 32, 64)
    b = batches(dm, 1)[0]
    assert b["input_ids"].shape == (64, 32) and int((b["labels"] != IGNORE).sum()) == 64 * 4


def test_batches_fit_the_lm_model_and_the_loss_counts_answers_only():
    dm = make()
    model = compose(small_model_dict(vocab_size=dm.vocab_size, max_position_embeddings=dm.seq_len), seed=0)
    b = batches(dm, 1)[0]
    out = model(b["input_ids"], labels=b["labels"])
    logits = out.logits[:, :-1]
    mask = b["labels"][:, 1:] != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[mask], b["labels"][:, 1:][mask])
    assert torch.allclose(out.loss, manual, atol=1e-5)


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"num_pairs": 20}, "data.vocab_size"),
        ({"num_queries": 5}, "data.num_queries"),
        ({"seq_len": 12}, "data.seq_len"),
        ({"batch_size": 0}, "data.batch_size"),
    ],
)
def test_bad_options_name_the_key(changes, key):
    with pytest.raises(ConfigError) as err:
        make(**changes)
    assert key in str(err.value)


def test_sequence_longer_than_the_model_is_a_one_line_data_error():
    with pytest.raises(DataError) as err:
        build_datamodule({"name": "recall", "seq_len": 128}, seed=0, model_max_positions=64)
    msg = str(err.value)
    assert "\n" not in msg and "data.seq_len=128" in msg and "max_position_embeddings=64" in msg
