"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), generated on the fly.

A sequence shows ``num_pairs`` key-value pairs (distinct keys, distinct values), then asks for
``num_queries`` of the keys again (distinct, in random order) at random places in the rest of the
sequence. The answer to a query is never shown: the token after a queried key is filler, and its
label is the value paired with that key. Only those answer positions carry a label, so the loss and
accuracy measure recall alone (as in Zoology, answers do not leak into later positions, so a model
cannot score by elimination among the values it has seen answered). Token 0 is the filler; keys
and values come from disjoint ranges:

    ids:    0 = filler | 1 .. K = keys | K + 1 .. V - 1 = values          (K = (V - 1) // 2)
    input:  k1 v1 k2 v2 ... kP vP | 0 0 k3 0 0 k1 0 0 0 0 k2 0 ...        (length seq_len)
    labels: -100 everywhere except right after each queried key:  v3 after k3, v1 after k1, ...

Labels are aligned with ``input_ids`` (the model shifts them): the prediction made at a queried
key is scored against its value. The validation set is a fixed number of examples from
``val_seed``, the same for every training seed.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..contract.options import IGNORE_INDEX, is_int
from ..errors import ConfigError, Problem
from .common import DataModule
from .util import check_positive, rng_for, stream_problems

FILLER = 0


def recall_examples(
    rng: np.random.Generator, n: int, vocab_size: int, num_pairs: int, num_queries: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MQAR examples: (input_ids [n, seq_len], labels [n, seq_len], -100 off the answers)."""
    num_keys = (vocab_size - 1) // 2
    num_values = vocab_size - 1 - num_keys
    p, q = num_pairs, num_queries
    keys = rng.random((n, num_keys)).argsort(axis=1)[:, :p] + 1  # [n, P] distinct keys in 1..K
    values = rng.random((n, num_values)).argsort(axis=1)[:, :p] + num_keys + 1  # [n, P] distinct values
    asked = rng.random((n, p)).argsort(axis=1)[:, :q]  # [n, Q] which pairs are queried, in query order
    slots = (seq_len - 2 * p) // 2  # places for a (key, answer) query after the pairs
    where = np.sort(rng.random((n, slots)).argsort(axis=1)[:, :q], axis=1)  # [n, Q] sorted slot numbers
    rows = np.arange(n)[:, None]

    ids = np.full((n, seq_len), FILLER, dtype=np.int64)
    ids[:, 0 : 2 * p : 2] = keys
    ids[:, 1 : 2 * p : 2] = values
    key_pos = 2 * p + 2 * where  # [n, Q]
    ids[rows, key_pos] = keys[rows, asked]  # the answer position after it stays filler
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[rows, key_pos + 1] = values[rows, asked]
    return torch.from_numpy(ids), torch.from_numpy(labels)


class RecallSource:
    """Training batch ``index``: ``batch_size`` fresh examples from an RNG seeded by (seed, index)."""

    def __init__(self, seed: int, batch_size: int, **shape: int):
        self.seed, self.batch_size, self.shape = seed, batch_size, shape

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels = recall_examples(rng_for(self.seed, 0, index), self.batch_size, **self.shape)
        return {"input_ids": ids, "labels": labels}  # [B, T] each


class RecallDataModule(DataModule):
    """MQAR data (see the module docstring). Defaults match conf/data/recall.yaml.

    vocab_size:        token ids 0 .. vocab_size-1 (filler, keys, values); the model's vocab follows it
    num_pairs:         key-value pairs shown at the start of each sequence
    num_queries:       keys asked again (null: all pairs); at most num_pairs
    seq_len:           tokens per sequence; needs 2 * (num_pairs + num_queries) <= seq_len
    batch_size:        sequences per training batch
    num_val_examples:  size of the fixed validation set
    val_seed:          seed of the validation set (independent of the training seed)
    """

    name = "recall"
    metric = "answer_accuracy"

    def __init__(
        self,
        *,
        seed: int = 0,
        vocab_size: int = 64,
        num_pairs: int = 4,
        num_queries: Optional[int] = None,
        seq_len: int = 32,
        batch_size: int = 64,
        num_val_examples: int = 512,
        val_seed: int = 1234,
        num_workers: int = 0,
        model_max_positions: Optional[int] = None,
    ):
        num_queries = num_pairs if num_queries is None else num_queries
        problems = stream_problems(seq_len, batch_size, num_workers)
        sizes = check_positive(
            {
                "vocab_size": vocab_size,
                "num_pairs": num_pairs,
                "num_queries": num_queries,
                "num_val_examples": num_val_examples,
            }
        )
        problems += sizes or _shape_problems(vocab_size, num_pairs, num_queries, seq_len)
        if problems:
            raise ConfigError.of(problems)
        super().__init__(
            seed=seed,
            seq_len=seq_len,
            batch_size=batch_size,
            num_workers=num_workers,
            model_max_positions=model_max_positions,
            where="data=recall",
        )
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.num_val_examples, self.val_seed = num_val_examples, val_seed
        self.vocab_size = vocab_size
        self._shape = {"vocab_size": vocab_size, "num_pairs": num_pairs, "num_queries": num_queries, "seq_len": seq_len}
        self._val: Optional[TensorDataset] = None

    def _build(self) -> None:
        ids, labels = recall_examples(rng_for(self.val_seed, 1), self.num_val_examples, **self._shape)
        self._val = TensorDataset(ids, labels)

    def _train_source(self) -> RecallSource:
        return RecallSource(self.seed, self.batch_size, **self._shape)

    def _val_dataset(self) -> Dataset:
        return self._val

    def _collate(self, items: list) -> dict[str, torch.Tensor]:
        ids, labels = zip(*items, strict=True)
        return {"input_ids": torch.stack(ids), "labels": torch.stack(labels)}  # [B, T] each


def _shape_problems(vocab_size: int, num_pairs: int, num_queries: int, seq_len: int) -> list[Problem]:
    problems = []
    num_keys = (vocab_size - 1) // 2
    if num_keys < num_pairs or vocab_size < 3:
        problems.append(
            Problem(
                "data.vocab_size",
                f"{vocab_size} leaves {num_keys} keys for {num_pairs} pairs",
                f"use data.vocab_size >= {2 * num_pairs + 1} or fewer data.num_pairs",
            )
        )
    if num_queries > num_pairs:
        problems.append(
            Problem(
                "data.num_queries",
                f"{num_queries} queries but only {num_pairs} pairs",
                "use data.num_queries <= data.num_pairs (each key is asked at most once)",
            )
        )
    if is_int(seq_len) and 2 * (num_pairs + num_queries) > seq_len:
        problems.append(
            Problem(
                "data.seq_len",
                f"{seq_len} is too short for {num_pairs} pairs and {num_queries} queries",
                f"use data.seq_len >= {2 * (num_pairs + num_queries)}",
            )
        )
    return problems
