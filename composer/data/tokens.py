"""Pre-tokenized corpora: memory-mapped ``train.bin`` / ``val.bin`` token ids, for data larger than memory.

A folder written by ``composer-prepare`` holds:

    train.bin, val.bin   token ids, native byte order, dtype uint16 (vocab <= 65536) or uint32
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
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .common import DataModule, missing_path
from .tokenizer import load_tokenizer
from .windows import TokenFile, WindowDataset, WindowSource, check_split_sizes

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
        raise DataError(f"{path}: missing, so {folder} is not a finished composer-prepare output; run "
                        f"`composer-prepare <text> {folder}` (it resumes an interrupted run)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({type(exc).__name__}); rerun composer-prepare into a new folder") \
            from None
    need = {"format", "version", "dtype", "vocab_size", "train_tokens", "val_tokens"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not need <= set(meta):
        raise DataError(f"{path}: not a composer-prepare meta.json (needs {', '.join(sorted(need))}); rerun "
                        "composer-prepare into a new folder")
    if meta["version"] > VERSION or meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: format version {meta['version']} / dtype {meta['dtype']} is not readable by this "
                        "composer; upgrade composer or rerun composer-prepare")
    return meta


class TokensDataModule(DataModule):
    """Memory-mapped token data. Defaults match conf/data/tokens.yaml.

    path:        the folder composer-prepare wrote (or its meta.json)
    seq_len:     tokens per window
    batch_size:  windows per training batch
    """

    name = "tokens"

    def __init__(self, *, path: Optional[str] = None, seed: int = 0, seq_len: int = 256, batch_size: int = 32,
                 num_workers: int = 0, model_max_positions: Optional[int] = None):
        problems = missing_path(path)
        if problems:
            raise ConfigError.of(problems)
        folder = Path(path).expanduser()
        self.folder = folder.parent if folder.name == META else folder
        super().__init__(seed=seed, seq_len=seq_len, batch_size=batch_size, num_workers=num_workers,
                         model_max_positions=model_max_positions, where=str(self.folder))
        self.meta = read_meta(self.folder)

    def _build(self) -> None:
        meta, dtype = self.meta, np.dtype(self.meta["dtype"])
        files = {}
        for split in SPLITS:
            path, count = self.folder / f"{split}.bin", int(meta[f"{split}_tokens"])
            size = path.stat().st_size if path.is_file() else None
            if size != count * dtype.itemsize:
                found = "is missing" if size is None else f"has {size} bytes"
                raise DataError(f"{path}: {found} but meta.json says {count} {dtype.name} tokens "
                                f"({count * dtype.itemsize} bytes); rerun composer-prepare into a new folder")
            files[split] = TokenFile(path, dtype, count)
        tokenizer = meta.get("tokenizer")
        self.tokenizer = load_tokenizer(self.folder / tokenizer, key=f"{self.folder / META}") if tokenizer else None
        self.vocab_size = int(meta["vocab_size"])
        self.train_tokens, self.val_tokens = files["train"], files["val"]
        check_split_sizes(len(self.train_tokens), len(self.val_tokens), self.seq_len, self.batch_size,
                          str(files["train"].path), str(files["val"].path))

    def _train_source(self) -> WindowSource:
        return WindowSource(self.train_tokens, self.seq_len, self.batch_size, self.seed)

    def _val_dataset(self) -> Dataset:
        return WindowDataset(self.val_tokens, self.seq_len)
