"""Windows over a token array (in memory or memory-mapped): random ones to train, consecutive ones to validate."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..contract.options import IGNORE_INDEX
from ..errors import DataError
from .tokenfiles import TokenFile
from .util import rng_for

Tokens = Union[np.ndarray, TokenFile]


def _array(tokens: Tokens) -> np.ndarray:
    return tokens.array() if isinstance(tokens, TokenFile) else tokens


class WindowSource:
    """Training batch ``index``: ``batch_size`` windows of ``seq_len`` tokens at random starts.

    The starts come from an RNG seeded by (seed, index). Batches: input_ids = labels, [B, T] int64.
    """

    def __init__(self, tokens: Tokens, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        data = _array(self.tokens)
        starts = rng_for(self.seed, 0, index).integers(0, len(data) - self.seq_len + 1, size=self.batch_size)
        x = torch.from_numpy(np.stack([data[s : s + self.seq_len] for s in starts]).astype(np.int64))  # [B, T]
        return {"input_ids": x, "labels": x.clone()}


class WindowDataset(Dataset):
    """The whole token array as consecutive, non-overlapping windows of ``seq_len``.

    When the length is not a multiple of ``seq_len``, one more window ends at the last token; its
    labels are -100 where earlier windows already scored them, so every token counts once.
    Items: {"input_ids": [T], "labels": [T]}.
    """

    def __init__(self, tokens: Tokens, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        n = len(tokens)
        self.full, self.rest = n // seq_len, n % seq_len

    def __len__(self) -> int:
        return self.full + (1 if self.rest and self.full else 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        data, t = _array(self.tokens), self.seq_len
        start = i * t if i < self.full else len(data) - t
        x = torch.from_numpy(np.asarray(data[start : start + t], dtype=np.int64))
        labels = x.clone()
        if i == self.full:
            labels[: t - self.rest] = IGNORE_INDEX  # already scored by window full - 1
        return {"input_ids": x, "labels": labels}


def check_split_sizes(
    train_tokens: int, val_tokens: int, seq_len: int, batch_size: int, train_where: str, val_where: str
) -> None:
    """DataError unless training holds one batch of windows and validation one window."""
    need = seq_len * batch_size
    if train_tokens < need:
        raise DataError(
            f"{train_where}: the training split has {train_tokens} tokens, fewer than one batch needs "
            f"({batch_size} x {seq_len} = {need}); add text or lower data.batch_size / data.seq_len"
        )
    if val_tokens < seq_len:
        raise DataError(
            f"{val_where}: the validation split has {val_tokens} tokens, fewer than one window of "
            f"data.seq_len={seq_len}; add text, raise data.val_fraction or lower data.seq_len"
        )
