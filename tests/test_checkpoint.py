"""The checkpoint format: bit-exact round trips, sharding, tokenizers, versions, and a corpus of
corrupt checkpoints that must each give a CheckpointError with a useful message."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from composer import CheckpointError, ComposedModel, IncompatibleVersion, InvalidParameter, ModelError, compose, weights
from composer import checkpoint as ckpt
from composer.model import ModelBuilder
from tests.conftest import small_model_dict

LLAMA_LIKE = dict(
    attention={"type": "gqa", "num_kv_heads": 2},
    ffn={"type": "swiglu", "intermediate_size": 48},
    norm={"type": "rmsnorm"},
    position={"type": "rope"},
    tie_embeddings=False,
)
MODELS = {
    "tied": small_model_dict(),
    "untied": small_model_dict(tie_embeddings=False),
    "llama_like": small_model_dict(**LLAMA_LIKE),
    "moe": small_model_dict(
        ffn={"type": "moe", "num_experts": 4, "top_k": 2, "expert": {"type": "swiglu", "intermediate_size": 16}}
    ),
    "per_layer": small_model_dict(
        position={"type": "rope"},
        layers=[
            {"select": "1::2", "attention": {"type": "sliding_window", "window": 4}, "ffn": {"type": "swiglu"}},
            {"select": [0], "position": {"type": "alibi"}},
        ],
    ),
    "qk_norm": small_model_dict(attention={"type": "mha", "qk_norm": True}, position={"type": "rope"}),
    "classification": small_model_dict(head={"type": "classification", "num_classes": 3}),
    "parallel_partial_rope": small_model_dict(
        block={"type": "parallel"}, position={"type": "rope", "rotary_fraction": 0.5}
    ),
    "padded_vocab": small_model_dict(vocab_size=50, pad_vocab_to_multiple_of=16),
}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _write_raw(path: Path, header: dict, data: bytes = b"") -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[ComposedModel, Path]:
    model = compose(small_model_dict(**LLAMA_LIKE), seed=3)
    directory = tmp_path_factory.mktemp("saved")
    model.save_pretrained(directory)
    return model, directory


def _copy(saved_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(saved_dir, out)
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _metadata(directory: Path) -> dict[str, str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return f.metadata()


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_exact(name, tmp_path):
    model = compose(MODELS[name], seed=7)
    with torch.no_grad():  # norms away from 1 so a swapped norm weight would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    loaded = ComposedModel.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.tied == model.tied
    assert not loaded.training
    _same_state(model, loaded)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    model.eval()
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_loading_onto_a_device_this_process_cannot_use_names_the_argument(tmp_path):
    compose(small_model_dict(), seed=0).save_pretrained(tmp_path)
    with pytest.raises(InvalidParameter, match=r"device: 'cuda:99'"):
        ComposedModel.from_pretrained(tmp_path, device="cuda:99")
    with pytest.raises(InvalidParameter, match=r"device: 'npu0' is not a device"):
        ComposedModel.from_pretrained(tmp_path, device="npu0")


def test_tied_weights_are_stored_once_and_retied(tmp_path):
    model = compose(small_model_dict(), seed=0)
    model.save_pretrained(tmp_path)
    stored = _tensors(tmp_path)
    assert "embed.weight" in stored and "head.proj.weight" not in stored
    loaded = ComposedModel.from_pretrained(tmp_path)
    assert loaded.head.proj.weight is loaded.embed.weight


def test_layout_config_json_and_header_metadata(saved):
    model, directory = saved
    doc = json.loads((directory / "config.json").read_text())
    assert doc["format_version"] == ckpt.FORMAT_VERSION
    assert doc["dtype"] == "float32"
    assert doc["model"] == model.config.to_dict()
    meta = _metadata(directory)
    assert meta["format_version"] == ckpt.FORMAT_VERSION
    assert json.loads(meta[ckpt.METADATA_KEY]) == doc
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temp files left


def test_lone_safetensors_file_is_self_describing(saved, tmp_path):
    model, directory = saved
    lone = tmp_path / "weights.safetensors"
    shutil.copy(directory / "model.safetensors", lone)
    _same_state(model, ComposedModel.from_pretrained(lone))


def test_dtype_is_kept_and_can_be_cast(tmp_path):
    model = compose(small_model_dict(**LLAMA_LIKE), seed=1, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = ComposedModel.from_pretrained(tmp_path)
    _same_state(model, loaded)
    as_f32 = ComposedModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as_f32.parameters())
    assert torch.equal(as_f32.embed.weight, model.embed.weight.float())


def test_loading_assigns_weights_without_initialising(saved, monkeypatch):
    model, directory = saved

    def fail(*args, **kwargs):
        raise AssertionError("from_pretrained must not run init_weights")

    monkeypatch.setattr(ComposedModel, "init_weights", fail)
    loaded = ComposedModel.from_pretrained(directory)
    _same_state(model, loaded)
    assert all(not b.is_meta for b in loaded.buffers())
    assert torch.equal(loaded.position.inv_freq, model.position.inv_freq)


def test_sharded_save_and_load(tmp_path):
    model = compose(small_model_dict(**LLAMA_LIKE), seed=2)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights.unique_state(model))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in weights.unique_state(model).values())
    _same_state(model, ComposedModel.from_pretrained(tmp_path))
    # saving unsharded into the same folder removes the stale shards and index
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _same_state(model, ComposedModel.from_pretrained(tmp_path))


@pytest.mark.parametrize(
    "size, expected", [(1000, 1000), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500 mb", 500 * 10**6)]
)
def test_parse_size(size, expected):
    assert weights.parse_size(size) == expected


def test_bad_shard_size_names_the_argument(tmp_path):
    with pytest.raises(InvalidParameter, match="max_shard_size"):
        compose(small_model_dict()).save_pretrained(tmp_path, max_shard_size="lots")


def test_tokenizer_saved_and_reloaded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "composer": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    compose(small_model_dict()).save_pretrained(tmp_path, tokenizer=tok)
    loaded = ckpt.load_tokenizer(tmp_path)
    assert loaded.encode("hello composer world foo").ids == [1, 3, 2, 0]
    assert ckpt.load_tokenizer(tmp_path / "model.safetensors").to_str() == tok.to_str()
    with pytest.raises(ModelError, match="tokenizer"):
        compose(small_model_dict()).save_pretrained(tmp_path / "x", tokenizer="gpt2")


def test_failed_save_keeps_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    model, directory = saved
    out = _copy(directory, tmp_path)
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("composer.weights.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        compose(small_model_dict(**LLAMA_LIKE), seed=99).save_pretrained(out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_hand_made_modules_are_refused_at_save(tmp_path):
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)

        def forward(self, hidden, inputs, past_key_value=None, use_cache=False):
            return self.proj(hidden), None, None

    model = ModelBuilder(small_model_dict()).with_layer(1, Block()).build()
    with pytest.raises(CheckpointError, match="layers.1"):
        model.save_pretrained(tmp_path)


# ----------------------------------------------------------------------------- versions
def test_old_format_is_migrated_with_a_note(saved, tmp_path, caplog):
    model, directory = saved
    out = _copy(directory, tmp_path)
    doc = json.loads((out / "config.json").read_text())
    old = {"format_version": "0.3", **doc["model"]}
    for new, legacy in (
        ("num_layers", "n_layer"),
        ("num_heads", "n_head"),
        ("hidden_size", "n_embd"),
        ("max_position_embeddings", "block_size"),
    ):
        old[legacy] = old.pop(new)
    (out / "config.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="composer"):
        loaded = ComposedModel.from_pretrained(out)
    assert "migrated" in caplog.text and "0.3" in caplog.text
    assert loaded.config.to_dict() == model.config.to_dict()
    _same_state(model, loaded)


def test_newer_major_version_is_refused(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    doc = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**doc, "format_version": "2.0"}))
    with pytest.raises(IncompatibleVersion, match=r"2\.0.*1\.x"):
        ComposedModel.from_pretrained(out)


def test_newer_minor_version_loads(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    doc = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**doc, "format_version": "1.7"}))
    _same_state(saved[0], ComposedModel.from_pretrained(out))


# ----------------------------------------------------------------------------- corrupt checkpoints
def _expect(path: Path, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        ComposedModel.from_pretrained(path)
    assert isinstance(info.value, ModelError)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return info.value


def test_truncated_file(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _expect(out, "truncated")
    f.write_bytes(f.read_bytes()[:20])  # cut inside the header
    _expect(out, "truncated")


def test_empty_file(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    (out / "model.safetensors").write_bytes(b"")
    _expect(out, "empty")


def test_huge_header_length(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    (out / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    _expect(out, "header length", "limit")


def test_garbage_header(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    garbage = b"\x00\xffnot json at all"
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(garbage)) + garbage + b"\0" * 16)
    _expect(out, "not valid JSON")


def test_header_offsets_out_of_range(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    _write_raw(
        out / "model.safetensors",
        {"embed.weight": {"dtype": "F32", "shape": [64, 32], "data_offsets": [0, 8192]}},
        b"\0" * 64,
    )
    _expect(out, "embed.weight", "past the end")


def test_header_offsets_inconsistent_with_shape(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    _write_raw(
        out / "model.safetensors",
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    )
    _expect(out, "a: data_offsets [0, 8] span 8 bytes")


def _resave(directory: Path, change) -> None:
    tensors = _tensors(directory)
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata=_metadata(directory))


def test_missing_tensor(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    _resave(out, lambda t: t.pop("layers.1.ffn.down.weight"))
    _expect(out, "missing tensors: layers.1.ffn.down.weight")


def test_unexpected_tensor(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    _resave(out, lambda t: t.update({"layers.9.extra": torch.zeros(3)}))
    _expect(out, "unexpected tensors: layers.9.extra")


def test_wrong_shape(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    _resave(out, lambda t: t.update({"layers.0.attn.qkv.weight": torch.zeros(10, 32)}))
    _expect(out, "layers.0.attn.qkv.weight: shape [10, 32] in the file, the config needs [64, 32]")


def test_wrong_dtype(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    _resave(
        out,
        lambda t: t.update(
            {"final_norm.weight": t["final_norm.weight"].half(), "embed.weight": t["embed.weight"].long()}
        ),
    )
    _expect(
        out,
        "final_norm.weight: dtype F16, the checkpoint says float32",
        "embed.weight: dtype I64, expected a floating-point dtype",
    )


def test_all_mismatches_in_one_message_before_any_data_is_read(saved, tmp_path, monkeypatch):
    out = _copy(saved[1], tmp_path)

    def change(t):
        t.pop("embed.weight")
        t["bogus"] = torch.zeros(1)
        t["layers.0.ffn.down.weight"] = torch.zeros(2, 2)

    _resave(out, change)

    def no_read(*args, **kwargs):
        raise AssertionError("tensor data was opened before the header was checked")

    monkeypatch.setattr("composer.checkpoint.open_safetensors", no_read)
    err = _expect(
        out,
        "3 problems",
        "missing tensors: embed.weight",
        "unexpected tensors: bogus",
        "layers.0.ffn.down.weight: shape [2, 2]",
    )
    assert "Traceback" not in str(err)


def test_no_config_anywhere(saved, tmp_path):
    out = tmp_path / "bare"
    out.mkdir()
    save_file(_tensors(saved[1]), str(out / "model.safetensors"))  # no header metadata, no config.json
    _expect(out, "no model config", "config.json", "header")
    _expect(out / "model.safetensors", "no model config")


def test_pickle_files_are_refused_with_a_conversion_hint(saved, tmp_path):
    state = saved[0].state_dict()
    folder = tmp_path / "hf_like"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    _expect(folder, "pytorch_model.bin", "pickle", "save_file", "composer-import")
    torch.save(state, tmp_path / "model.pt")
    _expect(tmp_path / "model.pt", "pickle", "weights_only=True")
    disguised = _copy(saved[1], tmp_path / "disguised")
    torch.save(state, disguised / "model.safetensors")  # a torch.save archive under the safetensors name
    _expect(disguised, "pickle")


def test_missing_folder_and_missing_shard(saved, tmp_path):
    _expect(tmp_path / "nowhere", "does not exist")
    model = compose(small_model_dict(), seed=0)
    model.save_pretrained(tmp_path / "sharded", max_shard_size=10_000)
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    _expect(tmp_path / "sharded", "model-00002", "missing")


def test_invalid_saved_config_and_hf_folder(saved, tmp_path):
    out = _copy(saved[1], tmp_path)
    doc = json.loads((out / "config.json").read_text())
    doc["model"]["num_heads"] = 5
    (out / "config.json").write_text(json.dumps(doc))
    _expect(out, "saved model config is invalid", "num_heads")
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    _expect(out, "Hugging Face", "composer-import")


def test_compiled_model_saves_as_the_model(tmp_path):
    """torch.compile's wrapper holds the model as ``_orig_mod`` (its names gain that prefix); a stand-in
    with the same layout keeps this test free of the compiler's import cost."""
    model = compose(small_model_dict(), seed=4)
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model
    ckpt.save_pretrained(wrapper, tmp_path)
    assert "embed.weight" in _tensors(tmp_path)
    _same_state(model, ComposedModel.from_pretrained(tmp_path))
