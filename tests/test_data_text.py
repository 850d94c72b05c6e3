"""Text data: tokenizers, the byte-offset split, reading in blocks, windows, and every bad-data error."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from composer import ConfigError, DataError
from composer.data import TextDataModule, build_datamodule
from composer.data.sources import Corpus
from composer.data.tokenizer import StreamEncoder, build_tokenizer, byte_tokenizer, char_tokenizer, encode_text

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\tSpeak, speak. Ünïcödé → ✓ 🙂\r\n"


def text_dm(path, **kw) -> TextDataModule:
    args = {"path": str(path), "seed": 0, "seq_len": 8, "batch_size": 2, "tokenizer": "char"}
    dm = TextDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def one_line(err, *names) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    for name in names:
        assert str(name) in msg
    return msg


# ---------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_tokenizers_round_trip_spaces_newlines_and_unicode(kind):
    tok = build_tokenizer(kind, [SAMPLE * 20], bpe_vocab_size=300)
    for s in (SAMPLE, "  leading and trailing  ", "\n\n\n", " ", "a\r\nb\tc", ""):
        if kind == "char":
            s = "".join(ch for ch in s if ch in SAMPLE)
        ids = tok.encode(s).ids
        assert tok.decode(ids) == s
    if kind == "bpe":
        assert 256 < tok.get_vocab_size() <= 300
        assert len(tok.encode(SAMPLE).ids) < len(SAMPLE.encode())  # merges learned


def test_byte_ids_are_the_utf8_bytes_and_char_ids_the_seen_characters():
    byte = byte_tokenizer()
    assert byte.get_vocab_size() == 256
    assert byte.encode("aé\n 🙂").ids == list("aé\n 🙂".encode())
    char = char_tokenizer(["ba\n b"])
    assert char.get_vocab() == {"[UNK]": 0, "\n": 1, " ": 2, "a": 3, "b": 4}
    assert char.encode("ab?").ids == [3, 4, 0]  # unseen characters are [UNK]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_byte_tokenizer_round_trips_any_text(s):
    tok = byte_tokenizer()
    assert tok.decode(tok.encode(s).ids) == s


BPE = build_tokenizer(
    "bpe", [SAMPLE * 10, "the quick brown fox\n  jumps   over\n\nthe lazy dog's tail 12345"], bpe_vocab_size=320
)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" \n\t\r'aeTh.12🙂é")), max_size=120), st.data())
def test_stream_encoder_equals_encoding_at_once(s, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(s)), max_size=6)))
    pieces = [s[i:j] for i, j in zip([0, *cuts], [*cuts, len(s)], strict=True)]
    for tok in (BPE, byte_tokenizer(), char_tokenizer([s])):
        assert encode_text(tok, pieces).tolist() == tok.encode(s).ids
        assert tok.decode(tok.encode(s).ids) == s


def test_stream_encoder_holds_back_only_the_last_pre_token():
    enc = StreamEncoder(BPE)
    first = enc.feed("the quick brown")
    assert enc.carry == " brown"
    assert BPE.decode(first.tolist()) == "the quick"
    for tok, most in ((byte_tokenizer(), 256), (char_tokenizer(["ab"]), 1)):  # long text without spaces
        enc = StreamEncoder(tok)
        assert len(enc.feed("ab" * 5000)) >= 10_000 - most and len(enc.carry) <= most


# ---------------------------------------------------------------------------- reading and splitting
def test_folder_files_are_sorted_by_name_and_concatenated(tmp_path):
    (tmp_path / "b.txt").write_text("BBB")
    (tmp_path / "a.txt").write_text("AAA")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("CCC")
    (tmp_path / ".hidden").write_text("XXX")
    corpus = Corpus.open(tmp_path)
    assert [p.name for p in corpus.files] == ["a.txt", "b.txt", "c.txt"]
    assert corpus.read_text() == "AAABBBCCC"
    assert corpus.read_text(2, 7) == "ABBBC"  # ranges cross file boundaries


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
def test_reading_in_small_blocks_never_splits_a_character(tmp_path, block):
    text = "añ€🙂b" * 7
    (tmp_path / "1.txt").write_text(text[:10], encoding="utf-8")
    (tmp_path / "2.txt").write_text(text[10:], encoding="utf-8")
    corpus = Corpus.open(tmp_path)
    parts = list(corpus.iter_text(block_bytes=block))
    assert "".join(t for t, _ in parts) == text
    assert parts[-1][1] == corpus.total_bytes
    ends = [end for _, end in parts]
    assert ends == sorted(ends)
    data = text.encode()
    bounds = [i for i in range(len(data) + 1) if i == len(data) or not 0x80 <= data[i] <= 0xBF]
    for lo, hi in zip(bounds[::5], bounds[3::5], strict=False):  # ranges that start and end mid-file
        assert "".join(t for t, _ in corpus.iter_text(lo, hi, block_bytes=block)) == data[lo:hi].decode()


def test_split_is_by_bytes_at_a_character_boundary(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab€€€€", encoding="utf-8")  # 2 + 4 * 3 = 14 bytes
    corpus = Corpus.open(path)
    assert corpus.split_offset(0.5) == 8  # byte 7 is inside the second €
    assert corpus.read_text(0, 8) + corpus.read_text(8) == "ab€€€€"


def test_text_split_sizes_and_windows(tmp_path):
    path = tmp_path / "t.txt"
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefgh \n") for _ in range(1000))
    path.write_text(text)
    dm = text_dm(path, val_fraction=0.25, seq_len=16, batch_size=4)
    assert len(dm.train_tokens) == 750 and len(dm.val_tokens) == 250
    assert dm.tokenizer.decode(dm.train_tokens.tolist()) == text[:750]
    assert dm.tokenizer.decode(dm.val_tokens.tolist()) == text[750:]
    assert (dm.task, dm.metric, dm.vocab_size) == ("lm", None, 11)
    # validation: the whole split in windows; the last one ends at the end and scores only what is new
    val = list(dm.val_dataloader())
    ids = torch.cat([b["input_ids"] for b in val])
    labels = torch.cat([b["labels"] for b in val])
    assert ids.shape == (16, 16)  # 15 full windows + one ending at token 250
    assert torch.equal(ids[:15].flatten(), torch.from_numpy(dm.val_tokens[:240].astype(np.int64)))
    assert torch.equal(ids[15], torch.from_numpy(dm.val_tokens[-16:].astype(np.int64)))
    assert (labels[15] == -100).sum() == 6 and torch.equal(labels[15, 6:], ids[15, 6:])
    assert torch.equal(labels[:15], ids[:15])
    # training: random windows of the training split, input = labels
    train = dm.train_tokens.astype(np.int64)
    for b in itertools.islice(iter(dm.train_dataloader()), 3):
        assert b["input_ids"].shape == (4, 16) and torch.equal(b["input_ids"], b["labels"])
        for row in b["input_ids"].numpy():
            assert any(np.array_equal(row, train[s : s + 16]) for s in range(len(train) - 15))


def test_training_windows_depend_on_seed_and_batch_only(tmp_path):
    path = tmp_path / "t.txt"
    rng = random.Random(1)
    path.write_text("".join(rng.choice("abcdefgh") for _ in range(2000)))

    def first(seed, n=3, start=0):
        dm = text_dm(path, seed=seed)
        dm.load_state_dict({"batches_consumed": start})
        return [b["input_ids"] for b in itertools.islice(iter(dm.train_dataloader()), n)]

    a, b, c = first(0), first(0), first(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert torch.equal(first(0, 1, start=2)[0], a[2])


def test_bpe_is_trained_on_the_training_split_only(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abab abba " * 200 + "xyzzy zyxx " * 40)  # the x/y/z words are all in the last 18%
    dm = text_dm(path, tokenizer="bpe", bpe_vocab_size=400, val_fraction=0.2)
    merged = [t for t in dm.tokenizer.get_vocab() if len(t) > 1]
    assert merged and any("a" in t for t in merged)
    assert not any(ch in t for t in merged for ch in "xyz")


def test_a_saved_tokenizer_can_be_reused(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello there " * 100)
    tok = char_tokenizer(["hello there, world!"])
    tok.save(str(tmp_path / "tok.json"))
    dm = text_dm(path, tokenizer_path=str(tmp_path / "tok.json"))
    assert dm.vocab_size == tok.get_vocab_size() and dm.tokenizer.encode("h").ids == tok.encode("h").ids


# ---------------------------------------------------------------------------- bad data
def test_missing_path(tmp_path):
    with pytest.raises(DataError) as err:
        build_datamodule({"name": "text", "path": str(tmp_path / "nope.txt")}, seed=0)
    assert "data.path" in one_line(err, tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="data.path"):
        build_datamodule({"name": "text", "path": "???"}, seed=0)


def test_empty_file_and_empty_folder(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError) as err:
        text_dm(tmp_path / "empty.txt")
    assert "empty" in one_line(err, tmp_path / "empty.txt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError) as err:
        text_dm(tmp_path / "dir")
    one_line(err, tmp_path / "dir")


def test_non_utf8_names_the_file_and_byte_offset(tmp_path):
    (tmp_path / "a.txt").write_text("fine text " * 50)
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait " * 10)  # latin-1
    with pytest.raises(DataError) as err:
        text_dm(tmp_path)
    assert "byte offset 3" in one_line(err, tmp_path / "b.txt", "0xe9", "UTF-8")


def test_sequence_longer_than_the_model(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 1000)
    with pytest.raises(DataError) as err:
        build_datamodule(
            {"name": "text", "path": str(tmp_path / "t.txt"), "seq_len": 512}, seed=0, model_max_positions=256
        )
    one_line(err, tmp_path / "t.txt", "data.seq_len=512", "256")


def test_fewer_tokens_than_one_batch_says_how_many_are_needed(tmp_path):
    (tmp_path / "t.txt").write_text("y" * 100)
    with pytest.raises(DataError) as err:
        text_dm(tmp_path / "t.txt", seq_len=16, batch_size=8)
    assert "90 tokens" in one_line(err, tmp_path / "t.txt", "128")
    with pytest.raises(DataError) as err:
        text_dm(tmp_path / "t.txt", seq_len=16, batch_size=2, val_fraction=0.1)
    assert "validation split has 10 tokens" in one_line(err, tmp_path / "t.txt")


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"tokenizer": "word"}, "data.tokenizer"),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, "data.bpe_vocab_size"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"seq_len": 0}, "data.seq_len"),
    ],
)
def test_bad_options_are_config_errors(tmp_path, changes, key):
    (tmp_path / "t.txt").write_text("z" * 100)
    with pytest.raises(ConfigError, match=key):
        TextDataModule(path=str(tmp_path / "t.txt"), **changes)
