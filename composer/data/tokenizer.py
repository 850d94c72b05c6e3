"""Tokenizers: ``char``, ``byte`` and ``bpe``, all ``tokenizers.Tokenizer`` objects (saved as tokenizer.json).

    char  one token per character seen in the training text, plus [UNK] (id 0) for the rest
    byte  256 tokens, id = byte value (UTF-8 bytes, GPT-2's byte-to-character table)
    bpe   byte-level BPE (GPT-2 pre-tokenizer) trained on the training text, ``bpe_vocab_size`` tokens

``decode(encode(s)) == s`` for every string (char: over the characters it has seen). None has
special tokens, so no text is ever read as one.

``StreamEncoder`` encodes text handed over in pieces exactly as if it were one string: it holds
back the last pre-token of each piece (the only one the next piece can change), which is what lets
``composer-prepare`` work in blocks and resume midway. Pre-tokens are short (char: one character;
byte: at most 256 characters; bpe: a word, a number or a run of spaces), so little is held back.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..contract.options import is_int
from ..errors import ConfigError, DataError, Problem
from .util import atomic_write_bytes

KINDS = ("char", "byte", "bpe")
UNK = "[UNK]"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character (the ByteLevel pre-tokenizer's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """[UNK] = 0, then every character of ``texts`` in code-point order."""
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    vocab = {UNK: 0, **{ch: i + 1 for i, ch in enumerate(sorted(seen))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # join without spaces
    return tok


def byte_tokenizer() -> Tokenizer:
    """256 tokens; token id = byte value."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    # pieces of <= 256 characters (any cut is safe: no token spans two bytes), then bytes to characters
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\s\S]{1,256}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` tokens (the 256 bytes first) trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = [ch for _, ch in sorted(bytes_to_unicode().items())]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=[], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def check_tokenizer_options(kind: str, bpe_vocab_size: int) -> list[Problem]:
    problems = []
    if kind not in KINDS:
        problems.append(Problem("data.tokenizer", f"unknown tokenizer {kind!r}", f"use one of {', '.join(KINDS)}"))
    if kind == "bpe" and (not is_int(bpe_vocab_size) or bpe_vocab_size < 257):
        problems.append(
            Problem(
                "data.bpe_vocab_size",
                f"{bpe_vocab_size!r} is too small for byte-level BPE",
                "use an integer > 256 (the 256 bytes come first), e.g. 4096",
            )
        )
    return problems


def build_tokenizer(kind: str, texts: Iterable[str], bpe_vocab_size: int = 4096) -> Tokenizer:
    """A new ``kind`` tokenizer fitted to ``texts`` (the training text; byte ignores it)."""
    problems = check_tokenizer_options(kind, bpe_vocab_size)
    if problems:
        raise ConfigError.of(problems)
    if kind == "char":
        return char_tokenizer(texts)
    if kind == "byte":
        return byte_tokenizer()
    return bpe_tokenizer(texts, bpe_vocab_size)


def load_tokenizer(path: str | Path, key: str = "data.tokenizer_path") -> Tokenizer:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such tokenizer file ({key}); point it at a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exceptions for malformed files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{path}: not a readable tokenizers JSON file ({reason}); give a tokenizer.json saved by "
            "the `tokenizers` library"
        ) from None


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write ``tokenizer.json`` atomically."""
    atomic_write_bytes(Path(path), tokenizer.to_str(pretty=True).encode())


class StreamEncoder:
    """Encode text handed over in pieces to the same ids as encoding it all at once.

        enc = StreamEncoder(tok)
        ids = [enc.feed(piece) for piece in pieces] + [enc.finish()]     # int64 arrays

    ``carry`` is the text held back (the last pre-token so far); everything before it is final.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.carry = ""

    def feed(self, text: str) -> np.ndarray:
        text = self.carry + text
        if not text:
            return np.zeros(0, dtype=np.int64)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        words = enc.word_ids
        if not words:
            self.carry = text
            return np.zeros(0, dtype=np.int64)
        first = len(words) - 1  # first token of the last pre-token
        while first > 0 and words[first - 1] == words[-1] and words[-1] is not None:
            first -= 1
        cut = enc.offsets[first][0]
        self.carry = text[cut:]
        return np.asarray(enc.ids[:first], dtype=np.int64)

    def finish(self) -> np.ndarray:
        text, self.carry = self.carry, ""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def encode_text(tokenizer: Tokenizer, pieces: Iterable[str]) -> np.ndarray:
    """All ids of the concatenated ``pieces`` (int64)."""
    enc = StreamEncoder(tokenizer)
    parts = [enc.feed(p) for p in pieces]
    parts.append(enc.finish())
    return np.concatenate(parts)
