"""Sequence classification from JSONL: one ``{"text": "...", "label": ...}`` object per line.

Labels are all integers (class ids 0..K-1) or all strings (names, mapped to ids in sorted order:
``dm.label_names``). Without ``val_path``, a fixed shuffle (the same for every training seed)
holds out ``val_fraction`` of the examples. Texts are tokenized (tokenizer built from the training
texts), cut to ``seq_len`` tokens and right-padded per batch:

    batch = {"input_ids": [B, T], "attention_mask": [B, T] (1 token / 0 pad), "labels": [B]}

Training batches walk through per-epoch permutations seeded by (seed, epoch), so batch k is a
pure function of (seed, k, rank, world_size) like every other stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..contract.options import is_int
from ..errors import ConfigError, DataError
from .common import DataModule, pad_sequences
from .sources import read_text_file
from .tokenizer import build_tokenizer, check_tokenizer_options, load_tokenizer
from .util import check_fraction, check_positive, missing_path, rng_for, stream_problems

SPLIT_SEED = 0  # the train / validation shuffle does not depend on the training seed
EXAMPLE = '{"text": "...", "label": 0}'


@dataclass(frozen=True)
class Row:
    text: str
    label: Union[int, str]
    where: str  # "file:line"


def read_jsonl(path: Path, key: str = "data.path") -> list[Row]:
    """The examples of a JSONL file; DataError naming file and line for the first bad one."""
    rows = []
    for number, line in enumerate(read_text_file(path, key).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); write one object per line like {EXAMPLE}") from None
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            raise DataError(f'{where}: needs an object with "text" and "label"; write lines like {EXAMPLE}')
        text, label = obj["text"], obj["label"]
        if not isinstance(text, str) or not text:
            raise DataError(f'{where}: "text" must be a non-empty string, got {text!r:.40}; fix or remove the line')
        if not (is_int(label) or isinstance(label, str)):
            raise DataError(
                f'{where}: "label" must be an integer class id or a string name, got {label!r:.40}; fix the line'
            )
        rows.append(Row(text, label, where))
    if not rows:
        raise DataError(f"{path}: no examples (only blank lines); write lines like {EXAMPLE}")
    return rows


def label_ids(
    train: list[Row], val: list[Row], num_classes: Optional[int], names_from_val: bool = True
) -> tuple[list[int], list[int], int, Optional[list[str]]]:
    """(train ids, val ids, num_classes, label names or None) with every label checked.

    String labels are numbered in sorted order over the training rows (and the validation rows when
    ``names_from_val``, i.e. both come from one file)."""
    kind = type(train[0].label)
    for row in train + val:
        if type(row.label) is not kind:
            raise DataError(
                f"{row.where}: label {row.label!r} is a {type(row.label).__name__} but {train[0].where} "
                f"has a {kind.__name__}; use integer ids or string names throughout"
            )
    names = None
    if kind is str:
        names = sorted({row.label for row in (train + val if names_from_val else train)})
        index = {name: i for i, name in enumerate(names)}
        for row in val:
            if row.label not in index:
                raise DataError(
                    f"{row.where}: label {row.label!r} never occurs in the training data; remove the "
                    "line or add training examples of it"
                )
        k = len(names) if num_classes is None else num_classes
        ids = [[index[row.label] for row in rows] for rows in (train, val)]
    else:
        k = max(row.label for row in train + val) + 1 if num_classes is None else num_classes
        for row in train + val:
            if not 0 <= row.label < k:
                fix = "raise data.num_classes" if num_classes is not None else "use class ids 0, 1, 2, ..."
                raise DataError(f"{row.where}: label {row.label} is outside 0..{k - 1}; {fix}")
        ids = [[row.label for row in rows] for rows in (train, val)]
    if names is not None and k < len(names):
        raise DataError(
            f"{train[0].where.rsplit(':', 1)[0]}: {len(names)} label names but data.num_classes={k}; "
            "raise data.num_classes or set it to null"
        )
    if k < 2:
        raise DataError(
            f"{train[0].where.rsplit(':', 1)[0]}: only one class; classification needs labels of at least two classes"
        )
    return ids[0], ids[1], k, names


class ExamplesDataset(Dataset):
    """Tokenized examples: items are (token ids [<= seq_len], label)."""

    def __init__(self, ids: list[np.ndarray], labels: list[int]):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.ids[i], self.labels[i]


def collate(items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    ids, mask = pad_sequences([ids for ids, _ in items])  # [B, T], [B, T]
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in items])}  # labels [B]


class ExampleSource:
    """Training batch ``index``: examples ``index * B .. (index + 1) * B - 1`` of the endless sequence of
    per-epoch permutations (epoch ``e`` shuffled by (seed, e))."""

    def __init__(self, examples: ExamplesDataset, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.examples)
        positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        perms = {e: rng_for(self.seed, 3, e).permutation(n) for e in np.unique(positions // n)}
        return collate([self.examples[int(perms[p // n][p % n])] for p in positions])


class ClassificationDataModule(DataModule):
    """JSONL classification data. Defaults match conf/data/classification.yaml.

    path / val_path:  the JSONL file(s); without val_path, val_fraction of path is held out
    tokenizer, bpe_vocab_size, tokenizer_path:  as for text data
    num_classes:      null: from the labels
    seq_len:          texts are cut to their first seq_len tokens
    """

    name = "classification"
    task = "classification"
    metric = "accuracy"

    def __init__(
        self,
        *,
        path: Optional[str] = None,
        seed: int = 0,
        val_path: Optional[str] = None,
        val_fraction: float = 0.1,
        tokenizer: str = "char",
        bpe_vocab_size: int = 4096,
        tokenizer_path: Optional[str] = None,
        num_classes: Optional[int] = None,
        seq_len: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        model_max_positions: Optional[int] = None,
    ):
        problems = stream_problems(seq_len, batch_size, num_workers) + missing_path(path) + check_fraction(val_fraction)
        if tokenizer_path is None:
            problems += check_tokenizer_options(tokenizer, bpe_vocab_size)
        if num_classes is not None:
            problems += check_positive({"num_classes": num_classes})
        if problems:
            raise ConfigError.of(problems)
        super().__init__(
            seed=seed,
            seq_len=seq_len,
            batch_size=batch_size,
            num_workers=num_workers,
            model_max_positions=model_max_positions,
            where=str(path),
        )
        self.path = Path(path).expanduser()
        self.val_path = None if val_path is None else Path(val_path).expanduser()
        for p, key in ((self.path, "data.path"), (self.val_path, "data.val_path")):
            if p is not None and not p.is_file():
                raise DataError(f"{p}: no such file ({key}); point {key} at a JSONL file like {EXAMPLE} per line")
        self.val_fraction, self.kind, self.bpe_vocab_size = val_fraction, tokenizer, bpe_vocab_size
        self.tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path).expanduser()
        self.label_names: Optional[list[str]] = None
        self._requested_classes = num_classes

    def _build(self) -> None:
        rows = read_jsonl(self.path)
        if self.val_path is not None:
            train, val = rows, read_jsonl(self.val_path, "data.val_path")
        else:
            order = rng_for(SPLIT_SEED, 2).permutation(len(rows))
            n_val = max(1, round(len(rows) * self.val_fraction))
            val, train = [rows[i] for i in order[:n_val]], [rows[i] for i in order[n_val:]]
        if len(train) < self.batch_size:
            raise DataError(
                f"{self.path}: {len(train)} training examples, fewer than one batch "
                f"(data.batch_size={self.batch_size}); add examples or lower data.batch_size"
            )
        train_y, val_y, self.num_classes, self.label_names = label_ids(
            train, val, self._requested_classes, names_from_val=self.val_path is None
        )
        texts = [row.text for row in train]
        if self.tokenizer_path is not None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)
        else:
            self.tokenizer = build_tokenizer(self.kind, texts, self.bpe_vocab_size)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.train_examples = ExamplesDataset(self._encode(texts), train_y)
        self.val_examples = ExamplesDataset(self._encode([row.text for row in val]), val_y)

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids[: self.seq_len], dtype=np.int64) for e in encodings]

    def _train_source(self) -> ExampleSource:
        return ExampleSource(self.train_examples, self.batch_size, self.seed)

    def _val_dataset(self) -> Dataset:
        return self.val_examples

    def _collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return collate(items)
