"""Hugging Face conversion beyond parity: the command-line tools, sharded and legacy folders,
bad folders, unsupported model types, and compositions that have no Hugging Face equivalent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from composer import CheckpointError, ComposedModel, ConfigError, compose
from composer.cli import run
from composer.cli.convert import export_main, import_main
from composer.hf import MODEL_TYPES, choose_family, export_hf, import_hf
from tests.conftest import small_model_dict

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

V = 96
LLAMA = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_llama")
    T.AutoModelForCausalLM.from_config(T.LlamaConfig(**LLAMA)).save_pretrained(folder)
    return folder


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _logits(model, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


# ----------------------------------------------------------------------------- command line
def test_composer_import_and_export_cli(llama_dir, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for f in llama_dir.iterdir():
        (hf_dir / f.name).write_bytes(f.read_bytes())
    _tokenizer().save(str(hf_dir / "tokenizer.json"))
    assert run(import_main, [str(hf_dir), str(tmp_path / "ours")]) == 0
    assert "imported llama" in capsys.readouterr().out
    ours = ComposedModel.from_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    original = T.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    torch.testing.assert_close(_logits(ours), _logits(original), atol=1e-4, rtol=0)

    assert run(export_main, [str(tmp_path / "ours"), str(tmp_path / "back"), "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.model.embed_tokens.weight, original.model.embed_tokens.weight.bfloat16())


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    assert run(import_main, [str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and "Traceback" not in err
    assert run(export_main, ["only-one-argument"]) == 2
    assert "usage: composer-export" in capsys.readouterr().err


def test_console_scripts_are_installed(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "composer-import"), str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- folders
def test_sharded_hf_folder(tmp_path):
    torch.manual_seed(1)
    hf = T.AutoModelForCausalLM.from_config(T.LlamaConfig(**LLAMA)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(import_hf(tmp_path)), _logits(hf), atol=1e-4, rtol=0)
    # and a sharded export that transformers reloads
    export_hf(import_hf(tmp_path), tmp_path / "out", max_shard_size="20KB")
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(reloaded), _logits(hf), atol=1e-4, rtol=0)


def test_gpt2_base_model_names_and_old_buffers(tmp_path):
    """The original GPT-2 checkpoints name tensors without 'transformer.' and carry attn.bias buffers."""
    torch.manual_seed(2)
    cfg = T.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=None, eos_token_id=None
    )
    hf = T.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in _read(tmp_path / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = import_hf(tmp_path)
    assert ours.tied
    torch.testing.assert_close(_logits(ours), _logits(hf), atol=1e-4, rtol=0)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ConfigError, match="'bert' is not supported") as info:
        import_hf(tmp_path)
    for name in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2"):
        assert name in str(info.value) and name in MODEL_TYPES


def test_unsupported_options_are_named(llama_dir, tmp_path):
    config = json.loads((llama_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    config["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        import_hf(tmp_path)
    assert "rope_parameters.rope_type" in str(info.value) and "'yarn'" in str(info.value)
    assert "hidden_act" in str(info.value)


def test_pickle_only_hf_folder_is_refused_with_a_hint(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle") as info:
        import_hf(tmp_path)
    assert "safe_serialization=True" in str(info.value) and "save_file" in str(info.value)


def test_importing_onto_a_device_this_process_cannot_use_names_the_argument(llama_dir):
    with pytest.raises(ConfigError, match=r"device: 'cuda:99'"):
        import_hf(llama_dir, device="cuda:99")


def test_missing_config_and_mismatched_weights(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    tensors = _read(llama_dir / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 32)
    tensors["model.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        import_hf(tmp_path)
    text = str(info.value)
    assert "3 problems" in text
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in text
    assert "unexpected tensors: model.extra.weight" in text
    assert "model.layers.0.self_attn.k_proj.weight: shape [3, 32], config.json implies [16, 32]" in text


def test_composer_checkpoint_is_not_an_hf_folder(tmp_path):
    compose(small_model_dict()).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="from_pretrained"):
        import_hf(tmp_path)


# ----------------------------------------------------------------------------- compositions without an equivalent
LLAMA_LIKE = dict(attention={"type": "gqa", "num_kv_heads": 2}, ffn="swiglu", norm="rmsnorm", position="rope")
REFUSED = {
    "moe": (dict(ffn={"type": "moe", "num_experts": 2, "top_k": 1}), "model.ffn.type: 'moe'"),
    "alibi": (dict(position="alibi"), "model.position.type: 'alibi'"),
    "post_norm": (dict(block="post_norm"), "model.block.type: 'post_norm'"),
    "qk_norm": (dict(attention={"type": "mha", "qk_norm": True}, position="rope"), "model.attention.qk_norm"),
    "geglu": (dict(LLAMA_LIKE, ffn="geglu"), "model.ffn.type: 'geglu'"),
    "classification": (dict(head={"type": "classification", "num_classes": 2}), "model.head.type: 'classification'"),
    "per_layer": (
        dict(LLAMA_LIKE, layers=[{"select": [1], "ffn": {"intermediate_size": 64}}]),
        "layer 1 has a different ffn",
    ),
    "mixed_families": (
        dict(norm="rmsnorm"),
        "model.norm.type: 'rmsnorm' does not fit the nearest Hugging Face family, gpt2",
    ),
    "gpt2_gqa": (
        dict(attention={"type": "gqa", "num_kv_heads": 2, "bias": True}),
        "model.attention.type: 'gqa' does not fit the nearest Hugging Face family, gpt2",
    ),
    "partial_rope_llama": (  # with biases: not Phi-3 either (a partial rope without biases is Phi-3)
        dict(
            LLAMA_LIKE,
            attention={"type": "gqa", "num_kv_heads": 2, "bias": True},
            position={"type": "rope", "rotary_fraction": 0.5},
        ),
        "model.position.rotary_fraction",
    ),
    "window_with_biases": (
        dict(LLAMA_LIKE, attention={"type": "sliding_window", "window": 4, "bias": True}),
        "model.attention.type: sliding_window with qkv and output biases",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_compositions_without_an_equivalent_are_refused(name, tmp_path):
    changes, fragment = REFUSED[name]
    model = compose(small_model_dict(**changes), device="meta")
    with pytest.raises(ConfigError, match="no Hugging Face equivalent") as info:
        export_hf(model, tmp_path / "out")
    assert fragment in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "changes, family, model_type",
    [
        (dict(attention={"type": "mha", "bias": True}), "gpt2", "gpt2"),
        (LLAMA_LIKE, "llama", "llama"),
        (dict(LLAMA_LIKE, attention={"type": "sliding_window", "window": 8}), "llama", "mistral"),
        (dict(LLAMA_LIKE, attention={"type": "mqa", "bias": True, "out_bias": False}), "llama", "qwen2"),
        (dict(block="parallel", position="rope"), "gpt_neox", "gpt_neox"),
        (dict(position="rope"), "gpt_neox", "gpt_neox"),
    ],
)
def test_family_is_chosen_from_the_composition(changes, family, model_type):
    chosen, kind = choose_family(compose(small_model_dict(**changes), device="meta").config)
    assert (chosen.name, kind) == (family, model_type)


# ----------------------------------------------------------------------------- config translation
def _translate(config: dict) -> dict:
    from composer.hf.common import HFConfig

    c = HFConfig(config, "config.json")
    out = MODEL_TYPES[config["model_type"]].to_composer(c)
    c.check()
    return out


MISTRAL = dict(
    model_type="mistral",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.mark.parametrize(
    "changes, attention_type, overridden",
    [
        (dict(sliding_window=None), "gqa", None),  # Mistral without a window is plain GQA
        (dict(sliding_window=64), "gqa", None),  # a window as long as the context is no window
        (dict(sliding_window=8), "sliding_window", None),
        (dict(model_type="qwen2", sliding_window=8, use_sliding_window=False), "gqa", None),
        (dict(model_type="qwen2", sliding_window=8, use_sliding_window=True, max_window_layers=3), "gqa", [3]),  # 4.x
        (
            dict(model_type="qwen2", sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2),
            "gqa",
            [0, 2],
        ),  # 5.x
    ],
)
def test_sliding_window_translation(changes, attention_type, overridden):
    model = _translate({**MISTRAL, **changes})
    assert model["attention"]["type"] == attention_type
    if overridden is None:
        assert model["layers"] == []
    else:
        (override,) = model["layers"]
        assert override["select"] == overridden and override["attention"]["window"] == 8
    if changes.get("model_type") == "qwen2":
        assert model["attention"]["bias"] and not model["attention"]["out_bias"]


def test_gpt2_options_without_an_equivalent_are_named():
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        _translate(
            dict(
                model_type="gpt2",
                vocab_size=V,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=32,
                scale_attn_by_inverse_layer_idx=True,
            )
        )
    with pytest.raises(ConfigError, match="n_layer: is required"):
        _translate(dict(model_type="gpt2", vocab_size=V, n_embd=32, n_head=4, n_positions=32))
