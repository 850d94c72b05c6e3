"""``composer-prepare``: turn a UTF-8 text file or folder into memory-mapped token files for ``data=tokens``.

    composer-prepare input.txt data/mytext --tokenizer bpe --bpe-vocab-size 8192
    composer-train data=tokens data.path=data/mytext

Writes ``OUTPUT/{train.bin, val.bin, tokenizer.json, meta.json}`` (format: composer/data/tokens.py),
streaming the input in blocks, so inputs larger than memory work. The split and tokenizers are
those of ``data=text``: the ids equal what the text data module makes of the same input.

Resumable: progress is recorded in ``OUTPUT/.prepare-state.json`` after every block (token files
grow as ``*.bin.partial``, fsynced first). Rerunning the same command after an interruption
continues where it stopped and produces the same files as an uninterrupted run. Finished files
appear under their final names only when complete (os.replace), and meta.json comes last. A full
disk stops it with "no space left on OUTPUT" (exit 2), keeping every block recorded so far; temp
files of a write that was killed are removed when it starts again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .cli import run
from .data.sources import BLOCK_BYTES, Corpus
from .data.tokenfiles import FORMAT, META, SPLITS, VERSION
from .data.tokenizer import (
    KINDS,
    StreamEncoder,
    build_tokenizer,
    check_tokenizer_options,
    load_tokenizer,
    save_tokenizer,
)
from .data.util import atomic_write_json, check_fraction, token_dtype
from .errors import ConfigError, DataError, Problem
from .files import no_space, remove_orphan_temps

STATE = ".prepare-state.json"
TOKENIZER = "tokenizer.json"


def prepare(
    input_path: str | Path,
    output: str | Path,
    *,
    tokenizer: str = "char",
    bpe_vocab_size: int = 4096,
    tokenizer_file: Optional[str | Path] = None,
    val_fraction: float = 0.1,
    block_bytes: int = BLOCK_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare (or finish preparing) ``output`` from ``input_path``; returns the meta.json contents.
    A full disk is a :class:`~composer.files.NoSpaceLeft` (rerun the same call once there is room)."""
    try:
        return _prepare(
            input_path,
            output,
            tokenizer=tokenizer,
            bpe_vocab_size=bpe_vocab_size,
            tokenizer_file=tokenizer_file,
            val_fraction=val_fraction,
            block_bytes=block_bytes,
            overwrite=overwrite,
            progress=progress,
        )
    except OSError as exc:
        full = no_space(
            exc,
            Path(output).expanduser(),
            keep="the blocks written so far are kept: rerun the same command once there is room, it resumes",
        )
        if full is None:
            raise
        raise full from None


def _prepare(
    input_path: str | Path,
    output: str | Path,
    *,
    tokenizer: str,
    bpe_vocab_size: int,
    tokenizer_file: Optional[str | Path],
    val_fraction: float,
    block_bytes: int,
    overwrite: bool,
    progress: bool,
) -> dict[str, Any]:
    problems = check_fraction(val_fraction, "val_fraction")
    if tokenizer_file is None:
        problems += check_tokenizer_options(tokenizer, bpe_vocab_size)
    if block_bytes < 1:
        problems.append(Problem("data.block_bytes", f"{block_bytes} must be positive", "use e.g. 1048576"))
    if problems:
        raise ConfigError.of(
            [Problem(p.path.replace("data.", "--").replace("_", "-"), p.message, p.fix) for p in problems],
            header="invalid arguments",
        )
    corpus = Corpus.open(input_path, key="INPUT")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder (OUTPUT); choose a folder path")
    out.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(out)  # of a write an earlier run was killed in
    settings = {
        "input": corpus.fingerprint(),
        "tokenizer": None if tokenizer_file else tokenizer,
        "bpe_vocab_size": bpe_vocab_size if tokenizer == "bpe" and not tokenizer_file else None,
        "tokenizer_file_sha256": _sha256(tokenizer_file) if tokenizer_file else None,
        "val_fraction": val_fraction,
    }
    if (out / META).exists():
        meta = _read_json(out / META)
        if meta.get("settings") == settings:
            _say(progress, f"{out} is already prepared from this input; nothing to do")
            return meta
        if not overwrite:
            raise DataError(
                f"{out}: already holds data prepared from other input or settings; choose another "
                "OUTPUT folder or pass --overwrite"
            )
        (out / META).unlink()
    state = _read_json(out / STATE) if (out / STATE).exists() else {}
    if state.get("settings") != settings:  # a fresh start: nothing earlier is reused
        for name in [f"{s}.bin{x}" for s in SPLITS for x in ("", ".partial")] + [TOKENIZER]:
            (out / name).unlink(missing_ok=True)
        state = {"settings": settings, "splits": {}}
        _save_state(out, state)

    split = corpus.split_offset(val_fraction)
    ranges = {"train": (0, split), "val": (split, corpus.total_bytes)}
    with _progress(progress) as bars:
        check = bars.add_task("check UTF-8", total=corpus.total_bytes)
        for _, offset in corpus.iter_text(block_bytes=block_bytes):  # fail before any long work
            bars.update(check, completed=offset)
        tok = _tokenizer(out, state, corpus, split, tokenizer, bpe_vocab_size, tokenizer_file, bars)
        vocab_size = tok.get_vocab_size()
        dtype = token_dtype(vocab_size)
        counts = {}
        for name in SPLITS:
            counts[name] = _encode_split(out, state, name, corpus, ranges[name], tok, dtype, block_bytes, bars)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "tokenizer": TOKENIZER,
        "tokenizer_kind": settings["tokenizer"] or "file",
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "settings": settings,
    }
    atomic_write_json(out / META, meta)
    (out / STATE).unlink(missing_ok=True)
    return meta


def _tokenizer(
    out: Path,
    state: dict,
    corpus: Corpus,
    split: int,
    kind: str,
    bpe_vocab_size: int,
    tokenizer_file: Optional[str | Path],
    bars: Progress,
) -> Any:
    """The tokenizer: reloaded when an earlier run saved it, else built from the training split and saved."""
    if state.get("tokenizer_saved") and (out / TOKENIZER).is_file():
        return load_tokenizer(out / TOKENIZER, key="OUTPUT")
    if tokenizer_file is not None:
        tok = load_tokenizer(tokenizer_file, key="--tokenizer-file")
    else:
        task = bars.add_task(f"{kind} tokenizer", total=split if kind != "byte" else 0)

        def train_text():
            for text, offset in corpus.iter_text(0, split):
                bars.update(task, completed=offset)
                yield text

        tok = build_tokenizer(kind, train_text(), bpe_vocab_size)
    save_tokenizer(tok, out / TOKENIZER)
    state["tokenizer_saved"] = True
    _save_state(out, state)
    return tok


def _encode_split(
    out: Path,
    state: dict,
    name: str,
    corpus: Corpus,
    span: tuple[int, int],
    tok: Any,
    dtype: np.dtype,
    block_bytes: int,
    bars: Progress,
) -> int:
    """Tokenize bytes ``span`` of the corpus into ``out/<name>.bin``, resuming from the state; token count."""
    final, partial = out / f"{name}.bin", out / f"{name}.bin.partial"
    done = state["splits"].get(name, {})
    if done.get("done"):
        size = done["tokens"] * dtype.itemsize
        if final.is_file() and final.stat().st_size == size:
            return done["tokens"]
        if partial.is_file() and partial.stat().st_size == size:  # stopped between state save and rename
            os.replace(partial, final)
            return done["tokens"]
        done = {}
    if done and not (partial.is_file() and partial.stat().st_size >= done["tokens"] * dtype.itemsize):
        done = {}  # the partial file is gone or shorter than recorded: start this split again
    offset, tokens = (done["offset"], done["tokens"]) if done else (span[0], 0)
    task = bars.add_task(f"tokenize {name}", total=span[1] - span[0], completed=offset - span[0])
    encoder = StreamEncoder(tok)
    with open(partial, "r+b" if done else "wb") as f:
        f.truncate(tokens * dtype.itemsize)  # drop ids written after the last recorded block
        f.seek(0, os.SEEK_END)
        for text, end in corpus.iter_text(offset, span[1], block_bytes=block_bytes):
            tokens += _append(f, encoder.feed(text), dtype)
            resume = end - len(encoder.carry.encode("utf-8"))  # the held-back text is re-read on resume
            state["splits"][name] = {"offset": resume, "tokens": tokens}
            _save_state(out, state)
            bars.update(task, completed=end - span[0])
        tokens += _append(f, encoder.finish(), dtype)
    state["splits"][name] = {"done": True, "tokens": tokens}
    _save_state(out, state)
    os.replace(partial, final)
    return tokens


def _append(f: Any, ids: np.ndarray, dtype: np.dtype) -> int:
    f.write(ids.astype(dtype).tobytes())
    f.flush()
    os.fsync(f.fileno())
    return len(ids)


def _save_state(out: Path, state: dict) -> None:
    atomic_write_json(out / STATE, state)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: unreadable; delete it (or the whole OUTPUT folder) and rerun composer-prepare")
    return obj


def _sha256(path: str | Path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such tokenizer file (--tokenizer-file); point it at a tokenizer.json")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _progress(enabled: bool) -> Progress:
    columns = (
        TextColumn("{task.description:<18}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False)


def _say(enabled: bool, text: str) -> None:
    if enabled:
        Console(stderr=True).print(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="composer-prepare",
        description="Tokenize UTF-8 text into train.bin / val.bin "
        "(+ tokenizer.json, meta.json) for `composer-train data=tokens data.path=OUTPUT`. "
        "Resumable: rerun the same command after an interruption.",
    )
    p.add_argument("input", metavar="INPUT", help="a UTF-8 text file or a folder of them (sorted by name)")
    p.add_argument("output", metavar="OUTPUT", help="folder to write")
    p.add_argument("--tokenizer", default="char", choices=KINDS, help="tokenizer to build (default: char)")
    p.add_argument("--bpe-vocab-size", type=int, default=4096, help="tokens of the bpe tokenizer (default: 4096)")
    p.add_argument("--tokenizer-file", default=None, help="use this tokenizer.json instead of building one")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share kept for validation (default: 0.1)")
    p.add_argument("--block-bytes", type=int, default=BLOCK_BYTES, help="bytes read per block (default: 1 MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace data prepared from other input")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(
        _main,
        None if argv is None else list(argv),
        prog="composer-prepare",
        interrupted="interrupted; rerun the same command to resume",
    )


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    meta = prepare(
        args.input,
        args.output,
        tokenizer=args.tokenizer,
        bpe_vocab_size=args.bpe_vocab_size,
        tokenizer_file=args.tokenizer_file,
        val_fraction=args.val_fraction,
        block_bytes=args.block_bytes,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(
            f"{args.output}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens "
            f"({meta['dtype']}, vocabulary {meta['vocab_size']:,}). Train with:\n"
            f"  composer-train data=tokens data.path={args.output}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
