"""Pre-tokenized corpora: memory-mapped ``train.bin`` / ``val.bin`` token ids, for data larger than memory.

The folder format is described in ``tokenfiles.py``; ``composer-prepare`` writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .common import DataModule
from .tokenfiles import META, SPLITS, TokenFile, check_ids, read_meta
from .tokenizer import load_tokenizer
from .util import missing_path, stream_problems
from .windows import WindowDataset, WindowSource, check_split_sizes


class TokensDataModule(DataModule):
    """Memory-mapped token data. Defaults match conf/data/tokens.yaml.

    path:        the folder composer-prepare wrote (or its meta.json)
    seq_len:     tokens per window
    batch_size:  windows per training batch
    """

    name = "tokens"

    def __init__(
        self,
        *,
        path: Optional[str] = None,
        seed: int = 0,
        seq_len: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        model_max_positions: Optional[int] = None,
    ):
        problems = stream_problems(seq_len, batch_size, num_workers) + missing_path(path)
        if problems:
            raise ConfigError.of(problems)
        folder = Path(path).expanduser()
        self.folder = folder.parent if folder.name == META else folder
        super().__init__(
            seed=seed,
            seq_len=seq_len,
            batch_size=batch_size,
            num_workers=num_workers,
            model_max_positions=model_max_positions,
            where=str(self.folder),
        )
        self.meta = read_meta(self.folder)

    def _build(self) -> None:
        meta, dtype = self.meta, np.dtype(self.meta["dtype"]).newbyteorder("<")
        files = {}
        for split in SPLITS:
            path, count = self.folder / f"{split}.bin", int(meta[f"{split}_tokens"])
            size = path.stat().st_size if path.is_file() else None
            if size != count * dtype.itemsize:
                found = "is missing" if size is None else f"has {size} bytes"
                raise DataError(
                    f"{path}: {found} but meta.json says {count} {dtype.name} tokens "
                    f"({count * dtype.itemsize} bytes); rerun composer-prepare into a new folder"
                )
            files[split] = TokenFile(path, dtype, count)
            check_ids(files[split], int(meta["vocab_size"]), self.folder / META)  # at setup, not mid-training
        tokenizer = meta.get("tokenizer")
        self.tokenizer = load_tokenizer(self.folder / tokenizer, key=f"{self.folder / META}") if tokenizer else None
        self.vocab_size = int(meta["vocab_size"])
        self.train_tokens, self.val_tokens = files["train"], files["val"]
        check_split_sizes(
            len(self.train_tokens),
            len(self.val_tokens),
            self.seq_len,
            self.batch_size,
            str(files["train"].path),
            str(files["val"].path),
        )

    def _train_source(self) -> WindowSource:
        return WindowSource(self.train_tokens, self.seq_len, self.batch_size, self.seed)

    def _val_dataset(self) -> Dataset:
        return WindowDataset(self.val_tokens, self.seq_len)
