"""Parity with transformers' gpt-oss (GptOssForCausalLM): small random models built by transformers itself
(odd sizes, head_dim apart from hidden / heads, sliding and full layers with a window shorter than the
sequence, YaRN rope, sinks, router and expert biases, a clamp the activations exceed) are imported
(float32 logits within 1e-4, identical greedy tokens), exported back (transformers reloads them with the
same logits and the same weights, names and shapes), composed models export as gpt_oss, and what has no
equivalent is refused by name, both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from composer import ConfigError, compose
from composer.hf import export_hf, import_hf
from composer.hf.common import HFConfig
from composer.hf.gpt_oss import FAMILY
from composer.schema import resolve_model_config
from tests.test_hf_parity import ATOL, NO_SPECIAL, V, _ids, hf_load, randomize

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

YARN = {  # the published model's rope (openai/gpt-oss-20b config.json), over a small context
    "rope_type": "yarn",
    "factor": 4.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 16,
    "rope_theta": 1500.0,
}
COMMON = dict(vocab_size=V, hidden_size=48, max_position_embeddings=64, **NO_SPECIAL)


def hf_configs() -> dict:
    return {
        # 3 heads of 20 (60 query dims over a 48 stream) sharing one KV head; sliding on layers 0 and 2
        "mqa_yarn": T.GptOssConfig(
            **COMMON,
            num_hidden_layers=4,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=20,
            intermediate_size=36,
            num_local_experts=5,
            num_experts_per_tok=2,
            sliding_window=5,
            swiglu_limit=1.5,
            swiglu_alpha=1.3,
            rope_parameters=dict(YARN),
        ),
        # grouped heads, its own layer_types, no attention biases, a tied head, GptOssConfig's default rope
        # (YaRN factor 32 from 4,096, theta 150,000)
        "gqa_tied_layer_types": T.GptOssConfig(
            **COMMON,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=20,
            num_local_experts=6,
            num_experts_per_tok=3,
            sliding_window=4,
            layer_types=[
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
            attention_bias=False,
            tie_word_embeddings=True,
            swiglu_limit=2.0,
            rms_norm_eps=1e-6,
        ),
    }


@pytest.fixture(scope="module", params=list(hf_configs()))
def family(request, tmp_path_factory):
    cfg = hf_configs()[request.param]
    hf = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize(hf)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(3.0)  # pre-activations beyond the clamp occur
            layer.self_attn.sinks.add_(torch.linspace(-1.0, 2.0, cfg.num_attention_heads))  # sinks that matter
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder, import_hf(folder)


def test_imported_config(family):
    name, hf, _, ours = family
    cfg, theirs = ours.config, hf.config
    assert cfg.name == "gpt_oss" and ours.tied == theirs.tie_word_embeddings
    for i, kind in enumerate(theirs.layer_types):
        a = cfg.layer(i).attention
        assert a.type == ("sliding_window" if kind == "sliding_attention" else ("mqa" if name == "mqa_yarn" else "gqa"))
        assert a.sinks and a.bias == a.out_bias == theirs.attention_bias and a.head_dim == theirs.head_dim
        assert a.kv_heads() == theirs.num_key_value_heads
        assert a.window_size() == (theirs.sliding_window if kind == "sliding_attention" else None)
    m, rope = cfg.layer(0).ffn, cfg.position
    assert m.type == "moe_gpt_oss" and m.router_bias and m.normalize_top_k and m.score == "softmax"
    assert (m.num_experts, m.top_k, m.aux_loss_weight) == (
        theirs.num_local_experts,
        theirs.num_experts_per_tok,
        theirs.router_aux_loss_coef,
    )
    assert (m.expert.type, m.expert.bias, m.expert.limit, m.expert.alpha) == (
        "swiglu_clamped",
        True,
        theirs.swiglu_limit,
        theirs.swiglu_alpha,
    )
    params = theirs.rope_parameters
    assert (rope.scaling, rope.scaling_factor, rope.theta, rope.truncate) == (
        "yarn",
        params["factor"],
        params["rope_theta"],
        False,
    )
    assert rope.original_max_position_embeddings == params["original_max_position_embeddings"]


def test_imported_logits_match(family):
    _, hf, _, ours = family
    x = _ids()  # 20 tokens: past every sliding window
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=ATOL, rtol=0)


def test_the_parity_is_sensitive_to_the_clamp_the_sinks_and_the_window(family):
    """Each gpt-oss detail changes transformers' logits by far more than the tolerance."""
    _, hf, _, _ = family
    x = _ids()
    with torch.no_grad():
        want = hf(x).logits
        for change in ("clamp", "sinks", "window"):
            other = copy.deepcopy(hf)
            for layer in other.model.layers:
                if change == "clamp":
                    layer.mlp.experts.limit = 1e9
                elif change == "sinks":
                    layer.self_attn.sinks.fill_(-1e9)
            if change == "window":
                other.config.sliding_window = 1000
            assert (other(x).logits - want).abs().max() > 100 * ATOL, change


def test_greedy_generation_matches(family):
    _, hf, _, ours = family
    prompt = _ids(seed=2, batch=1, length=6)
    want = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=10, do_sample=False), want)


def test_export_round_trip_reloads_in_transformers(family, tmp_path):
    _, hf, _, ours = family
    export_hf(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "gpt_oss" and written["architectures"] == ["GptOssForCausalLM"]
    back = hf_load(tmp_path)
    for key in ("layer_types", "sliding_window", "head_dim", "swiglu_limit", "swiglu_alpha", "attention_bias"):
        assert getattr(back.config, key) == getattr(hf.config, key), key
    legacy = {"type"}  # the 4.x spelling's key, which transformers 5 merges into rope_parameters
    assert {k: v for k, v in back.config.rope_parameters.items() if k not in legacy} == hf.config.rope_parameters
    x = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    theirs, mine = hf.state_dict(), back.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key


def gpt_oss_dict(**changes) -> dict:
    """A composed gpt-oss-like model: sliding and full layers by layer_pattern, sinks, moe_gpt_oss."""
    cfg = {
        "vocab_size": V,
        "hidden_size": 40,
        "num_layers": 3,
        "num_heads": 4,
        "max_position_embeddings": 64,
        "attention": {
            "type": "sliding_window",
            "num_kv_heads": 2,
            "head_dim": 12,
            "window": 6,
            "bias": True,
            "sinks": True,
        },
        "layer_pattern": ["sliding_window", "gqa"],
        "norm": {"type": "rmsnorm", "eps": 1e-5},
        "position": {"type": "rope", "theta": 5000.0},
        "ffn": {
            "type": "moe_gpt_oss",
            "num_experts": 4,
            "top_k": 2,
            "expert": {"type": "swiglu_clamped", "intermediate_size": 24, "limit": 3.0},
        },
        "tie_embeddings": False,
    }
    for key, value in changes.items():
        merge = isinstance(value, dict) and "type" not in value  # a new type replaces the options
        cfg[key] = {**cfg[key], **value} if merge else value
    return cfg


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {
            "layer_pattern": None,
            "attention": {"type": "gqa", "num_kv_heads": 2, "head_dim": 12, "bias": True, "sinks": True},
        },
    ],
    ids=["pattern", "full"],
)
def test_composed_model_exports_as_gpt_oss(changes, tmp_path):
    ours = compose(gpt_oss_dict(**changes), seed=0).eval()
    randomize(ours, seed=5)  # sinks, biases and norms away from their 0 / 1 init
    export_hf(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "gpt_oss"
    sliding = ["sliding_attention", "full_attention", "sliding_attention"] if not changes else ["full_attention"] * 3
    assert written["layer_types"] == sliding
    x = _ids(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(hf_load(tmp_path)(x).logits, ours(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "changes,where",
    [
        ({"attention": {"sinks": False}}, "model.attention.sinks"),
        ({"ffn": {"expert": {"type": "swiglu", "intermediate_size": 24}}}, "model.ffn.expert"),
        ({"ffn": {"normalize_top_k": False}}, "model.ffn.normalize_top_k"),
        ({"ffn": {"router_bias": False}}, "model.ffn.router_bias"),
        ({"attention": {"out_bias": False}}, "model.attention.out_bias"),
        ({"position": {"rotary_fraction": 0.5}}, "model.position.rotary_fraction"),
        ({"layers": [{"select": [1], "ffn": {"num_experts": 2}}]}, "model.layers"),
    ],
)
def test_export_refuses_what_gpt_oss_lacks(changes, where, tmp_path):
    ours = compose(gpt_oss_dict(**changes), device="meta")
    with pytest.raises(ConfigError) as info:
        export_hf(ours, tmp_path)
    assert where in str(info.value)
    assert not (tmp_path / "config.json").exists()


def write_config(folder, **changes) -> None:
    data = {"model_type": "gpt_oss", **hf_configs()["mqa_yarn"].to_dict(), **changes}
    (folder / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"quantization_config": {"quant_method": "mxfp4"}}, "quantization_config"),
        ({"sliding_window": None}, "sliding_window"),
        (
            {"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "full_attention"]},
            "layer_types",
        ),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"rope_parameters": {**YARN, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
        ({"swiglu_limit": "7"}, "swiglu_limit"),
    ],
)
def test_import_refuses_what_has_no_equivalent(changes, key, tmp_path):
    write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        import_hf(tmp_path)
    assert f"config.json:{key}" in str(info.value)


def test_absent_keys_take_gpt_oss_config_defaults():
    """A config.json without the optional keys reads as transformers reads it: GptOssConfig's defaults
    (8 KV heads of 64 dims, sliding window 128 on every other layer from layer 0, YaRN factor 32 from
    4,096 over theta 150,000, 128 experts top-4, clamp 7 and slope 1.702, biases on the attention)."""
    sizes = dict(vocab_size=V, hidden_size=48, num_hidden_layers=4, num_attention_heads=16, intermediate_size=24)
    sizes["max_position_embeddings"] = 512
    theirs = T.GptOssConfig(**sizes)
    raw = FAMILY.to_composer(HFConfig({"model_type": "gpt_oss", **sizes}, "config.json"))
    cfg = resolve_model_config(raw)
    for i, kind in enumerate(theirs.layer_types):
        a = cfg.layer(i).attention
        assert a.window_size() == (theirs.sliding_window if kind == "sliding_attention" else None)
        assert (a.head_dim, a.kv_heads(), a.bias) == (theirs.head_dim, theirs.num_key_value_heads, True)
    rope, params = cfg.position, theirs.rope_parameters
    assert (rope.scaling, rope.scaling_factor, rope.theta) == ("yarn", params["factor"], params["rope_theta"])
    assert (rope.original_max_position_embeddings, rope.truncate) == (params["original_max_position_embeddings"], False)
    m = cfg.ffn
    assert (m.num_experts, m.top_k) == (theirs.num_local_experts, theirs.num_experts_per_tok)
    assert (m.expert.limit, m.expert.alpha) == (theirs.swiglu_limit, theirs.swiglu_alpha)
