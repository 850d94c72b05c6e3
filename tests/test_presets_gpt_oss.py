"""The gpt-oss presets (conf/model/gpt_oss_20b, gpt_oss_120b): total and active parameters against
transformers' count of the published configuration built on the meta device, the published layer pattern
and rope, the same Hugging Face configuration on export, and compose / composer-plan each under 5 s.
Nothing is downloaded: the published hyper-parameters (openai/gpt-oss-20b and openai/gpt-oss-120b
config.json) are written here."""

from __future__ import annotations

import time

import pytest
from preset_helpers import hf_counts, hf_on_meta

from composer import ConfigError, compose, load_config
from composer.hf import choose_family
from composer.hf.common import HFConfig
from composer.hf.gpt_oss import FAMILY
from composer.plan import plan
from composer.schema import resolve_model_config

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROPE = {  # both releases' rope_scaling, with rope_theta
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
    "rope_theta": 150000.0,
}


def published(layers: int, experts: int) -> dict:
    return dict(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=layers,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        rope_parameters=dict(ROPE),
        attention_bias=True,
        num_local_experts=experts,
        num_experts_per_tok=4,
        swiglu_limit=7.0,
        router_aux_loss_coef=0.9,
        tie_word_embeddings=False,
    )


PUBLISHED = {"gpt_oss_20b": published(24, 32), "gpt_oss_120b": published(36, 128)}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_total_and_active_parameters_match_transformers(preset):
    cfg = load_config([f"model={preset}"]).model
    t0 = time.perf_counter()
    model = compose(cfg, device="meta")
    t1 = time.perf_counter()
    report = plan(cfg, seq_len=4096)
    t2 = time.perf_counter()
    total, active = hf_counts(hf_on_meta(T.GptOssConfig(**PUBLISHED[preset])), 4)
    assert model.num_parameters() == total
    assert report.params_total == total and report.params_active == active
    assert t1 - t0 < 5 and t2 - t1 < 5, f"compose {t1 - t0:.2f} s, plan {t2 - t1:.2f} s"


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_exports_as_the_published_configuration(preset):
    """The layer pattern, windows, sinks, rope and experts of the preset are the release's: its Hugging Face
    configuration has the published values."""
    cfg = compose(load_config([f"model={preset}"]).model, device="meta").config
    family, model_type = choose_family(cfg)
    assert (family.name, model_type) == ("gpt_oss", "gpt_oss")
    want = PUBLISHED[preset]
    ours = T.GptOssConfig(**FAMILY.to_hf(cfg, model_type), tie_word_embeddings=cfg.tie_embeddings)
    for key, value in want.items():
        if key == "rope_parameters":
            assert {k: v for k, v in ours.rope_parameters.items() if k != "type"} == value
        else:
            assert getattr(ours, key) == value, key
    assert all(cfg.layer(i).attention.sinks for i in range(cfg.num_layers))
    assert [cfg.layer(i).attention.type for i in range(4)] == ["sliding_window", "gqa"] * 2


def release_config_json(preset: str) -> dict:
    """The release's config.json as on the Hub (transformers 4.55's spelling: rope_scaling beside
    rope_theta, the original code's experts_per_token / initial_context_length), its MXFP4
    quantization_config left out."""
    want = PUBLISHED[preset]
    rope = {k: v for k, v in ROPE.items() if k != "rope_theta"}
    return {
        **{k: v for k, v in want.items() if k != "rope_parameters"},
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "experts_per_token": 4,
        "initial_context_length": 4096,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "output_router_logits": False,
        "rope_scaling": rope,
        "rope_theta": 150000,
        "use_cache": True,
    }


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_the_release_config_imports_as_the_preset(preset):
    """Every layer of the release's config.json, translated, is the preset's layer (the import writes the
    sliding layers as overrides, the preset as a layer_pattern); the quantized original is refused by name."""
    data = release_config_json(preset)
    imported = resolve_model_config(FAMILY.to_composer(HFConfig(data, "config.json")))
    cfg = compose(load_config([f"model={preset}"]).model, device="meta").config
    for i in range(cfg.num_layers):
        for slot in ("block", "attention", "ffn", "norm", "position"):
            theirs, ours = getattr(imported.layer(i), slot), getattr(cfg.layer(i), slot)
            assert theirs == ours, (i, slot)  # every resolved option
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings", "tie_embeddings"):
        assert getattr(imported, key) == getattr(cfg, key), key
    quantized = HFConfig({**data, "quantization_config": {"quant_method": "mxfp4"}}, "config.json")
    FAMILY.to_composer(quantized)
    with pytest.raises(ConfigError, match=r"config.json:quantization_config.*dequantize"):
        quantized.check()
