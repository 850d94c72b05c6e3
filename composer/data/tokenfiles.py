"""The on-disk format of pre-tokenized corpora (``data=tokens``, written by ``composer-prepare``).

A folder written by ``composer-prepare`` holds:

    train.bin, val.bin   token ids, little-endian, dtype uint16 (vocab <= 65536) or uint32
    tokenizer.json       the tokenizer (or none, for ids made elsewhere: meta "tokenizer": null)
    meta.json            {"format": "composer-tokens", "version": 1, "dtype": "uint16", "vocab_size": V,
                          "tokenizer": "tokenizer.json", "train_tokens": N, "val_tokens": M, ...}

meta.json is written last, so a folder without it is unfinished (rerun composer-prepare; it resumes).
Every field is checked when the folder is opened (a wrong type is a DataError naming meta.json and
the field), and every id of both splits against ``vocab_size`` (:func:`check_ids`), so a corrupt
or foreign file is named at setup, not as an index error mid-training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..contract.options import is_int
from ..errors import DataError

FORMAT = "composer-tokens"
VERSION = 1
META = "meta.json"
SPLITS = ("train", "val")
CHUNK = 1 << 24  # ids checked per read (16 Mi)


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
    _check_fields(path, meta)
    if meta["version"] > VERSION or meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(
            f"{path}: format version {meta['version']} / dtype {meta['dtype']} is not readable by this "
            "composer; upgrade composer or rerun composer-prepare"
        )
    return meta


def _check_fields(path: Path, meta: dict[str, Any]) -> None:
    """DataError naming the first field of meta.json whose type or range is wrong."""
    fields = {"version": 1, "vocab_size": 1, "train_tokens": 0, "val_tokens": 0}  # integers, with their minimum
    for key, least in fields.items():
        value = meta[key]
        if not is_int(value) or value < least:
            raise DataError(
                f"{path}: {key!r} is {value!r}, expected an integer >= {least}; the file is damaged or not "
                "written by composer-prepare: rerun composer-prepare into a new folder"
            )
    if not isinstance(meta["dtype"], str):
        raise DataError(f"{path}: 'dtype' is {meta['dtype']!r}, expected 'uint16' or 'uint32'; rerun composer-prepare")
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer or Path(tokenizer).name != tokenizer):
        raise DataError(
            f"{path}: 'tokenizer' is {tokenizer!r}, expected the name of a file beside it (or null); "
            "rerun composer-prepare into a new folder"
        )


def check_ids(tokens: TokenFile, vocab_size: int, meta_path: Path) -> None:
    """DataError naming ``tokens``' file, the first id at or above ``vocab_size`` and its position."""
    if np.iinfo(tokens.dtype).max < vocab_size or len(tokens) == 0:
        return  # every value of the dtype is a valid id
    data = tokens.array()
    for start in range(0, len(data), CHUNK):
        chunk = np.asarray(data[start : start + CHUNK])
        if int(chunk.max()) >= vocab_size:
            where = int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"{tokens.path}: token id {int(chunk[where])} at position {start + where:,} is not below "
                f"vocab_size={vocab_size} of {meta_path}; the file is damaged or was made with another "
                "tokenizer: rerun composer-prepare into a new folder"
            )


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
