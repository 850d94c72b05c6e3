"""The DeepSeek-V3 preset (conf/model/deepseek_v3.yaml): total and active parameters against transformers'
count of the published configuration built on the meta device, the YaRN softmax scale against
transformers' attention, the latent cache composer-plan reports, and compose / composer-plan each under 5 s."""

from __future__ import annotations

import math
import time

import pytest
from preset_helpers import hf_counts, hf_on_meta

from composer import compose, load_config
from composer.plan import plan

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# config.json of deepseek-ai/DeepSeek-V3 (the multi-token-prediction layer is not built by transformers)
YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
PUBLISHED = dict(
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    norm_topk_prob=True,
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    rope_theta=10000,
    rope_scaling=YARN,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
)


@pytest.fixture(scope="module")
def published():
    """transformers' DeepseekV3ForCausalLM of the published configuration, on the meta device."""
    config = T.DeepseekV3Config(**PUBLISHED)
    return hf_on_meta(config), config


def test_total_and_active_parameters_match_transformers(published):
    model_hf, config = published
    cfg = load_config(["model=deepseek_v3"]).model
    t0 = time.perf_counter()
    model = compose(cfg, device="meta")
    t1 = time.perf_counter()
    report = plan(cfg, seq_len=4096)
    t2 = time.perf_counter()
    total, active = hf_counts(model_hf, config.num_experts_per_tok)
    assert model.num_parameters() == total  # 671.0B
    assert report.params_total == total and report.params_active == active  # 37.6B active
    assert 670e9 < total < 672e9 and 37e9 < active < 38e9  # the release's "671B, 37B activated"
    assert t1 - t0 < 5 and t2 - t1 < 5, f"compose {t1 - t0:.2f} s, plan {t2 - t1:.2f} s"
    kinds = [model.config.layer(i).ffn.type for i in range(config.num_hidden_layers)]
    assert kinds == ["swiglu"] * config.first_k_dense_replace + ["moe_deepseek"] * (61 - config.first_k_dense_replace)


def test_softmax_scale_and_latent_cache_match_the_release(published):
    model_hf, config = published
    model = compose(load_config(["model=deepseek_v3"]).model, device="meta")
    attn, theirs = model.layers[0].attn, model_hf.model.layers[0].self_attn
    mscale = 0.1 * YARN["mscale_all_dim"] * math.log(YARN["factor"]) + 1.0
    assert attn.spec.scale == pytest.approx(theirs.scaling, rel=1e-12)
    assert attn.spec.scale == pytest.approx((config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5 * mscale**2)
    assert model.layer_position(0).temperature == pytest.approx(1.0)  # mscale == mscale_all_dim
    report = plan(model.config, seq_len=4096, precision="bf16-mixed")
    per_layer = (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    assert report.kv_cache_bytes_per_token == config.num_hidden_layers * per_layer  # 70,272 B
    # the attention's parameters are transformers' MLA's, layer for layer
    ours = sum(p.numel() for p in attn.parameters())
    assert ours == sum(p.numel() for p in theirs.parameters())
