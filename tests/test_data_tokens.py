"""composer-prepare and the memory-mapped tokens data module: equality with text data, resume, atomic files."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

import composer.prepare as prep
from composer import DataError
from composer.data import TextDataModule, TokensDataModule
from composer.prepare import main, prepare

WORDS = ["the", "king", "queen", "speaks", "now", "é", "—", "🙂", "\n", "  ", "\n\n", "'tis", "well,"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of two text files (~30 KB) with multi-byte characters and blank lines."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for name in ("b.txt", "a.txt"):
        (root / name).write_text(" ".join(rng.choice(WORDS) for _ in range(3000)), encoding="utf-8")
    return root


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_memmap_tokens_equal_tokenizing_directly(corpus, tmp_path, kind):
    meta = prepare(corpus, tmp_path / "out", tokenizer=kind, bpe_vocab_size=300, block_bytes=4096, progress=False)
    assert meta["dtype"] == "uint16"
    assert sorted(files(tmp_path / "out")) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    tokens = TokensDataModule(path=str(tmp_path / "out"), seq_len=32, batch_size=4)
    tokens.setup("fit")
    text = TextDataModule(path=str(corpus), tokenizer=kind, bpe_vocab_size=300, seq_len=32, batch_size=4)
    text.setup("fit")
    assert isinstance(tokens.train_tokens.array(), np.memmap)
    assert np.array_equal(tokens.train_tokens.array(), text.train_tokens)
    assert np.array_equal(tokens.val_tokens.array(), text.val_tokens)
    assert tokens.vocab_size == text.vocab_size == meta["vocab_size"]
    assert tokens.tokenizer.to_str() == text.tokenizer.to_str()
    both = [list(itertools.islice(iter(dm.train_dataloader()), 3)) + list(dm.val_dataloader()) for dm in (tokens, text)]
    for x, y in zip(*both, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    # and tokenizing the same bytes by hand
    whole = b"".join(p.read_bytes() for p in sorted(corpus.iterdir())).decode()
    ids = np.concatenate([tokens.train_tokens.array(), tokens.val_tokens.array()])
    assert text.tokenizer.decode(ids.tolist()) == whole


def test_large_vocabularies_use_uint32(tmp_path):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70_000 + 2048) if not 0xD800 <= c <= 0xDFFF][:70_000]
    (tmp_path / "big.txt").write_text("".join(chars) * 2, encoding="utf-8")
    meta = prepare(tmp_path / "big.txt", tmp_path / "out", val_fraction=0.5, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001
    dm = TokensDataModule(path=str(tmp_path / "out"), seq_len=64, batch_size=2)
    dm.setup("fit")
    arr = dm.train_tokens.array()
    assert arr.dtype == np.uint32 and int(arr.max()) == 70_000
    assert dm.tokenizer.decode(arr[:5].tolist()) == "".join(chars[:5])


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [1, 2, 9, 16, 17, 19])  # setup, tokenizer, train, renames, val
def test_an_interrupted_prepare_resumes_to_identical_files(corpus, tmp_path, monkeypatch, stop_at):
    args = {"tokenizer": "bpe", "bpe_vocab_size": 300, "block_bytes": 2048, "progress": False}
    prepare(corpus, tmp_path / "ref", **args)
    calls = itertools.count(1)
    real = prep._save_state

    def crash(out, state):  # dies right before recording progress: the .partial file holds unrecorded ids
        if next(calls) == stop_at:
            raise Stop
        real(out, state)

    monkeypatch.setattr(prep, "_save_state", crash)
    with pytest.raises(Stop):
        prepare(corpus, tmp_path / "out", **args)
    left = files(tmp_path / "out")
    assert "meta.json" not in left and not {"train.bin", "val.bin"} <= set(left)  # nothing looks complete
    with pytest.raises(DataError, match="meta.json"):
        TokensDataModule(path=str(tmp_path / "out"))
    monkeypatch.setattr(prep, "_save_state", real)
    prepare(corpus, tmp_path / "out", **args)
    assert files(tmp_path / "out") == files(tmp_path / "ref")


def test_cli_runs_rerun_is_a_no_op_and_other_input_needs_overwrite(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(corpus), str(out), "--tokenizer", "byte", "--quiet"]) == 0
    before = files(out)
    assert json.loads(before["meta.json"])["vocab_size"] == 256
    assert main([str(corpus), str(out), "--tokenizer", "byte", "--quiet"]) == 0
    assert files(out) == before
    other = tmp_path / "other.txt"
    other.write_text("something else entirely " * 100)
    capsys.readouterr()
    assert main([str(other), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out) in err and "--overwrite" in err
    assert main([str(other), str(out), "--quiet", "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["tokenizer_kind"] == "char"


@pytest.mark.parametrize("case", ["missing", "empty", "latin1", "bpe_vocab"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    path = tmp_path / "in.txt"
    extra = []
    if case == "empty":
        path.write_text("")
    elif case == "latin1":
        path.write_bytes(b"abc\ndef \xff\n")
    elif case == "bpe_vocab":
        path.write_text("text " * 10)
        extra = ["--tokenizer", "bpe", "--bpe-vocab-size", "10"]
    assert main([str(path), str(tmp_path / "out"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert ("--bpe-vocab-size" if case == "bpe_vocab" else str(path)) in err
    if case == "latin1":
        assert "byte offset 8" in err


def test_tokens_module_errors_name_the_file(corpus, tmp_path):
    with pytest.raises(DataError) as err:
        TokensDataModule(path=str(tmp_path / "nothing"))
    assert "composer-prepare" in str(err.value) and str(tmp_path / "nothing") in str(err.value)
    prepare(corpus, tmp_path / "out", progress=False)
    train = tmp_path / "out" / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])  # truncated
    dm = TokensDataModule(path=str(tmp_path / "out"))
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert str(train) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError) as err:
        TokensDataModule(path=str(tmp_path / "out"), seq_len=512, model_max_positions=256)
    assert "data.seq_len=512" in str(err.value) and str(tmp_path / "out") in str(err.value)


def test_fewer_tokens_than_one_batch_names_train_bin(corpus, tmp_path):
    prepare(corpus, tmp_path / "out", tokenizer="bpe", bpe_vocab_size=300, progress=False)
    dm = TokensDataModule(path=str(tmp_path / "out"), seq_len=1024, batch_size=64)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "train.bin" in msg and str(64 * 1024) in msg


@pytest.mark.parametrize(
    "field, value",
    [("version", "1"), ("version", None), ("train_tokens", "lots"), ("train_tokens", -5), ("vocab_size", 2.5)],
)
def test_a_bad_meta_field_is_a_data_error_naming_meta_json(corpus, tmp_path, field, value):
    out = tmp_path / "out"
    prepare(corpus, out, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(DataError) as err:
        TokensDataModule(path=str(out)).setup("fit")
    assert str(out / "meta.json") in str(err.value) and repr(field) in str(err.value) and repr(value) in str(err.value)


def test_an_id_past_the_vocabulary_is_found_at_setup_naming_the_file(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare(corpus, out, progress=False)
    ids = np.fromfile(out / "val.bin", dtype="<u2")
    ids[7] = meta["vocab_size"] + 3  # damaged, or written with another tokenizer
    ids.tofile(out / "val.bin")
    with pytest.raises(DataError) as err:
        TokensDataModule(path=str(out), seq_len=32, batch_size=4).setup("fit")
    text = str(err.value)
    assert str(out / "val.bin") in text and f"token id {meta['vocab_size'] + 3} at position 7" in text
    assert f"vocab_size={meta['vocab_size']}" in text


def test_a_full_disk_stops_prepare_with_one_line_and_a_rerun_finishes_it(corpus, tmp_path, monkeypatch, capsys):
    import errno

    args = ["--tokenizer", "char", "--block-bytes", "2048", "--quiet"]
    assert main([str(corpus), str(tmp_path / "ref"), *args]) == 0
    real, calls = prep._append, itertools.count(1)

    def full(f, ids, dtype):
        if next(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, ids, dtype)

    out = tmp_path / "out"
    monkeypatch.setattr(prep, "_append", full)
    capsys.readouterr()
    assert main([str(corpus), str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"no space left on {out}" in err and "it resumes" in err and "Traceback" not in err
    (out / ".meta.json.4242.deadbeef.tmp").write_bytes(b"{")  # what a killed write leaves
    monkeypatch.setattr(prep, "_append", real)
    assert main([str(corpus), str(out), *args]) == 0
    assert files(out) == files(tmp_path / "ref")  # the orphan temp file is gone too
