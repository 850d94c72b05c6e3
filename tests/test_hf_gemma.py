"""Gemma 2 and Gemma 3 (text) at parity with transformers itself: small random models built offline with
odd sizes (head_dim apart from hidden / heads, query_pre_attn_scalar apart from head_dim, windows shorter
than the prompts, soft-caps small enough to bite) and non-trivial norm weights are imported (float32
logits within 1e-4, identical greedy generation of 16 tokens, left-padded batches equal to each prompt
alone), exported back (transformers reloads them with the same logits and the same tensors),
composer-native Gemma compositions are exported, config.json as transformers 4.x wrote it imports as
the 5.x one does, and compositions without a Gemma equivalent are refused naming the component.

The Hugging Face side runs with attn_implementation="eager".
"""

from __future__ import annotations

import json

import pytest
import torch

from composer import compose
from composer.errors import ConfigError
from composer.hf import choose_family, export_hf, import_hf
from composer.hf.common import HFConfig
from composer.hf.gemma import FAMILY
from tests.conftest import small_model_dict
from tests.test_hf_parity import ATOL, NO_SPECIAL, hf_load, randomize

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

V = 97
GEMMA = dict(
    vocab_size=V,
    hidden_size=36,
    intermediate_size=70,
    num_attention_heads=3,
    head_dim=10,
    max_position_embeddings=64,
    **NO_SPECIAL,
)


def hf_configs() -> dict:
    return {
        # every other layer sliding from layer 0 (the default layer_types), scale 12**-0.5, both soft-caps
        "gemma2": T.Gemma2Config(
            **GEMMA,
            num_hidden_layers=3,
            num_key_value_heads=1,
            sliding_window=5,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=2.5,
            rope_theta=500.0,
        ),
        # biases, untied head, no soft-caps, explicit layer types starting with a full layer
        "gemma2_bias_untied": T.Gemma2Config(
            **GEMMA,
            num_hidden_layers=3,
            num_key_value_heads=3,
            sliding_window=4,
            attention_bias=True,
            tie_word_embeddings=False,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        ),
        # five local layers to one global (sliding_window_pattern 6), local rope base 100, linear scaling
        # on the global layers, per-head zero-centred qk norms
        "gemma3": T.Gemma3TextConfig(
            **GEMMA,
            num_hidden_layers=7,
            num_key_value_heads=1,
            sliding_window=5,
            rope_theta=20000.0,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
        # a window as long as the context: the local layers differ from the global one by their rope only
        "gemma3_window_as_long_as_the_context": T.Gemma3TextConfig(
            **GEMMA, num_hidden_layers=7, num_key_value_heads=3, sliding_window=64, rope_local_base_freq=300.0
        ),
        "gemma3_soft_capped": T.Gemma3TextConfig(
            **GEMMA,
            num_hidden_layers=3,
            num_key_value_heads=3,
            sliding_window=6,
            query_pre_attn_scalar=20,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=6.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            tie_word_embeddings=False,
        ),
    }


def _ids(seed: int = 1, batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(hf_configs()))
def family(request, tmp_path_factory):
    """(name, HF model, the imported composed model)."""
    hf = T.AutoModelForCausalLM.from_config(hf_configs()[request.param], attn_implementation="eager").eval()
    randomize(hf)  # norm weights 1 + noise: a zero-centred norm then scales by about 2
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, import_hf(folder)


def test_imported_logits_match(family):
    name, hf, ours = family
    x = _ids()
    with torch.no_grad():
        want, got = hf(x).logits, ours(x).logits
    assert got.shape == want.shape == (2, 20, V)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_the_composition_is_gemmas(family):
    name, hf, ours = family
    cfg, hc = ours.config, hf.config
    assert cfg.block.type == "sandwich" and cfg.embedding_scale == "sqrt" and cfg.ffn.type == "geglu"
    assert cfg.norm.type == "rmsnorm" and cfg.norm.zero_centred and cfg.norm.eps == hc.rms_norm_eps
    assert ours.tied == hc.tie_word_embeddings
    assert cfg.head.logit_softcap == hc.final_logit_softcapping
    specs = cfg.layer_specs()
    windows = [s.attention.window_size() for s in specs]
    local = hc.sliding_window if hc.sliding_window < hc.max_position_embeddings else None  # else: no window
    assert windows == [local if t == "sliding_attention" else None for t in hc.layer_types]
    for s in specs:
        a = s.attention
        assert (a.num_heads, a.kv_heads(), a.head_dim) == (3, hc.num_key_value_heads, 10)
        assert a.score_scale() == hc.query_pre_attn_scalar**-0.5
        # Gemma 3's attn_logit_softcapping is in its config only: transformers never applies it
        assert a.logit_softcap == (hc.attn_logit_softcapping if name.startswith("gemma2") else None)
        assert a.qk_norm == name.startswith("gemma3") and a.qk_norm_zero_centred == name.startswith("gemma3")
    if name == "gemma3":  # per-layer rope base: 100 on the local layers, 20,000 (scaled) on the global one
        thetas = [(s.position.theta, s.position.scaling) for s in specs]
        assert thetas == [(100.0, "none")] * 5 + [(20000.0, "linear")] + [(100.0, "none")]
        assert len({id(ours.layer_position(i)) for i in range(7)}) == 2  # one rotary table per base


def test_greedy_generation_matches(family):
    _, hf, ours = family
    prompt = _ids(seed=2, batch=1, length=7)
    want = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=16, do_sample=False)
    assert want.shape == (1, 23)
    assert torch.equal(got, want)


def test_left_padded_batch_equals_each_prompt_alone(family):
    """Prompts longer and shorter than the window, left-padded into one batch: the logits of every real
    position are transformers' for the prompt alone, and greedy generation is the prompt's alone."""
    _, hf, ours = family
    lengths = [9, 3, 6]
    prompts = [_ids(seed=10 + n, batch=1, length=n) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        ids[i, width - n :], mask[i, width - n :] = p[0], 1
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).logits
        for i, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
            torch.testing.assert_close(batched[i, width - n :], hf(p).logits[0], atol=ATOL, rtol=0)
    generated = ours.generate(ids, max_new_tokens=8, attention_mask=mask)
    for i, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        alone = hf.generate(p, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(generated[i, width - n :], alone[0]), i


def test_export_round_trip_reloads_in_transformers(family, tmp_path):
    name, hf, ours = family
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    assert config["layer_types"] == hf.config.layer_types
    back = hf_load(tmp_path)
    assert type(back) is type(hf)
    assert back.config.rope_parameters == hf.config.rope_parameters
    x = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    theirs, exported = hf.state_dict(), back.state_dict()
    assert set(exported) == set(theirs)
    for key, value in exported.items():
        assert torch.equal(value, theirs[key]), key


# ----------------------------------------------------------------------------- 4.x spellings
def _as_4x(config: dict) -> dict:
    """config.json as transformers 4.x wrote it: rope_theta (Gemma 3: + rope_local_base_freq, rope_scaling)
    instead of rope_parameters, no layer_types (Gemma 2: every other layer; Gemma 3: sliding_window_pattern)."""
    params = config.pop("rope_parameters")
    config.pop("layer_types")
    config.pop("_sliding_window_pattern", None)
    if config["model_type"] == "gemma2":
        config["rope_theta"] = params["rope_theta"]
        return config
    full, local = params["full_attention"], params["sliding_attention"]
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    config.update(
        rope_theta=full["rope_theta"],
        rope_local_base_freq=local["rope_theta"],
        rope_scaling=scaling,  # as google/gemma-3-4b-it's: {"factor": 8.0, "rope_type": "linear"}
        sliding_window_pattern=6,
    )
    return config


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_transformers_4x_and_5x_config_spellings_agree(name, tmp_path):
    hf = T.AutoModelForCausalLM.from_config(hf_configs()[name], attn_implementation="eager").eval()
    randomize(hf, seed=4)
    hf.save_pretrained(tmp_path)
    new = import_hf(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(_as_4x(written)))
    old = import_hf(tmp_path)
    assert old.config.to_dict() == new.config.to_dict()
    x = _ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(old(x).logits, hf(x).logits, atol=ATOL, rtol=0)


def _translate(config: dict) -> dict:
    c = HFConfig(config, "config.json")
    out = FAMILY.to_composer(c)
    c.check()
    return out


BASE = dict(
    model_type="gemma3_text",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(hidden_activation="gelu"), "config.json:hidden_activation: 'gelu' is not supported"),
        (dict(use_bidirectional_attention=True), "config.json:use_bidirectional_attention"),
        (dict(layer_types=["sliding_attention"]), "config.json:layer_types: expected 2"),
        (
            dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "rope_theta": 1.0}}),
            "config.json:rope_parameters.full_attention.rope_type: rope type 'dynamic' is not supported",
        ),
        (dict(num_hidden_layers=None), "config.json:num_hidden_layers: is required"),
    ],
)
def test_config_json_problems_are_named(changes, fragment):
    with pytest.raises(ConfigError) as info:
        _translate({**BASE, **changes})
    assert fragment in str(info.value)


def test_defaults_are_the_config_classes():
    """Keys config.json leaves out take Gemma's defaults; an explicit null turns a soft-cap or the window off."""
    g3 = _translate(BASE)
    assert g3["attention"]["head_dim"] == 256 and g3["attention"]["query_pre_attn_scalar"] == 256
    assert g3["head"]["logit_softcap"] is None and g3["attention"]["logit_softcap"] is None
    assert g3["position"]["theta"] == 10_000.0 and g3["tie_embeddings"]  # layer 0 is local
    g2 = _translate({**BASE, "model_type": "gemma2"})
    assert g2["head"]["logit_softcap"] == 30.0 and g2["attention"]["logit_softcap"] == 50.0
    off = _translate({**BASE, "model_type": "gemma2", "final_logit_softcapping": None, "sliding_window": None})
    assert off["head"]["logit_softcap"] is None and off["attention"]["type"] == "mha" and off["layers"] == []


# ----------------------------------------------------------------------------- composer-native Gemmas
def gemma_like(**changes) -> dict:
    cfg = small_model_dict(
        vocab_size=V,
        hidden_size=40,
        num_layers=4,
        num_heads=4,
        block="sandwich",
        attention={"type": "sliding_window", "window": 4, "num_kv_heads": 2, "head_dim": 12},
        ffn={"type": "geglu", "intermediate_size": 56},
        norm={"type": "rmsnorm", "eps": 1e-6, "zero_centred": True},
        position={"type": "rope", "theta": 1000.0},
        embedding_scale="sqrt",
        layers=[{"select": "1::2", "attention": {"type": "gqa"}}],
    )
    cfg.update(changes)
    return cfg


GEMMA3_QK = {"qk_norm": True, "qk_norm_eps": 1e-6, "qk_norm_zero_centred": True}
NATIVE = {
    "gemma2": (gemma_like(head={"type": "lm", "logit_softcap": 5.0}), "gemma2"),
    "gemma3": (
        gemma_like(
            attention={"type": "sliding_window", "window": 3, "num_kv_heads": 1, **GEMMA3_QK},
            layers=[{"select": [3], "attention": {"type": "mqa"}, "position": {"theta": 1e5, "scaling": "linear"}}],
            tie_embeddings=False,
            pad_vocab_to_multiple_of=8,
        ),
        "gemma3_text",
    ),
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_model_exports_to_transformers(name, tmp_path):
    raw, model_type = NATIVE[name]
    model = compose(raw, seed=5).eval()
    randomize(model, seed=6)
    export_hf(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == model_type
    back = hf_load(tmp_path / "hf")
    x = _ids(seed=4, length=16)
    with torch.no_grad():
        want = model(x).logits[..., :V]
        torch.testing.assert_close(back(x).logits, want, atol=ATOL, rtol=0)
    again = import_hf(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, atol=ATOL, rtol=0)


REFUSED = {
    "plain_rmsnorm": (gemma_like(norm={"type": "rmsnorm"}), "model.norm.zero_centred"),
    "no_embedding_scale": (gemma_like(embedding_scale=None), "model.embedding_scale"),
    "ffn_bias": (gemma_like(ffn={"type": "geglu", "intermediate_size": 56, "bias": True}), "model.ffn.bias"),
    "two_ropes_without_qk_norm": (
        gemma_like(layers=[{"select": "1::2", "attention": {"type": "gqa"}, "position": {"theta": 50.0}}]),
        "model.position: Gemma 2 has one rope",
    ),
    "two_windows": (gemma_like(layers=[{"select": [1], "attention": {"window": 6}}]), "different windows"),
    "per_layer_ffn": (
        gemma_like(layers=[{"select": [1], "ffn": {"intermediate_size": 64}}]),
        "a layer has a different ffn",
    ),
    "qk_norm_not_zero_centred": (
        gemma_like(attention={"type": "gqa", "num_kv_heads": 2, "qk_norm": True, "qk_norm_eps": 1e-6}, layers=[]),
        "model.attention.qk_norm: Gemma 3 normalises queries and keys",
    ),
    "attention_softcap_on_gemma3": (
        gemma_like(attention={"type": "gqa", "num_kv_heads": 2, "logit_softcap": 9.0, **GEMMA3_QK}, layers=[]),
        "model.attention.logit_softcap: Gemma 3 does not soft-cap attention scores",
    ),
    "fractional_query_pre_attn_scalar": (
        gemma_like(attention={"type": "gqa", "num_kv_heads": 2, "query_pre_attn_scalar": 11.5}, layers=[]),
        "model.attention.query_pre_attn_scalar: 11.5: Gemma's query_pre_attn_scalar is an integer",
    ),
    "head_softcap_on_llama": (
        small_model_dict(
            attention={"type": "gqa", "num_kv_heads": 2},
            ffn="swiglu",
            norm="rmsnorm",
            position="rope",
            head={"type": "lm", "logit_softcap": 30.0},
        ),
        "model.head.logit_softcap: does not fit the nearest Hugging Face family, llama",
    ),
    "zero_centred_llama": (
        small_model_dict(ffn="swiglu", norm={"type": "rmsnorm", "zero_centred": True}, position="rope"),
        "model.norm.zero_centred: does not fit the nearest Hugging Face family, llama",
    ),
    "embedding_scale_gpt2": (
        small_model_dict(attention={"type": "mha", "bias": True}, embedding_scale="sqrt"),
        "model.embedding_scale: does not fit the nearest Hugging Face family, gpt2",
    ),
    "weightless_norm": (gemma_like(norm={"type": "rmsnorm", "weight": False}), "model.norm.weight"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_compositions_without_a_gemma_equivalent_are_refused(name, tmp_path):
    raw, fragment = REFUSED[name]
    model = compose(raw, device="meta")
    with pytest.raises(ConfigError, match="no Hugging Face equivalent") as info:
        export_hf(model, tmp_path / "out")
    assert fragment in str(info.value)
    assert not (tmp_path / "out").exists()


def test_gemma_compositions_choose_the_gemma_family():
    for raw, model_type in NATIVE.values():
        family, kind = choose_family(compose(raw, device="meta").config)
        assert (family.name, kind) == ("gemma", model_type)
