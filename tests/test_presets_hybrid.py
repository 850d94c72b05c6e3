"""The Mamba-2, Bamba, Qwen3-Next and OLMo-Hybrid presets in conf/model/: each one's parameter count is the
count transformers gives for the published configuration (its hyper-parameters written here, the model built
on the meta device: nothing is downloaded), the composition is the family's, composer-plan plans each in under
5 s, and the plan's cache / state bytes of the Mamba-2 and Gated DeltaNet layers do not grow with the sequence
length."""

from __future__ import annotations

import math
import time

import pytest
from preset_helpers import hf_counts, hf_on_meta, preset_on_meta

from composer import load_config
from composer.hf import choose_family
from composer.plan import plan

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
# The published configurations (state-spaces/mamba2-370m as transformers converts it: the vocabulary of 50,277
# padded to 50,288 rows; ibm-ai-platform/Bamba-9B and Qwen/Qwen3-Next-80B-A3B-Instruct config.json; for
# allenai/Olmo-Hybrid-7B the values transformers' OlmoHybridConfig documents for it).
PUBLISHED = {
    "mamba2_370m": lambda: T.Mamba2Config(
        vocab_size=50288,
        hidden_size=1024,
        num_hidden_layers=48,
        num_heads=32,
        head_dim=64,
        expand=2,
        state_size=128,
        n_groups=1,
        conv_kernel=4,
        chunk_size=256,
        tie_word_embeddings=True,
        **NO_SPECIAL,
    ),
    "bamba_9b": lambda: T.BambaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        attn_layer_indices=[9, 18, 27],
        mamba_n_heads=128,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=256,
        max_position_embeddings=262144,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **NO_SPECIAL,
    ),
    "qwen3_next_80b_a3b": lambda: T.Qwen3NextConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5120,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False,
        **NO_SPECIAL,
    ),
    "olmo_hybrid_7b": lambda: T.OlmoHybridConfig(
        vocab_size=100352,
        hidden_size=3840,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=30,
        num_key_value_heads=30,
        layer_types=["full_attention" if i % 4 == 3 else "linear_attention" for i in range(32)],
        linear_num_key_heads=30,
        linear_num_value_heads=30,
        linear_key_head_dim=96,
        linear_value_head_dim=192,
        linear_conv_kernel_dim=4,
        linear_allow_neg_eigval=True,
        max_position_embeddings=65536,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **NO_SPECIAL,
    ),
}
MODEL_TYPE = {
    "mamba2_370m": "mamba2",
    "bamba_9b": "bamba",
    "qwen3_next_80b_a3b": "qwen3_next",
    "olmo_hybrid_7b": "olmo_hybrid",
}
LINEAR = ("mamba2", "gated_deltanet")


def attention_layers(cfg) -> list[int]:
    return [i for i in range(cfg.num_layers) if cfg.layer(i).attention.type not in LINEAR]


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_count_is_transformers_count(preset):
    model = preset_on_meta(preset)
    assert model.num_parameters() == hf_counts(hf_on_meta(PUBLISHED[preset]()))[0]
    assert model.tied == PUBLISHED[preset]().tie_word_embeddings


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_is_the_family_composition(preset):
    cfg = preset_on_meta(preset).config
    assert choose_family(cfg)[1] == MODEL_TYPE[preset]
    attention = attention_layers(cfg)
    if preset == "olmo_hybrid_7b":
        assert attention == list(range(3, 32, 4))
        assert {cfg.layer(i).block.type for i in attention} == {"post_sublayer"} and cfg.layer(
            0
        ).block.type == "pre_norm"
    elif preset == "qwen3_next_80b_a3b":
        assert attention == list(range(3, 48, 4))
        assert cfg.layer(3).attention.output_gate == "elementwise" and cfg.ffn.shared_expert_gate
    elif preset == "bamba_9b":
        assert attention == PUBLISHED[preset]().attn_layer_indices
        assert {cfg.layer(i).attention.type for i in attention} == {"gqa"}
        assert cfg.layer(9).attention.kv_heads() == 8 and cfg.layer(0).attention.num_heads == 128
    else:
        assert attention == [] and cfg.ffn.type == "none" and cfg.padded_vocab_size == 50288


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_composer_plan_plans_each_preset_in_under_5_s_with_state_constant_in_t(preset):
    cfg = load_config([f"model={preset}"]).model
    start = time.perf_counter()
    short, long = plan(cfg, batch_size=1, seq_len=1024), plan(cfg, batch_size=1, seq_len=4096)
    assert time.perf_counter() - start < 5.0
    assert short.params_total == preset_on_meta(preset).num_parameters()
    assert not short.not_planned
    model = preset_on_meta(preset)
    attention = attention_layers(model.config)
    mixer = model.layers[0].attn  # a Mamba-2 / Gated DeltaNet layer: its conv tail and float32 state [H, K, V]
    state = 4 * math.prod(mixer.state_shape())
    assert short.kv_cache_bytes_per_token == (long.kv_cache_bytes_max - short.kv_cache_bytes_max) / 3072
    # only the attention layers' KV cache grows with T; the linear mixers' state is the same at 1,024 and 4,096
    assert (short.kv_cache_bytes_per_token == 0) == (not attention)
    fixed = short.kv_cache_bytes_max - short.kv_cache_bytes_per_token * 1024
    assert fixed == long.kv_cache_bytes_max - long.kv_cache_bytes_per_token * 4096
    assert fixed >= (model.config.num_layers - len(attention)) * state > 0


def test_qwen3_next_active_parameters_are_transformers_count():
    """3.87B of the 79.7B: the routed top-10 of 512 experts, the shared expert, attention and mixers."""
    config = PUBLISHED["qwen3_next_80b_a3b"]()
    total, active = hf_counts(hf_on_meta(config), config.num_experts_per_tok)
    report = plan(load_config(["model=qwen3_next_80b_a3b"]).model, seq_len=1024)
    assert (report.params_total, report.params_active) == (total, active) and active < total / 20
