"""Classification from JSONL: parsing, labels, padding + attention_mask, the epoch stream, bad lines."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import small_model_dict

from composer import ConfigError, DataError, compose
from composer.data import ClassificationDataModule, build_datamodule


def write(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def dm_for(path, **kw) -> ClassificationDataModule:
    args = {"path": path, "seed": 0, "seq_len": 12, "batch_size": 4, "val_fraction": 0.2}
    dm = ClassificationDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


REVIEWS = [
    {"text": f"{'good' if i % 2 else 'bad'} movie number {i}" + "!" * (i % 5), "label": i % 2} for i in range(40)
]


def test_integer_labels_padding_mask_and_truncation(tmp_path):
    dm = dm_for(write(tmp_path / "r.jsonl", REVIEWS))
    assert (dm.task, dm.metric, dm.num_classes, dm.label_names) == ("classification", "accuracy", 2, None)
    assert len(dm.train_examples) == 32 and len(dm.val_examples) == 8
    batch = next(iter(dm.train_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert labels.shape == (4,) and ids.shape == mask.shape and ids.shape[0] == 4 and ids.shape[1] <= 12
    for row, m, y in zip(ids, mask, labels, strict=True):
        n = int(m.sum())
        assert torch.all(m[:n] == 1) and torch.all(m[n:] == 0) and torch.all(row[n:] == 0)
        text = dm.tokenizer.decode(row[:n].tolist())
        source = next(r for r in REVIEWS if r["text"].startswith(text))
        assert source["label"] == int(y) and text == source["text"][:12]  # cut to seq_len characters
    val = list(dm.val_dataloader())
    assert sum(len(b["labels"]) for b in val) == 8


def test_string_labels_map_to_sorted_ids_and_blank_lines_are_skipped(tmp_path):
    rows = [{"text": f"t{i}", "label": name} for i, name in enumerate(["pos", "neg", "neutral"] * 4)]
    path = write(tmp_path / "s.jsonl", rows[:6] + ["", "   "] + rows[6:])
    dm = dm_for(path, batch_size=2, val_fraction=0.25)
    assert dm.label_names == ["neg", "neutral", "pos"] and dm.num_classes == 3
    seen = {}
    for b in itertools.islice(iter(dm.train_dataloader()), 5):
        for row, y in zip(b["input_ids"], b["labels"], strict=True):
            seen[dm.tokenizer.decode(row[row != 0].tolist())] = dm.label_names[int(y)]
    for text, name in seen.items():
        assert rows[int(text[1:])]["label"] == name


def test_separate_validation_file_and_num_classes(tmp_path):
    train = write(tmp_path / "train.jsonl", REVIEWS)
    val = write(tmp_path / "val.jsonl", [{"text": "so good", "label": 3}])
    dm = dm_for(train, val_path=val, num_classes=5)
    assert dm.num_classes == 5 and len(dm.train_examples) == 40 and len(dm.val_examples) == 1
    assert next(iter(dm.val_dataloader()))["labels"].tolist() == [3]


def test_each_epoch_visits_every_example_once_and_seeds_differ(tmp_path):
    path = write(tmp_path / "r.jsonl", REVIEWS)
    dm = dm_for(path, seq_len=64)

    def epoch(dm):
        return [
            tuple(r[m == 1].tolist())
            for b in itertools.islice(iter(dm.train_dataloader()), 8)
            for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)
        ]  # without padding

    first = epoch(dm)
    assert len(first) == 32 and len(set(first)) == 32  # 32 training examples, all distinct, once each
    other = dm_for(path, seq_len=64, seed=1)
    assert epoch(dm_for(path, seq_len=64)) == first
    assert epoch(other)[:4] != first[:4] and set(epoch(other)) == set(first)
    assert other.val_examples.ids[0].tolist() == dm.val_examples.ids[0].tolist()  # the split is seed-independent


def test_batches_fit_a_classification_model(tmp_path):
    dm = dm_for(write(tmp_path / "r.jsonl", REVIEWS))
    model = compose(
        small_model_dict(vocab_size=dm.vocab_size, head={"type": "classification", "num_classes": dm.num_classes}),
        seed=0,
    )
    batch = next(iter(dm.train_dataloader()))
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"text": "a", "label": 1', "not valid JSON"),
        ('{"text": "a"}', '"label"'),
        ('["a", 1]', '"label"'),
        ('{"text": "", "label": 1}', '"text" must be'),
        ('{"text": "a", "label": true}', '"label" must be'),
        ('{"text": "a", "label": "one"}', "integer ids or string names"),
        ('{"text": "a", "label": -1}', "outside"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, problem):
    path = write(tmp_path / "bad.jsonl", REVIEWS[:3] + [line] + REVIEWS[3:10])
    with pytest.raises(DataError) as err:
        dm_for(path)
    msg = str(err.value)
    assert "\n" not in msg and f"{path}:4" in msg and problem in msg


@pytest.mark.parametrize("case", ["missing", "empty", "latin1", "one_class", "too_few", "unseen"])
def test_bad_files_are_one_line_data_errors(tmp_path, case):
    path = tmp_path / "d.jsonl"
    kw = {}
    if case == "empty":
        path.write_text("")
    elif case == "latin1":
        path.write_bytes(b'{"text": "caf\xe9", "label": 0}\n')
    elif case == "one_class":
        write(path, [{"text": "x", "label": 0}] * 10)
    elif case == "too_few":
        write(path, REVIEWS[:4])
    elif case == "unseen":
        write(path, REVIEWS)
        kw["val_path"] = write(tmp_path / "v.jsonl", [{"text": "x", "label": "cat"}])
    with pytest.raises(DataError) as err:
        dm_for(str(path), **kw)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg
    if case == "latin1":
        assert "byte offset 13" in msg


def test_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        build_datamodule({"name": "classification"}, seed=0)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        ClassificationDataModule(path=write(tmp_path / "r.jsonl", REVIEWS), val_fraction=0)
    with pytest.raises(DataError, match="data.seq_len=300"):
        build_datamodule(
            {"name": "classification", "path": str(tmp_path / "r.jsonl"), "seq_len": 300},
            seed=0,
            model_max_positions=256,
        )
