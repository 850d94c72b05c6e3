"""Parity with transformers' Mixtral and Qwen3-MoE: small random models built by transformers itself
(odd sizes, non-trivial weights) are imported (float32 logits within 1e-4, identical greedy tokens),
exported back (transformers reloads them with the same logits and the same weights), and a composed
preset-like model exports as its family."""

from __future__ import annotations

import json

import pytest
import torch

from composer import ConfigError, compose
from composer.hf import export_hf, import_hf
from tests.test_hf_parity import ATOL, NO_SPECIAL, V, _ids, hf_load, randomize

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def hf_configs() -> dict:
    return {
        "mixtral": T.MixtralConfig(
            **COMMON,
            **NO_SPECIAL,
            intermediate_size=40,
            num_key_value_heads=2,
            num_local_experts=5,
            num_experts_per_tok=2,
        ),
        "mixtral_window": T.MixtralConfig(
            **COMMON,
            **NO_SPECIAL,
            intermediate_size=24,
            num_key_value_heads=1,
            num_local_experts=3,
            num_experts_per_tok=1,
            sliding_window=6,
        ),
        "qwen3_moe": T.Qwen3MoeConfig(
            **COMMON,
            **NO_SPECIAL,
            intermediate_size=56,
            moe_intermediate_size=20,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
        "qwen3_moe_unnormalised_dense_layer_0": T.Qwen3MoeConfig(
            **COMMON,
            **NO_SPECIAL,
            intermediate_size=56,
            moe_intermediate_size=20,
            num_key_value_heads=4,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[0],
            tie_word_embeddings=True,
        ),
    }


@pytest.fixture(scope="module", params=list(hf_configs()))
def family(request, tmp_path_factory):
    cfg = hf_configs()[request.param]
    hf = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize(hf)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder, import_hf(folder)


def test_imported_logits_match(family):
    name, hf, _, ours = family
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    cfg = ours.config
    kinds = [cfg.layer(i).ffn.type for i in range(2)]
    assert kinds == (["swiglu", "moe"] if name.endswith("dense_layer_0") else ["moe", "moe"])
    if name == "mixtral_window":
        assert cfg.attention.type == "sliding_window" and cfg.attention.window == 6
    if name.startswith("qwen3_moe"):
        assert cfg.attention.qk_norm_placement() == "per_head"


def test_greedy_generation_matches(family):
    _, hf, _, ours = family
    prompt = _ids(seed=2, batch=1, length=6)
    want = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=16, do_sample=False), want)


def test_export_round_trip_reloads_in_transformers(family, tmp_path):
    name, hf, _, ours = family
    if name.endswith("dense_layer_0"):  # export takes models whose every layer is a mixture: refused by name
        with pytest.raises(ConfigError, match="ffn"):
            export_hf(ours, tmp_path)
        return
    export_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == hf.config.model_type
    back = hf_load(tmp_path)
    x = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    theirs = hf.state_dict()
    for key, value in back.state_dict().items():
        assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("qk_norm,model_type", [(False, "mixtral"), (True, "qwen3_moe")])
def test_composed_moe_exports_as_its_family(qk_norm, model_type, tmp_path):
    attention = {"type": "gqa", "num_kv_heads": 2, "qk_norm": qk_norm, "qk_norm_eps": 1e-6}
    cfg = {
        "vocab_size": V,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 4,
        "max_position_embeddings": 64,
        "attention": attention,
        "norm": {"type": "rmsnorm", "eps": 1e-6},
        "position": {"type": "rope"},
        "ffn": {"type": "moe", "num_experts": 4, "top_k": 2, "expert": {"type": "swiglu", "intermediate_size": 16}},
        "tie_embeddings": False,
    }
    ours = compose(cfg, seed=0).eval()
    export_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    x = _ids(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(hf_load(tmp_path)(x).logits, ours(x).logits, atol=ATOL, rtol=0)
