"""The Gemma presets (conf/model/gemma2_9b, gemma3_1b, gemma3_4b): their parameter counts are the ones
transformers gives for the published configurations built on the meta device, their layers follow the
published local/global pattern and rope bases, they export to the same Hugging Face configuration,
and composer-plan plans each in under 5 s. Nothing is downloaded: the published hyper-parameters are
written here (google/gemma-2-9b, google/gemma-3-1b-pt, google/gemma-3-4b-pt's text_config)."""

from __future__ import annotations

import time

import pytest
import torch
from preset_helpers import hf_counts, hf_on_meta

from composer import compose, load_config
from composer.hf import choose_family
from composer.plan import plan

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PUBLISHED = {
    "gemma2_9b": (
        "Gemma2",
        dict(
            vocab_size=256000,
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            max_position_embeddings=8192,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        ),
    ),
    "gemma3_1b": (
        "Gemma3Text",
        dict(
            vocab_size=262144,
            hidden_size=1152,
            intermediate_size=6912,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            rope_local_base_freq=10000.0,
            query_pre_attn_scalar=256,
            sliding_window=512,
            sliding_window_pattern=6,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        ),
    ),
    "gemma3_4b": (
        "Gemma3Text",
        dict(
            vocab_size=262208,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            query_pre_attn_scalar=256,
            sliding_window=1024,
            sliding_window_pattern=6,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        ),
    ),
}


def hf_model(kind: str, hyper: dict):
    config = getattr(T, f"{kind}Config")(**hyper)
    return config, hf_on_meta(config, getattr(T, f"{kind.removesuffix('Text')}ForCausalLM"))


@pytest.fixture(scope="module")
def presets() -> dict:
    return {name: compose(load_config([f"model={name}"]).model, device="meta") for name in PUBLISHED}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_is_transformers_count_of_the_published_configuration(presets, name):
    config, hf = hf_model(*PUBLISHED[name])
    ours = presets[name]
    assert ours.num_parameters() == hf_counts(hf)[0]
    assert ours.tied and ours.config.name == name


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_layers_follow_the_published_local_global_pattern(presets, name):
    config, _ = hf_model(*PUBLISHED[name])
    specs = presets[name].config.layer_specs()
    assert [s.attention.window_size() for s in specs] == [
        config.sliding_window if t == "sliding_attention" else None for t in config.layer_types
    ]
    for s, t in zip(specs, config.layer_types, strict=True):
        rope = config.rope_parameters[t] if name.startswith("gemma3") else config.rope_parameters
        assert s.position.theta == rope["rope_theta"]
        assert (s.position.scaling, s.position.scaling_factor) == (
            (rope["rope_type"], rope["factor"]) if rope["rope_type"] != "default" else ("none", 1.0)
        )
        a = s.attention
        assert (a.num_heads, a.kv_heads(), a.head_dim) == (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        assert a.score_scale() == config.query_pre_attn_scalar**-0.5
        assert a.qk_norm == name.startswith("gemma3")
    if name == "gemma3_1b":
        assert [s.index for s in specs if not s.attention.window_size()] == [5, 11, 17, 23]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_exports_as_the_published_configuration(presets, name):
    """The preset's Hugging Face config.json, read back by transformers, builds the published model."""
    kind, hyper = PUBLISHED[name]
    cfg = presets[name].config
    family, model_type = choose_family(cfg)
    written = family.to_hf(cfg, model_type)
    config, hf = hf_model(kind, {k: v for k, v in written.items() if k not in ("rope_scaling", "rope_theta")})
    published, _ = hf_model(kind, hyper)
    assert config.layer_types == published.layer_types
    assert config.rope_parameters == published.rope_parameters
    for key in ("sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        assert getattr(config, key) == getattr(published, key), key
    assert hf_counts(hf)[0] == presets[name].num_parameters()


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_composer_plan_runs_in_under_5_seconds(name):
    model_cfg = load_config([f"model={name}"]).model
    start = time.perf_counter()
    report = plan(model_cfg)  # as composer-plan model=<name>: one sequence of max_position_embeddings tokens
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{name}: composer-plan took {elapsed:.1f} s"
    assert report.params_total == compose(model_cfg, device="meta").num_parameters()
    assert not report.not_planned


SMALL = [
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.vocab_size=128",
    "model.max_position_embeddings=64",
    "model.attention.head_dim=16",
    "model.attention.num_kv_heads=2",
    "model.attention.window=4",
    "model.ffn.intermediate_size=96",
]


@pytest.mark.parametrize("name, layers", [("gemma2_9b", 2), ("gemma3_1b", 6)])
def test_shrunk_preset_compiles_without_graph_breaks(name, layers):
    """The Gemma wiring (sandwich block, zero-centred norms, embedding scale, soft-caps, local/global layers
    with their own rope) traces as one graph and the compiled model gives the eager logits."""
    torch._dynamo.reset()
    model = compose(load_config([f"model={name}", f"model.num_layers={layers}", *SMALL]).model, seed=0).eval()
    assert [s.attention.window_size() for s in model.config.layer_specs()][-2:] == [4, None]  # local, global
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
