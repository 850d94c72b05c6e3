"""Parity with transformers for Mamba-2, Bamba (Mamba-2 layers with a few attention layers), OLMo-Hybrid
(Gated DeltaNet layers with OLMo 2 attention layers) and Qwen3-Next (Gated DeltaNet, gated attention, experts
with a shared expert): small random
models built with transformers itself (odd sizes, n_groups > 1, chunks that do not divide the length, norms
and biases away from 1 / 0; transformers' PyTorch path on the CPU) are imported (float32 logits within 1e-4,
identical greedy tokens with a cache on both sides), exported back (transformers reloads them with the same
logits and the same tensors), saved as composer checkpoints, and composer-native hybrids export.

Also the ``none`` feed-forward these layers use: no parameters, no ffn_norm, no cost, refused by a block that
cannot skip it.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_hf_parity import ATOL, NO_SPECIAL, V, _ids, hf_load, randomize

from composer import ComposedModel, compose
from composer.errors import ConfigError
from composer.hf import choose_family, export_hf, import_hf
from composer.plan import plan
from tests.conftest import small_model_dict
from tests.core_helpers import inputs_for

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_configs() -> dict:
    mamba = dict(vocab_size=V, **NO_SPECIAL)
    bamba = dict(vocab_size=V, max_position_embeddings=64, mamba_d_conv=3, **NO_SPECIAL)
    return {
        # inner 48 = 6 heads x 8, three groups of B / C, state 5, chunks of 6 over 20 tokens
        "mamba2": T.Mamba2Config(
            **mamba,
            hidden_size=24,
            num_hidden_layers=3,
            num_heads=6,
            head_dim=8,
            expand=2,
            state_size=5,
            n_groups=3,
            conv_kernel=3,
            chunk_size=6,
        ),
        # projection biases, no conv bias, tied embeddings, a clamped time step, expand 3, another eps
        "mamba2_bias_tied_limited": T.Mamba2Config(
            **mamba,
            hidden_size=20,
            num_hidden_layers=2,
            num_heads=6,
            head_dim=10,
            expand=3,
            state_size=7,
            n_groups=2,
            conv_kernel=4,
            chunk_size=7,
            use_bias=True,
            use_conv_bias=False,
            tie_word_embeddings=True,
            time_step_limit=(0.05, 2.0),
            layer_norm_epsilon=1e-6,
        ),
        # attention on layers 1 and 3 (grouped-query, head_dim 12 rotated by half), SwiGLU everywhere
        "bamba": T.BambaConfig(
            **bamba,
            hidden_size=48,
            intermediate_size=72,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_layer_indices=[1, 3],
            mamba_n_heads=6,
            mamba_d_head=16,
            mamba_n_groups=3,
            mamba_d_state=5,
            mamba_chunk_size=6,
        ),
        # one attention layer first (one key/value head), biases on attention, feed-forward and mamba
        "bamba_mqa_biases": T.BambaConfig(
            **bamba,
            hidden_size=32,
            intermediate_size=56,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            attn_layer_indices=[0],
            attention_bias=True,
            mlp_bias=True,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=2,
            mamba_d_state=6,
            mamba_chunk_size=8,
            mamba_proj_bias=True,
            rms_norm_eps=1e-6,
        ),
        # gated_deltanet on layers 0, 2, 3 (2 key heads of 10 dims, 4 value heads of 5), OLMo 2 attention on 1, 4
        # (q/k norms across heads, biases); H Dv = Hk Dk, as transformers 5.24 saves q/k/v_conv1d in equal thirds
        "olmo_hybrid": T.OlmoHybridConfig(
            vocab_size=V,
            hidden_size=40,
            intermediate_size=56,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            layer_types=[
                "linear_attention",
                "full_attention",
                "linear_attention",
                "linear_attention",
                "full_attention",
            ],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=10,
            linear_value_head_dim=5,
            linear_conv_kernel_dim=3,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
            **NO_SPECIAL,
        ),
        # gated_deltanet on 0-2 and 4 (2 key heads of 6 dims, 4 value heads of 5), gated attention on 3 (head_dim 16,
        # a quarter rotated), experts with a gated shared expert, a dense SwiGLU on layer 2; (1 + w) norms
        "qwen3_next": T.Qwen3NextConfig(
            vocab_size=V,
            hidden_size=40,
            intermediate_size=56,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=6,
            linear_value_head_dim=5,
            linear_conv_kernel_dim=3,
            num_experts=5,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=20,
            mlp_only_layers=[2],
            max_position_embeddings=64,
            **NO_SPECIAL,
        ),
    }


@pytest.fixture(scope="module", params=list(hf_configs()))
def family(request, tmp_path_factory):
    """(name, HF model, its folder, the imported composed model)."""
    hf = T.AutoModelForCausalLM.from_config(hf_configs()[request.param], attn_implementation="eager").eval()
    randomize(hf, seed=7)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder, import_hf(folder)


def test_imported_logits_match(family):
    name, hf, _, ours = family
    x = _ids()
    with torch.no_grad():
        want, got = hf(x).logits, ours(x).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    cfg = ours.config
    kinds = [cfg.layer(i).attention.type for i in range(cfg.num_layers)]
    if name.startswith("mamba2"):
        assert set(kinds) == {"mamba2"} and cfg.ffn.type == "none"
        assert not any(hasattr(layer, "ffn_norm") and layer.ffn_norm is not None for layer in ours.layers)
        assert cfg.attention.n_groups == hf.config.n_groups > 1
    elif name == "qwen3_next":
        assert kinds == ["gated_deltanet"] * 3 + ["gqa", "gated_deltanet"]
        assert [cfg.layer(i).ffn.type for i in range(cfg.num_layers)] == ["moe", "moe", "swiglu", "moe", "moe"]
        a, f = cfg.layer(3).attention, cfg.layer(0).ffn
        assert a.output_gate == "elementwise" and a.qk_norm_zero_centred and cfg.norm.zero_centred
        assert f.shared_experts == 1 and f.shared_expert_gate and cfg.position.rotary_fraction == 0.25
    elif name == "olmo_hybrid":
        want = ["gated_deltanet" if t == "linear_attention" else "gqa" for t in hf.config.layer_types]
        assert kinds == want
        blocks = [cfg.layer(i).block.type for i in range(cfg.num_layers)]
        assert blocks == ["pre_norm" if k == "gated_deltanet" else "post_sublayer" for k in kinds]
        assert cfg.layer(0).attention.allow_neg_eigval and cfg.layer(0).attention.num_key_heads == 2
    else:
        want_kinds = ["gqa" if i in hf.config.attn_layer_indices else "mamba2" for i in range(cfg.num_layers)]
        if name == "bamba_mqa_biases":
            want_kinds = [k.replace("gqa", "mqa") for k in want_kinds]
        assert kinds == want_kinds
        assert cfg.position.rotary_fraction == 0.5
    if name == "mamba2_bias_tied_limited":
        assert ours.tied and (cfg.attention.dt_limit_min, cfg.attention.dt_limit_max) == (0.05, 2.0)


def test_greedy_generation_with_a_cache_matches(family):
    _, hf, _, ours = family
    prompt = _ids(seed=2, batch=1, length=6)
    mask = torch.ones_like(prompt)  # explicit: a token equal to pad_token_id is not padding
    want = hf.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, use_cache=True)
    got = ours.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True)
    assert want.shape == (1, 22)
    assert torch.equal(got, want)


def test_export_round_trip_reloads_in_transformers(family, tmp_path):
    _, hf, _, ours = family
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    back = hf_load(tmp_path)
    x = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    theirs, exported = hf.state_dict(), back.state_dict()
    assert set(exported) == set(theirs)
    for key, value in exported.items():
        assert torch.equal(value, theirs[key]), key
    if hf.config.model_type == "mamba2":
        assert back.config.n_groups == hf.config.n_groups
        assert tuple(back.config.time_step_limit) == tuple(hf.config.time_step_limit)
    elif hf.config.model_type in ("olmo_hybrid", "qwen3_next"):
        assert back.config.layer_types == hf.config.layer_types
    else:
        assert back.config.attn_layer_indices == hf.config.attn_layer_indices


def test_imported_model_saves_as_a_composer_checkpoint(family, tmp_path):
    _, _, _, ours = family
    ours.save_pretrained(tmp_path)
    again = ComposedModel.from_pretrained(tmp_path)
    x = _ids(seed=5)
    with torch.no_grad():
        assert torch.equal(again(x).logits, ours(x).logits)


def test_transformers_4x_infinity_spelling_imports(tmp_path):
    """transformers 5 writes inf as {"__float__": "Infinity"}; 4.x wrote a bare Infinity (json.dumps)."""
    hf = T.AutoModelForCausalLM.from_config(hf_configs()["mamba2"])
    hf.save_pretrained(tmp_path)
    new = import_hf(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["time_step_limit"][1] == {"__float__": "Infinity"}
    data["time_step_limit"] = [0.0, float("inf")]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert "Infinity" in (tmp_path / "config.json").read_text()
    old = import_hf(tmp_path)
    assert old.config.to_dict() == new.config.to_dict()
    assert old.config.attention.dt_limit_max is None


# ----------------------------------------------------------------------------- composer-native hybrids
MAMBA = {"type": "mamba2", "num_heads": 4, "head_dim": 16, "state_size": 6, "n_groups": 2, "chunk_size": 5}
MAMBA_OPTIONS = {k: v for k, v in MAMBA.items() if k != "type"}


def test_native_hybrid_from_a_layer_pattern_exports_as_bamba(tmp_path):
    cfg = small_model_dict(
        vocab_size=V,
        num_layers=4,
        attention={"type": "gqa", "num_kv_heads": 2},
        layer_pattern=["mamba2", "mamba2", "mamba2", "gqa"],
        mixers={"mamba2": MAMBA_OPTIONS},
        ffn={"type": "swiglu", "intermediate_size": 40},
        norm="rmsnorm",
        position={"type": "rope", "rotary_fraction": 0.5},
        tie_embeddings=False,
    )
    model = compose(cfg, seed=3).eval()
    randomize(model, seed=4)
    assert choose_family(model.config)[1] == "bamba"
    export_hf(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["attn_layer_indices"] == [3]
    back = hf_load(tmp_path / "hf")
    x = _ids(seed=4, length=16)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, atol=ATOL, rtol=0)


def _mamba_model(**changes):
    base = dict(vocab_size=V, attention=MAMBA, ffn="none", norm="rmsnorm", position="none", num_heads=1)
    return small_model_dict(**{**base, **changes})


def test_native_mamba2_exports_and_refusals_name_the_option(tmp_path):
    model = compose(_mamba_model(), seed=1).eval()
    randomize(model, seed=2)
    export_hf(model, tmp_path / "ok")
    back = hf_load(tmp_path / "ok")
    x = _ids(seed=6, length=12)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits[..., :V], atol=ATOL, rtol=0)
    bad = {
        "attention.norm_eps": _mamba_model(attention={**MAMBA, "norm_eps": 1e-3}),  # one eps in HF
        "attention.num_heads": _mamba_model(attention={**MAMBA, "head_dim": 12}),  # inner 48 / hidden 32
    }
    for key, raw in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            export_hf(compose(raw, device="meta"), tmp_path / key)


# ----------------------------------------------------------------------------- the `none` feed-forward
def test_none_feed_forward_has_no_parameters_norm_or_cost():
    with_ffn = compose(_mamba_model(ffn={"type": "mlp"}), device="meta")
    without = compose(_mamba_model(), device="meta")
    layer = without.layers[0]
    assert layer.skip_ffn and layer.ffn_norm is None and not list(layer.ffn.parameters())
    ffn_params = sum(p.numel() for n, p in with_ffn.layers[0].named_parameters() if n.startswith(("ffn", "ffn_norm")))
    assert with_ffn.num_parameters() - without.num_parameters() == 2 * ffn_params > 0
    report = plan(without.config, batch_size=1, seq_len=64, device="cpu")
    assert report.params_total == without.num_parameters()
    assert [r.ffn for r in report.rows] == ["none", "none"]
    model = compose(_mamba_model(), seed=0)
    block, x = model.layers[0], torch.randn(2, 5, 32)
    inputs = inputs_for(2, 5, model.layer_position(0))
    out, _, aux = block(x, inputs)
    mixed, _ = block.attn(block.attn_norm(x), inputs)
    torch.testing.assert_close(out, x + mixed)  # x + mixer(norm(x)): nothing after the mixer
    assert aux is None


def test_none_feed_forward_is_skipped_by_every_built_in_block_and_refused_by_one_that_cannot():
    from components.block import BlockConfig, _Block
    from composer.contract import BuildContext

    for block in ("pre_norm", "post_norm", "parallel", "post_sublayer", "sandwich"):
        model = compose(small_model_dict(block=block, ffn="none", norm="rmsnorm"), device="meta")
        assert not any("ffn" in name for name, _ in model.named_parameters()), block

    class NeedsFeedForward(_Block):  # ffn_optional stays False
        pass

    ctx = BuildContext(hidden_size=32, vocab_size=64, max_position_embeddings=64, num_layers=1)
    none = compose(small_model_dict(ffn="none"), device="meta").layers[0].ffn
    with pytest.raises(ConfigError, match="model.ffn.type"):
        NeedsFeedForward(BlockConfig(dropout=0.0), ctx, torch.nn.Identity(), none, {"attn_norm": torch.nn.Identity()})


def test_hybrids_without_an_equivalent_are_refused_naming_the_part():
    gdn = small_model_dict(
        num_layers=4,
        attention={"type": "gqa", "num_kv_heads": 2},
        layer_pattern=["gated_deltanet", "gqa"],
        ffn="swiglu",
        norm="rmsnorm",
        position="rope",
    )
    with pytest.raises(ConfigError, match=r"attention layers are post_sublayer .*olmo_hybrid") as info:
        choose_family(compose(gdn, device="meta").config)
    assert "q/k are normalised across heads" in str(info.value)
    window = small_model_dict(
        num_layers=2,
        attention={"type": "sliding_window", "window": 4},
        layer_pattern=["mamba2", "sliding_window"],
        mixers={"mamba2": MAMBA_OPTIONS},
        ffn="swiglu",
        norm="rmsnorm",
        position={"type": "rope", "rotary_fraction": 0.5},
    )
    with pytest.raises(
        ConfigError, match=r"layer 1: sliding_window attention has no equivalent \(Hugging Face bamba\)"
    ):
        choose_family(compose(window, device="meta").config)
