"""Language modelling on local UTF-8 text (a file or a folder of files), tokenized in memory.

The first ``1 - val_fraction`` of the bytes train, the rest validate (see ``sources.Corpus``).
The tokenizer (char | byte | bpe) is built from the training split only. Training batches are
random windows (deterministic per (seed, batch)); validation is the whole validation split as
consecutive windows. For corpora larger than memory use ``composer-prepare`` and ``data=tokens``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from ..errors import ConfigError
from .common import DataModule
from .sources import Corpus
from .tokenizer import build_tokenizer, check_tokenizer_options, encode_text, load_tokenizer
from .util import check_fraction, missing_path, stream_problems, token_dtype
from .windows import WindowDataset, WindowSource, check_split_sizes


class TextDataModule(DataModule):
    """Text data. Defaults match conf/data/text.yaml.

    path:            a UTF-8 text file or a folder of them (required)
    tokenizer:       char | byte | bpe
    bpe_vocab_size:  tokens of the bpe tokenizer
    tokenizer_path:  a tokenizer.json to use instead of building one
    seq_len:         tokens per window
    batch_size:      windows per training batch
    val_fraction:    share of the bytes (from the end) kept for validation
    """

    name = "text"

    def __init__(
        self,
        *,
        path: Optional[str] = None,
        seed: int = 0,
        tokenizer: str = "char",
        bpe_vocab_size: int = 4096,
        tokenizer_path: Optional[str] = None,
        seq_len: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        model_max_positions: Optional[int] = None,
    ):
        problems = stream_problems(seq_len, batch_size, num_workers) + missing_path(path) + check_fraction(val_fraction)
        if tokenizer_path is None:
            problems += check_tokenizer_options(tokenizer, bpe_vocab_size)
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
        self.corpus = Corpus.open(path)
        self.kind, self.bpe_vocab_size, self.val_fraction = tokenizer, bpe_vocab_size, val_fraction
        self.tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path).expanduser()

    def _build(self) -> None:
        split = self.corpus.split_offset(self.val_fraction)

        def train_text():
            return (text for text, _ in self.corpus.iter_text(0, split))

        if self.tokenizer_path is not None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)
        else:
            self.tokenizer = build_tokenizer(self.kind, train_text(), self.bpe_vocab_size)
        self.vocab_size = self.tokenizer.get_vocab_size()
        dtype = token_dtype(self.vocab_size)
        self.train_tokens = encode_text(self.tokenizer, train_text()).astype(dtype)  # [N_train]
        val_text = (text for text, _ in self.corpus.iter_text(split))
        self.val_tokens = encode_text(self.tokenizer, val_text).astype(dtype)  # [N_val]
        where = str(self.corpus.root)
        check_split_sizes(len(self.train_tokens), len(self.val_tokens), self.seq_len, self.batch_size, where, where)

    def _train_source(self) -> WindowSource:
        return WindowSource(self.train_tokens, self.seq_len, self.batch_size, self.seed)

    def _val_dataset(self) -> Dataset:
        return WindowDataset(self.val_tokens, self.seq_len)
