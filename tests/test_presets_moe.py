"""The mixture-of-experts presets: total and active parameters against transformers' count of the
published configuration (built on the meta device), and compose / composer-plan each under 5 s."""

from __future__ import annotations

import time

import pytest
import torch
from preset_helpers import hf_counts, hf_on_meta

from composer import compose, load_config
from composer.plan import plan

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The published configurations (config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B).
PUBLISHED = {
    "mixtral_8x7b": lambda: T.MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen3_30b_a3b": lambda: T.Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
    ),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_total_and_active_parameters_match_transformers(preset):
    cfg = load_config([f"model={preset}"]).model
    t0 = time.perf_counter()
    model = compose(cfg, device="meta")
    t1 = time.perf_counter()
    report = plan(cfg, seq_len=4096)
    t2 = time.perf_counter()
    config = PUBLISHED[preset]()
    total, active = hf_counts(hf_on_meta(config), config.num_experts_per_tok)
    assert model.num_parameters() == total
    assert report.params_total == total and report.params_active == active
    assert t1 - t0 < 5 and t2 - t1 < 5, f"compose {t1 - t0:.2f} s, plan {t2 - t1:.2f} s"
    # forward FLOPs per token: 2 x the active matmul weights (no embedding lookup) + attention scores
    layer = model.config.layer(0)
    scores = 4 * 4096 * layer.attention.num_heads * layer.attention.head_dim * model.config.num_layers
    matmuls = 2 * (active - model.config.vocab_size * model.config.hidden_size)  # the embedding is a lookup
    norms = 2 * model.config.num_layers * layer.attention.head_dim * 2 if layer.attention.qk_norm else 0
    assert report.flops_forward_per_token == pytest.approx(matmuls + scores, rel=1e-3, abs=norms + 1e6)


def test_moe_tiny_places_a_dense_layer_first():
    model = compose(load_config(["model=moe_tiny"]).model, seed=0)
    kinds = [layer.ffn.__class__.__name__ for layer in model.layers]
    assert kinds == ["GatedMLP", "MoE", "MoE", "MoE"]
    assert model.layers[1].ffn.router.load.e_score_correction_bias is not None
    x = torch.randint(0, 256, (2, 16))
    out = model(x, labels=x)
    assert torch.isfinite(out.loss) and out.aux_loss is not None
