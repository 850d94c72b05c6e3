"""The on-disk format of pre-tokenized corpora (``data=tokens``, written by ``composer-prepare``).

A folder written by ``composer-prepare`` holds:

    train.bin, val.bin   token ids, little-endian, dtype uint16 (vocab <= 65536) or uint32
    tokenizer.json       the tokenizer (or none, for ids made elsewhere: meta "tokenizer": null)
    meta.json            {"format": "composer-tokens", "version": 1, "dtype": "uint16", "vocab_size": V,
                          "tokenizer": "tokenizer.json", "train_tokens": N, "val_tokens": M, ...}

meta.json is written last, so a folder without it is unfinished (rerun composer-prepare; it resumes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import DataError

FORMAT = "composer-tokens"
VERSION = 1
META = "meta.json"
SPLITS = ("train", "val")


def read_meta(folder: Path) -> dict[str, Any]:
    """The checked meta.json of a prepared folder."""
    path = folder / META
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (data.path); make it with `composer-prepare <text> {folder}`")
    if not path.is_file():
        raise DataError(
            f"{path}: missing, so {folder} is not a finished composer-prepare output; run "
            f"`composer-prepare <text> {folder}` (it resumes an interrupted run)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path}: unreadable ({type(exc).__name__}); rerun composer-prepare into a new folder"
        ) from None
    need = {"format", "version", "dtype", "vocab_size", "train_tokens", "val_tokens"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not need <= set(meta):
        raise DataError(
            f"{path}: not a composer-prepare meta.json (needs {', '.join(sorted(need))}); rerun "
            "composer-prepare into a new folder"
        )
    if meta["version"] > VERSION or meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(
            f"{path}: format version {meta['version']} / dtype {meta['dtype']} is not readable by this "
            "composer; upgrade composer or rerun composer-prepare"
        )
    return meta


class TokenFile:
    """A ``.bin`` file of ``count`` token ids of ``dtype``, memory-mapped on first use (pickles without data)."""

    def __init__(self, path: Path, dtype: np.dtype, count: int):
        self.path, self.dtype, self.count = Path(path), np.dtype(dtype), count
        self._array: Optional[np.memmap] = None

    def array(self) -> np.ndarray:
        if self._array is None:
            if self.count == 0:
                return np.zeros(0, dtype=self.dtype)
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count,))
        return self._array

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}
