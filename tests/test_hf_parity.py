"""Parity with transformers itself, per family: small random Hugging Face models built offline are
imported (logits within 1e-4 in float32, identical greedy generation of 16 tokens), exported back
(transformers reloads them with the same logits), and composer-native models are exported.

The Hugging Face side runs with attn_implementation="eager" (its sliding-window mask is then the
plain ``q - k < window`` rule, the same as ours; sdpa gives the same results in transformers 5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from composer import ComposedModel, compose
from composer.hf import export_hf, import_hf
from tests.conftest import small_model_dict

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

V, SEQ, ATOL = 96, 20, 1e-4
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
SMALL = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    **NO_SPECIAL,
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def hf_configs() -> dict:
    return {
        "gpt2": T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, **NO_SPECIAL),
        "llama": T.LlamaConfig(**SMALL, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
        "llama3_scaling": T.LlamaConfig(
            **SMALL, num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True
        ),
        "llama_linear_head_dim": T.LlamaConfig(
            **SMALL, num_key_value_heads=4, head_dim=8, rope_scaling={"rope_type": "linear", "factor": 2.0}
        ),
        "mistral": T.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=5),
        "qwen2": T.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2_window_on_layer_1": T.Qwen2Config(
            **SMALL, num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=1
        ),
        "gpt_neox": T.GPTNeoXConfig(**SMALL, rotary_pct=0.5, use_parallel_residual=True),
        "gpt_neox_sequential": T.GPTNeoXConfig(
            **SMALL, rotary_pct=0.25, use_parallel_residual=False, attention_bias=False, rotary_emb_base=500.0
        ),
    }


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough to matter; norms and biases away from their 1 / 0 init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name or ".ln_" in name else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def hf_load(folder: Path):
    return T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(hf_configs()))
def family(request, tmp_path_factory):
    """(name, HF model, its folder, the imported composed model)."""
    cfg = hf_configs()[request.param]
    hf = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize(hf)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder, import_hf(folder)


def _ids(seed: int = 1, batch: int = 2, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_imported_logits_match(family):
    name, hf, _, ours = family
    x = _ids()
    with torch.no_grad():
        want, got = hf(x).logits, ours(x).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the composition is what the family says
    cfg = ours.config
    if name == "mistral":
        assert cfg.attention.type == "sliding_window" and cfg.attention.window == 5
    if name == "qwen2_window_on_layer_1":
        assert [cfg.layer(i).attention.type for i in range(2)] == ["gqa", "sliding_window"]
    if name.startswith("gpt_neox"):
        assert cfg.block.type == ("parallel" if name == "gpt_neox" else "pre_norm")
        assert ours.position.rotary_dim == int(16 * hf.config.rope_parameters["partial_rotary_factor"])
    if name == "llama3_scaling":
        assert cfg.position.scaling == "llama3" and ours.tied


def test_greedy_generation_matches(family):
    _, hf, _, ours = family
    prompt = _ids(seed=2, batch=1, length=6)
    want = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=16, do_sample=False)
    assert want.shape == (1, 22)
    assert torch.equal(got, want)


def test_export_round_trip_reloads_in_transformers(family, tmp_path):
    name, hf, _, ours = family
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    back = hf_load(tmp_path)
    x = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    # our weights are exactly the original ones, whatever the fusing / transposing / reordering
    theirs, exported = hf.state_dict(), back.state_dict()
    for key, value in exported.items():
        if key in theirs:
            assert torch.equal(value, theirs[key]), key


NATIVE = {
    "gpt2": small_model_dict(
        vocab_size=V, attention={"type": "mha", "bias": True}, ffn={"type": "mlp", "activation": "gelu_tanh"}
    ),
    "llama_padded_vocab": small_model_dict(
        vocab_size=V - 6,
        pad_vocab_to_multiple_of=16,
        tie_embeddings=False,
        attention={"type": "gqa", "num_kv_heads": 2},
        ffn={"type": "swiglu", "intermediate_size": 48},
        norm="rmsnorm",
        position={"type": "rope", "theta": 1000.0},
    ),
    "mistral": small_model_dict(
        vocab_size=V,
        attention={"type": "sliding_window", "window": 4, "num_kv_heads": 1},
        ffn="swiglu",
        norm={"type": "rmsnorm", "eps": 1e-6},
        position="rope",
    ),
    "qwen2_mixed_window": small_model_dict(
        vocab_size=V,
        num_layers=3,
        attention={"type": "gqa", "num_kv_heads": 2, "bias": True, "out_bias": False},
        ffn="swiglu",
        norm="rmsnorm",
        position="rope",
        layers=[{"select": "1:", "attention": {"type": "sliding_window", "window": 5}}],
    ),
    "gpt_neox": small_model_dict(
        vocab_size=V,
        block="parallel",
        attention={"type": "mha", "bias": True},
        position={"type": "rope", "rotary_fraction": 0.25},
        tie_embeddings=False,
    ),
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_model_exports_to_transformers(name, tmp_path):
    model = compose(NATIVE[name], seed=5).eval()
    randomize(model, seed=6)
    export_hf(model, tmp_path / "hf")
    back = hf_load(tmp_path / "hf")
    x = _ids(seed=4, length=16) % model.config.vocab_size
    with torch.no_grad():
        want = model(x).logits[..., : model.config.vocab_size]
        torch.testing.assert_close(back(x).logits, want, atol=ATOL, rtol=0)
    # and back again: HF -> composer reproduces the model
    again = import_hf(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, atol=ATOL, rtol=0)


def test_transformers_4x_and_5x_config_spellings_agree(tmp_path):
    """5.x writes rope_parameters; 4.x wrote rope_theta / rope_scaling (and NeoX rotary_pct /
    rotary_emb_base). Both import to the same composed config."""
    cases = {
        "llama3": (
            T.LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
            lambda c, p: c.update(
                rope_theta=p["rope_theta"],
                rope_scaling={"type": "llama3", **{k: v for k, v in p.items() if k not in ("rope_theta", "rope_type")}},
            ),
        ),
        "linear": (
            T.LlamaConfig(**SMALL, rope_theta=20000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
            lambda c, p: c.update(rope_theta=p["rope_theta"], rope_scaling={"type": "linear", "factor": 4.0}),
        ),
        "neox": (
            T.GPTNeoXConfig(**SMALL, rotary_pct=0.5, rotary_emb_base=700.0),
            lambda c, p: c.update(rotary_pct=p["partial_rotary_factor"], rotary_emb_base=p["rope_theta"]),
        ),
    }
    for name, (cfg, legacy) in cases.items():
        folder = tmp_path / name
        T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        new = import_hf(folder)
        written = json.loads((folder / "config.json").read_text())
        params = written.pop("rope_parameters")
        legacy(written, params)
        (folder / "config.json").write_text(json.dumps(written))
        old = import_hf(folder)
        assert old.config.to_dict() == new.config.to_dict(), name
        assert torch.equal(old.position.inv_freq, new.position.inv_freq)
    assert new.position.rotary_dim == 8 and new.config.position.theta == 700.0
    assert old.config.position.rotary_fraction == 0.5


def test_imported_model_saves_as_a_composer_checkpoint(family, tmp_path):
    _, hf, _, ours = family
    ours.save_pretrained(tmp_path)
    again = ComposedModel.from_pretrained(tmp_path)
    x = _ids(seed=5)
    with torch.no_grad():
        assert torch.equal(again(x).logits, ours(x).logits)
