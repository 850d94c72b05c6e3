"""Parity with transformers for Qwen3, OLMo 2 and Phi-3: small random models built with transformers itself
(odd sizes, norms and biases away from 1 / 0) are imported (float32 logits within 1e-4, identical greedy
tokens, a left-padded batch equal to each prompt alone), exported back (transformers reloads them with
the same logits and the same tensors), composer-native models export, and config.json as transformers
4.x wrote it (rope_theta / rope_scaling) imports as the 5.x form (rope_parameters) does.

The Hugging Face side runs with attn_implementation="eager".
"""

from __future__ import annotations

import json

import pytest
import torch
from test_hf_parity import ATOL, NO_SPECIAL, V, _ids, hf_load, randomize

from composer import compose
from composer.errors import ConfigError
from composer.hf import choose_family, export_hf, import_hf
from tests.conftest import small_model_dict

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ODD = dict(vocab_size=V, intermediate_size=72, max_position_embeddings=64, **NO_SPECIAL)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 5000.0}


def hf_configs() -> dict:
    return {
        # head_dim 10 with hidden 56 / 4 heads; a window on the last layer; biases on all four projections
        "qwen3_window_on_layer_2": T.Qwen3Config(
            **ODD,
            hidden_size=56,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=10,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=2,
            rms_norm_eps=1e-5,
        ),
        "qwen3_yarn_tied": T.Qwen3Config(
            **ODD,
            hidden_size=56,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=12,
            tie_word_embeddings=True,
            rope_parameters=dict(YARN, beta_fast=16.0, beta_slow=2.0),
        ),
        "olmo2": T.Olmo2Config(
            **ODD, hidden_size=56, num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=7, rms_norm_eps=1e-6
        ),
        "olmo2_gqa_bias": T.Olmo2Config(
            **ODD,
            hidden_size=60,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 700.0},
        ),
        "phi3_partial_window": T.Phi3Config(
            **ODD,
            hidden_size=60,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            sliding_window=7,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.6},
        ),
        "phi3_mha": T.Phi3Config(
            **ODD,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 3000.0},
        ),
    }


@pytest.fixture(scope="module", params=list(hf_configs()))
def family(request, tmp_path_factory):
    """(name, HF model, its folder, the imported composed model)."""
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
        want, got = hf(x).logits, ours(x).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    cfg = ours.config
    a = cfg.attention
    if name.startswith("qwen3"):
        assert a.qk_norm == "per_head" and a.head_dim == hf.config.head_dim != cfg.hidden_size // cfg.num_heads
    if name == "qwen3_window_on_layer_2":
        assert [cfg.layer(i).attention.type for i in range(3)] == ["gqa", "gqa", "sliding_window"]
        assert cfg.layer(2).attention.window == 5 and a.bias and a.out_bias
    if name == "qwen3_yarn_tied":
        p = cfg.position
        assert (p.scaling, p.scaling_factor, p.beta_fast, p.beta_slow) == ("yarn", 4.0, 16.0, 2.0) and ours.tied
    if name.startswith("olmo2"):
        assert cfg.block.type == "post_sublayer" and a.qk_norm == "across_heads"
        assert ours.layers[0].attn.q_norm.weight.shape == (a.num_heads * a.head_dim,)
        assert ours.layers[0].attn.k_norm.weight.shape == (a.kv_heads() * a.head_dim,)
    if name == "phi3_partial_window":
        assert a.type == "sliding_window" and a.window == 7 and ours.position.rotary_dim == 6


def test_greedy_generation_matches(family):
    _, hf, _, ours = family
    prompt = _ids(seed=2, batch=1, length=6)
    want = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=16, do_sample=False)
    assert want.shape == (1, 22)
    assert torch.equal(got, want)


def test_left_padded_batch_equals_each_prompt_alone(family):
    _, hf, _, ours = family
    long, short = _ids(seed=7, batch=1, length=11)[0], _ids(seed=8, batch=1, length=6)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(5, dtype=torch.long), short])])
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask).logits
        for row, prompt in ((0, long), (1, short)):
            alone = ours(prompt[None]).logits[0]
            torch.testing.assert_close(padded[row, -len(prompt) :], alone, atol=ATOL, rtol=0)
            torch.testing.assert_close(alone, hf(prompt[None]).logits[0], atol=ATOL, rtol=0)
        generated = ours.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for row, prompt in ((0, long), (1, short)):
            alone = ours.generate(prompt[None], max_new_tokens=8, do_sample=False)[0]
            assert torch.equal(generated[row, -8:], alone[-8:]), f"row {row}"


def test_export_round_trip_reloads_in_transformers(family, tmp_path):
    _, hf, _, ours = family
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    assert config["architectures"] == hf.config.architectures
    back = hf_load(tmp_path)
    x = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    theirs, exported = hf.state_dict(), back.state_dict()
    assert set(exported) == set(theirs)
    for key, value in exported.items():
        assert torch.equal(value, theirs[key]), key


# ----------------------------------------------------------------------------- composer-native models
NATIVE = {
    "qwen3": (
        small_model_dict(
            vocab_size=V,
            hidden_size=40,
            num_layers=3,
            attention={"type": "gqa", "num_kv_heads": 2, "head_dim": 14, "qk_norm": True, "qk_norm_eps": 1e-6},
            ffn={"type": "swiglu", "intermediate_size": 56},
            norm={"type": "rmsnorm", "eps": 1e-6},
            position={"type": "rope", "theta": 2000.0},
            layers=[{"select": [0], "attention": {"type": "sliding_window", "window": 4}}],
        ),
        "qwen3",
    ),
    "olmo2": (
        small_model_dict(
            vocab_size=V,
            hidden_size=40,
            block="post_sublayer",
            attention={"type": "mqa", "qk_norm": "across_heads", "bias": True},
            ffn={"type": "swiglu", "intermediate_size": 56},
            norm="rmsnorm",
            position={
                "type": "rope",
                "scaling": "yarn",
                "scaling_factor": 2.0,
                "original_max_position_embeddings": 32,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
            },
        ),
        "olmo2",
    ),
    "phi3": (
        small_model_dict(
            vocab_size=V,
            hidden_size=40,
            attention={"type": "gqa", "num_kv_heads": 2},
            ffn={"type": "swiglu", "intermediate_size": 56},
            norm="rmsnorm",
            position={"type": "rope", "rotary_fraction": 0.4},
        ),
        "phi3",
    ),
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_model_exports_to_transformers(name, tmp_path):
    raw, model_type = NATIVE[name]
    model = compose(raw, seed=5).eval()
    randomize(model, seed=6)
    assert choose_family(model.config)[1] == model_type
    export_hf(model, tmp_path / "hf")
    back = hf_load(tmp_path / "hf")
    x = _ids(seed=4, length=16)
    with torch.no_grad():
        want = model(x).logits
        torch.testing.assert_close(back(x).logits, want, atol=ATOL, rtol=0)
        torch.testing.assert_close(import_hf(tmp_path / "hf")(x).logits, want, atol=ATOL, rtol=0)


REFUSED = {
    "qwen3_qk_norm_eps": (
        dict(attention={"type": "gqa", "num_kv_heads": 2, "qk_norm": True, "qk_norm_eps": 1e-3}),
        "model.attention.qk_norm_eps",
    ),
    "qwen3_zero_centred_qk_norm": (
        dict(attention={"type": "gqa", "num_kv_heads": 2, "qk_norm": True, "qk_norm_zero_centred": True}),
        "model.attention.qk_norm_zero_centred",
    ),
    "olmo2_per_head": (
        dict(block="post_sublayer", attention={"type": "mha", "qk_norm": "per_head"}),
        "model.attention.qk_norm",
    ),
    "olmo2_window": (
        dict(block="post_sublayer", attention={"type": "sliding_window", "window": 4, "qk_norm": "across_heads"}),
        "model.block.type: 'post_sublayer' does not fit",
    ),
    "output_gate": (dict(attention={"type": "mha", "output_gate": "headwise"}), "model.attention.output_gate"),
    "sinks": (dict(attention={"type": "mha", "sinks": True}), "model.attention.sinks"),
    "phi3_bias": (
        dict(attention={"type": "mha", "bias": True}, position={"type": "rope", "rotary_fraction": 0.5}),
        "model.position.rotary_fraction",  # llama is nearest (and Phi-3 has no biases either)
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_compositions_without_an_equivalent_are_refused(name, tmp_path):
    changes, fragment = REFUSED[name]
    llama_like = dict(ffn="swiglu", norm={"type": "rmsnorm", "eps": 1e-5}, position="rope")
    model = compose(small_model_dict(**{**llama_like, **changes}), device="meta")
    with pytest.raises(ConfigError, match="no Hugging Face equivalent") as info:
        export_hf(model, tmp_path / "out")
    assert fragment in str(info.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- config.json spellings
def _legacy(written: dict) -> dict:
    """The 4.x spelling of a 5.x config.json: rope_theta, rope_scaling (with `type`), partial_rotary_factor."""
    params = written.pop("rope_parameters")
    written["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        written["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    kind = params.pop("rope_type")
    written["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    return written


@pytest.mark.parametrize("name", list(hf_configs()))
def test_transformers_4x_and_5x_config_spellings_agree(name, tmp_path):
    cfg = hf_configs()[name]
    folder = tmp_path / name
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in written
    new = import_hf(folder)
    (folder / "config.json").write_text(json.dumps(_legacy(written)))
    old = import_hf(folder)
    assert old.config.to_dict() == new.config.to_dict()
    assert torch.equal(old.position.inv_freq, new.position.inv_freq)


@pytest.mark.parametrize("kind", ["longrope", "yarn", "linear"])
def test_phi3_rope_types_other_than_the_default_are_refused_by_name(kind, tmp_path):
    """transformers' Phi-3 has the default rope and longrope (and reads yarn as longrope)."""
    cfg = hf_configs()["phi3_mha"]
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written["rope_parameters"] = {"rope_type": kind, "rope_theta": 10000.0, "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(ConfigError) as info:
        import_hf(tmp_path)
    text = str(info.value)
    assert "rope_parameters.rope_type" in text and repr(kind) in text and "phi3" in text
    assert "supported: default" in text


@pytest.mark.parametrize("kind", ["longrope", "dynamic"])
def test_unbuilt_rope_types_are_refused_by_name_for_qwen3(kind, tmp_path):
    T.AutoModelForCausalLM.from_config(hf_configs()["qwen3_yarn_tied"]).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written.pop("rope_parameters")
    written.update(rope_theta=10000.0, rope_scaling={"type": kind, "factor": 2.0})  # the 4.x spelling
    (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(ConfigError) as info:
        import_hf(tmp_path)
    text = str(info.value)
    assert (
        "rope_scaling.rope_type" in text and repr(kind) in text and "supported: default, linear, llama3, yarn" in text
    )
