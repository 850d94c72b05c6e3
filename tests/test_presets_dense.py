"""The Qwen3, OLMo 2 and Phi-3 presets in conf/model/: each one's parameter count is the count transformers
gives for the published configuration (its hyper-parameters written here, the model built on the meta
device: nothing is downloaded), the composition is the family's, and composer-plan plans each in under
5 s."""

from __future__ import annotations

import time

import pytest
from preset_helpers import hf_counts, hf_on_meta, preset_on_meta

from composer import load_config
from composer.hf import choose_family
from composer.plan import plan

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
# The published config.json values (Hugging Face hub: Qwen/Qwen3-0.6B, Qwen/Qwen3-8B,
# allenai/OLMo-2-0425-1B, allenai/OLMo-2-1124-7B, microsoft/Phi-3-mini-4k-instruct).
PUBLISHED = {
    "qwen3_0_6b": lambda: T.Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        **NO_SPECIAL,
    ),
    "qwen3_8b": lambda: T.Qwen3Config(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        **NO_SPECIAL,
    ),
    "olmo2_1b": lambda: T.Olmo2Config(
        vocab_size=100352,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        **NO_SPECIAL,
    ),
    "olmo2_7b": lambda: T.Olmo2Config(
        vocab_size=100352,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        **NO_SPECIAL,
    ),
    "phi3_mini": lambda: T.Phi3Config(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=2047,
        tie_word_embeddings=False,
        **NO_SPECIAL,
    ),
}
MODEL_TYPE = {"qwen3_0_6b": "qwen3", "qwen3_8b": "qwen3", "olmo2_1b": "olmo2", "olmo2_7b": "olmo2", "phi3_mini": "phi3"}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_count_is_transformers_count(preset):
    model = preset_on_meta(preset)
    assert model.num_parameters() == hf_counts(hf_on_meta(PUBLISHED[preset]()))[0]
    assert model.tied == PUBLISHED[preset]().tie_word_embeddings


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_is_the_family_composition(preset):
    cfg = preset_on_meta(preset).config
    family, model_type = choose_family(cfg)
    assert model_type == MODEL_TYPE[preset]
    a = cfg.attention
    if model_type == "qwen3":
        assert a.qk_norm == "per_head" and a.head_dim == 128 and a.qk_norm_eps == cfg.norm.eps == 1e-6
    if model_type == "olmo2":
        assert cfg.block.type == "post_sublayer" and a.qk_norm == "across_heads"
    if model_type == "phi3":
        assert a.type == "sliding_window" and a.window == 2047


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_composer_plan_plans_each_preset_in_under_5_s(preset):
    start = time.perf_counter()
    report = plan(load_config([f"model={preset}"]).model, batch_size=1, seq_len=2048)
    assert time.perf_counter() - start < 5.0
    assert report.params_total == preset_on_meta(preset).num_parameters()
    assert not report.not_planned
