"""Conformance suite over every registered component, and each built-in against its formula.

Parametrised from the registries at collection time, so a newly registered component is
covered without editing this file. Sizes are tiny (C=32, H=4, T<=12) to keep it fast on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model_dict
from core_helpers import (
    REQUIRED_OPTIONS,
    component,
    ids,
    inputs_for,
    is_builtin,
    model_with,
    reference_attention,
    registered,
    required_fields,
    rms,
    rope_reference,
)
from core_helpers import alibi_slopes_reference as paper_slopes
from core_helpers import attention as attention_cfg

import components.block as block_module
import composer.model as model_module
from components.attention import SelfAttention
from components.position import alibi_slopes
from composer import compose
from composer.registry import ATTENTION, NORM, POSITION

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMPONENTS = registered()
ATTENTIONS = ATTENTION.names()
POSITIONS = POSITION.names()
BUILTIN_ATTENTIONS = [n for n in ATTENTIONS if is_builtin("attention", n)]
# the explicit reference (core_helpers.reference_attention: one fused qkv, one head dim) is SelfAttention's
# formula; other built-in mixers (latent attention, linear-time mixers) meet their own references in their files
SELF_ATTENTIONS = [n for n in BUILTIN_ATTENTIONS if issubclass(ATTENTION.get(n).cls, SelfAttention)]
B, T, V = 2, 10, 64


def _id(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ============================================================================ every component
def test_required_options_are_known():
    """Every registered component builds with the options the tests give it (a new component
    with a required option must be added to REQUIRED_OPTIONS in core_helpers)."""
    for family, name in COMPONENTS:
        for field in required_fields(family, name):
            if field == "type":
                continue
            assert field in REQUIRED_OPTIONS.get(name, {}), f"{family} {name!r}: add {field} to REQUIRED_OPTIONS"


@pytest.mark.parametrize("pair", COMPONENTS, ids=_id)
def test_component_forward_shapes_and_gradients(pair):
    family, name = pair
    model = compose(model_with(family, name), seed=0)
    x = ids(B, T)
    classify = model.config.head.type == "classification"
    labels = torch.tensor([0, 2]) if classify else x
    out = model(x, labels=labels)
    assert out.logits.shape == ((B, 3) if classify else (B, T, V))
    assert torch.isfinite(out.logits).all()
    assert out.loss is not None and out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters that receive no gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("pair", COMPONENTS, ids=_id)
def test_component_keeps_bf16(pair):
    family, name = pair
    model = compose(model_with(family, name), dtype=torch.bfloat16, seed=0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = model(ids(B, T), labels=None)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all()
    hidden = torch.randn(B, T, 32, dtype=torch.bfloat16)
    layer = model.layers[0]
    y, _, _ = layer(hidden, inputs_for(B, T, model.layer_position(0)))
    assert y.dtype == torch.bfloat16, f"{family} {name!r}: the block returned {y.dtype} for bf16 input"


# ============================================================================ attention
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causal_attention_ignores_future_tokens(attention, position):
    model = compose(small_model_dict(attention=attention_cfg(attention), position=component(position)), seed=0)
    x = ids(B, 12)
    t = 5
    changed = x.clone()
    changed[:, t + 1 :] = (x[:, t + 1 :] + 1) % V
    a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :]), "changing tokens changed nothing: test is vacuous"


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "none"])
def test_non_causal_attention_sees_future_tokens(position):
    model = compose(small_model_dict(attention={"type": "mha", "causal": False}, position=component(position)), seed=0)
    x = ids(B, T)
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % V
    assert not torch.allclose(model(x).logits[:, 0], model(changed).logits[:, 0])


def _attention(attention: dict, position: str = "none", **model) -> tuple:
    cfg = small_model_dict(attention=attention, position=component(position), num_layers=1, **model)
    m = compose(cfg, seed=0)
    return m.layers[0].attn, m.config.layer(0).position, m.layer_position(0)


ATTENTION_OPTIONS = [
    {},
    {"bias": True, "qk_norm": True},
    {"softmax_scale": 0.5, "logit_softcap": 3.0},
    {"causal": False, "num_heads": 2},
]


@pytest.mark.parametrize("position", ["none", "rope", "alibi"])
@pytest.mark.parametrize(
    "options", ATTENTION_OPTIONS, ids=["default", "bias-qknorm", "scale-softcap", "bidirectional-2heads"]
)
@pytest.mark.parametrize("attention", SELF_ATTENTIONS)
def test_attention_matches_explicit_reference(attention, options, position):
    """Every attention type x option x position equals an explicit-mask softmax reference."""
    options = dict(options)
    if attention == "gqa":
        options["num_kv_heads"] = 2 if options.get("num_heads", 4) == 4 else 1
    attn, pos, module = _attention(attention_cfg(attention, window=3, **options), position)
    with torch.no_grad():
        for p in attn.parameters():  # non-trivial norm weights and biases
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(B, 8, 32, generator=torch.Generator().manual_seed(1))
    y, present = attn(x, inputs_for(B, 8, module))
    assert present is None
    torch.testing.assert_close(y, reference_attention(attn, x, pos), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", SELF_ATTENTIONS)
def test_attention_with_padding_matches_reference(attention):
    attn, pos, module = _attention(attention_cfg(attention, window=3), "rope")
    x = torch.randn(B, 8, 32)
    key_valid = torch.ones(B, 8, dtype=torch.bool)
    key_valid[0, :3] = False  # left padding on row 0
    y, _ = attn(x, inputs_for(B, 8, module, key_valid=key_valid))
    ref = reference_attention(attn, x, pos, key_valid)
    torch.testing.assert_close(y[:, 3:], ref[:, 3:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y[1], ref[1], rtol=1e-4, atol=1e-5)


def _same_weights(src, dst) -> None:
    dst.load_state_dict(src.state_dict())


def test_gqa_with_all_kv_heads_equals_mha():
    mha = compose(small_model_dict(attention={"type": "mha"}, position={"type": "rope"}), seed=0)
    gqa = compose(small_model_dict(attention={"type": "gqa", "num_kv_heads": 4}, position={"type": "rope"}), seed=1)
    assert gqa.layers[0].attn.num_kv_heads == 4
    _same_weights(mha, gqa)
    x = ids(B, T)
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_heads_share_key_values(kv_heads):
    """gqa with Hkv < H equals mha whose key/value weights repeat each group's head."""
    gqa = compose(small_model_dict(attention={"type": "gqa", "num_kv_heads": kv_heads}), seed=0)
    mha = compose(small_model_dict(attention={"type": "mha"}), seed=0)
    state = gqa.state_dict()
    d, h = 8, 4
    for i in range(2):
        w = state[f"layers.{i}.attn.qkv.weight"]  # [(H + 2 Hkv) D, C]
        q, k, v = w.split([h * d, kv_heads * d, kv_heads * d])
        rep = lambda t: t.view(kv_heads, d, -1).repeat_interleave(h // kv_heads, dim=0).reshape(h * d, -1)
        state[f"layers.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    x = ids(B, T)
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, rtol=1e-5, atol=1e-5)


def test_mqa_equals_gqa_with_one_kv_head():
    mqa = compose(small_model_dict(attention={"type": "mqa"}), seed=0)
    gqa = compose(small_model_dict(attention={"type": "gqa", "num_kv_heads": 1}), seed=1)
    assert mqa.layers[0].attn.num_kv_heads == 1
    _same_weights(mqa, gqa)
    x = ids(B, T)
    torch.testing.assert_close(gqa(x).logits, mqa(x).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window", [T, 64])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_sliding_window_at_least_length_equals_full_causal(window, position):
    full = compose(small_model_dict(attention={"type": "mha"}, position={"type": position}), seed=0)
    local = compose(
        small_model_dict(attention={"type": "sliding_window", "window": window}, position={"type": position}), seed=1
    )
    _same_weights(full, local)
    x = ids(B, T)
    torch.testing.assert_close(local(x).logits, full(x).logits, rtol=1e-5, atol=1e-5)


def test_sliding_window_shorter_than_length_is_local():
    full = compose(small_model_dict(attention={"type": "mha"}), seed=0)
    local = compose(small_model_dict(attention={"type": "sliding_window", "window": 3}), seed=1)
    _same_weights(full, local)
    x = ids(B, T)
    a, b = full(x).logits, local(x).logits
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-5)  # within the window: same
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3
    # and each token sees exactly its last 3 tokens: changing a token 3 back changes nothing
    attn, _, _ = _attention({"type": "sliding_window", "window": 3})
    h = torch.randn(1, T, 32)
    y, _ = attn(h, inputs_for(1, T))
    h2 = h.clone()
    h2[:, 2] += 1.0
    y2, _ = attn(h2, inputs_for(1, T))
    assert torch.equal(y[:, 5:], y2[:, 5:]) and not torch.allclose(y[:, 2:5], y2[:, 2:5])


# ============================================================================ position encodings
def _rope(**options):
    model = compose(small_model_dict(position={"type": "rope", **options}, num_layers=1), seed=0)
    return model.position


def _rotate(rope, x: torch.Tensor, position: int) -> torch.Tensor:
    return rope.rotate(x, x, inputs_for(1, 1, position_ids=torch.tensor([[position]])))[0]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"theta": 500.0},
        {"rotary_fraction": 0.5},
        {"scaling": "linear", "scaling_factor": 4.0},
        {"scaling": "llama3", "scaling_factor": 8.0, "original_max_position_embeddings": 64},
    ],
)
def test_rope_scores_depend_only_on_relative_position(options):
    rope = _rope(**options)
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64),
        torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64),
    )
    q, k = q.float(), k.float()
    dot = lambda m, n: (_rotate(rope, q, m) * _rotate(rope, k, n)).sum().item()
    for m, n in [(5, 2), (9, 0), (3, 7)]:
        for shift in (1, 13, 40):
            assert dot(m + shift, n + shift) == pytest.approx(dot(m, n), abs=1e-4)
    assert abs(dot(5, 2) - dot(9, 2)) > 1e-3, "scores must change with the distance"
    # rotation keeps norms
    torch.testing.assert_close(_rotate(rope, q, 11).norm(), q.norm(), rtol=1e-5, atol=1e-6)


def test_rope_matches_complex_rotation_formula():
    for fraction in (1.0, 0.5):
        rope = _rope(theta=100.0, rotary_fraction=fraction)
        x = torch.randn(2, 4, 6, 8)
        inputs = inputs_for(2, 6, position_ids=torch.arange(3, 9).expand(2, 6))
        got = rope.rotate(x, x, inputs)[0]
        want = rope_reference(x, inputs.position_ids, 100.0, int(8 * fraction))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if fraction < 1:
            assert torch.equal(got[..., 4:], x[..., 4:]), "partial rope must leave the other dims alone"


def test_rope_scaling_frequencies():
    base = _rope().inv_freq
    torch.testing.assert_close(_rope(scaling="linear", scaling_factor=4.0).inv_freq, base / 4)
    # Llama 3.1's apply_scaling, as published by Meta
    factor, low, high, old = 8.0, 1.0, 4.0, 64
    want = []
    for freq in base.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            want.append(freq)
        elif wavelen > old / low:
            want.append(freq / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            want.append((1 - smooth) * freq / factor + smooth * freq)
    got = _rope(
        scaling="llama3",
        scaling_factor=factor,
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=old,
    ).inv_freq
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)
    assert len(set(torch.tensor(want).div(base).round(decimals=4).tolist())) == 3, "all three bands exercised"


def test_rope_in_bf16_keeps_float32_angles():
    """A bf16 model rotates by the same angles as a float32 one: its frequencies must not be
    rounded to bf16 (at position 4000 that turns a vector by a third of a radian)."""
    rope32 = _rope()
    model16 = compose(small_model_dict(position={"type": "rope"}, num_layers=1), dtype=torch.bfloat16, seed=0)
    assert model16.position.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model16.position.inv_freq, rope32.inv_freq, rtol=0, atol=0)
    model16.float().bfloat16()  # casting again later (Lightning's bf16-true does) changes nothing
    torch.testing.assert_close(model16.position.inv_freq, rope32.inv_freq, rtol=0, atol=0)
    for position in (7, 4000):
        cos16, sin16 = model16.position.cos_sin(torch.tensor([[position]]))
        cos32, sin32 = rope32.cos_sin(torch.tensor([[position]]))
        torch.testing.assert_close(cos16, cos32, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin16, sin32, rtol=0, atol=1e-6)
    x = torch.randn(1, 1, 1, 8)
    torch.testing.assert_close(
        _rotate(model16.position, x.bfloat16(), 4000).float(), _rotate(rope32, x, 4000), rtol=0, atol=0.03
    )


@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8, 12])
def test_alibi_slopes_and_bias_formula(heads):
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(paper_slopes(heads)), rtol=1e-6, atol=0)
    model = compose(
        small_model_dict(position={"type": "alibi"}, num_heads=heads, hidden_size=8 * heads, num_layers=1), seed=0
    )
    q_pos, k_pos = torch.arange(3, 7), torch.arange(0, 7)
    bias = model.position.bias(q_pos, k_pos)  # [H, Tq, Tk]
    assert bias.shape == (heads, 4, 7)
    want = -torch.tensor(paper_slopes(heads))[:, None, None] * (q_pos[:, None] - k_pos[None, :]).abs()
    torch.testing.assert_close(bias, want.float())


def test_positions_without_embedding_or_rotation_are_identity():
    for name in ("none", "alibi", "learned"):
        pos = compose(small_model_dict(position={"type": name}, num_layers=1), seed=0).position
        q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)
        q2, k2 = pos.rotate(q, k, inputs_for(1, 3))
        assert torch.equal(q2, q) and torch.equal(k2, k)
        embedding = pos.embed(torch.arange(3)[None])
        if name == "learned":
            torch.testing.assert_close(embedding, pos.weight[:3][None])
        else:
            assert embedding is None
        if name != "alibi":
            assert pos.bias(torch.arange(3), torch.arange(3)) is None


# ============================================================================ norms
def _norm(name: str, **options):
    model = compose(small_model_dict(norm={"type": name, **options}, num_layers=1), seed=0)
    norm = model.layers[0].attn_norm
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    return norm


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_formula(bias):
    norm = _norm("layernorm", bias=bias, eps=1e-3)
    assert (norm.bias is not None) == bias
    x = torch.randn(3, 5, 32) * 4 + 2
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-3) * norm.weight + (norm.bias if bias else 0)
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)


def test_rmsnorm_formula():
    norm = _norm("rmsnorm", eps=1e-2)
    assert sum(p.numel() for p in norm.parameters()) == 32
    x = torch.randn(3, 5, 32) * 0.1
    torch.testing.assert_close(norm(x), rms(x, norm.weight, 1e-2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in NORM.names() if is_builtin("norm", n)])
def test_norm_keeps_bf16(name):
    norm = _norm(name).to(torch.bfloat16)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16


# ============================================================================ feed-forward
def _ffn(options: dict, hidden: int = 32):
    model = compose(small_model_dict(ffn=options, num_layers=1, hidden_size=hidden), seed=0)
    return model.layers[0].ffn


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATION_FORMULAS = {
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": _gelu_tanh,
    "relu": lambda x: x.clamp(min=0),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "relu2": lambda x: x.clamp(min=0) ** 2,
}


@pytest.mark.parametrize("activation", sorted(ACTIVATION_FORMULAS))
def test_mlp_formula(activation):
    ffn = _ffn({"type": "mlp", "activation": activation})
    assert ffn.up.weight.shape == (128, 32), "default intermediate size is 4 * hidden"
    x = torch.randn(2, 5, 32)
    hidden = ACTIVATION_FORMULAS[activation](x @ ffn.up.weight.T + ffn.up.bias)
    torch.testing.assert_close(ffn(x), hidden @ ffn.down.weight.T + ffn.down.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,act", [("swiglu", ACTIVATION_FORMULAS["silu"]), ("geglu", _gelu_tanh)])
def test_gated_ffn_formula_and_default_width(name, act):
    ffn = _ffn({"type": name, "multiple_of": 64}, hidden=96)
    assert ffn.intermediate_size == 256, "8/3 * 96 = 256 (already a multiple of 64)"
    assert _ffn({"type": name, "multiple_of": 100}, hidden=96).intermediate_size == 300
    x = torch.randn(2, 5, 96)
    gate_w, up_w = ffn.gate_up.weight.split(256)  # rows [gate | up]
    want = (act(x @ gate_w.T) * (x @ up_w.T)) @ ffn.down.weight.T
    torch.testing.assert_close(ffn(x), want, rtol=1e-5, atol=1e-5)


def _moe(**options):
    base = {"type": "moe", "num_experts": 4, "top_k": 2, "expert": {"type": "mlp", "intermediate_size": 16}}
    return _ffn({**base, **options})


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_moe_output_is_weighted_sum_of_top_k_experts(expert, normalize):
    moe = _moe(expert={"type": expert, "intermediate_size": 16}, normalize_top_k=normalize, top_k=2)
    x = torch.randn(2, 7, 32)
    out, aux = moe(x)
    assert out.shape == x.shape
    flat, got = x.reshape(-1, 32), out.reshape(-1, 32)
    probs = (flat @ moe.router.weight.T).softmax(-1)  # [N, E]
    for n in range(flat.shape[0]):
        top = probs[n].topk(2)
        weights = top.values / top.values.sum() if normalize else top.values
        want = sum(
            w * moe.experts.expert(e, flat[n : n + 1])[0] for w, e in zip(weights, top.indices.tolist(), strict=True)
        )
        torch.testing.assert_close(got[n], want, rtol=1e-4, atol=1e-5)


def test_moe_aux_loss_and_gradients():
    moe = _moe(aux_loss_weight=0.5)
    x = torch.randn(4, 8, 32, requires_grad=True)
    out, aux = moe(x)
    assert aux.dim() == 0 and torch.isfinite(aux) and aux > 0
    # Switch Transformer: E * sum_e f_e * P_e * weight
    probs = (x.reshape(-1, 32) @ moe.router.weight.T).softmax(-1)
    chosen = probs.topk(2).indices
    f = torch.zeros(4).index_add_(0, chosen.reshape(-1), torch.ones(chosen.numel())) / chosen.numel()
    torch.testing.assert_close(aux, 4 * (f * probs.mean(0)).sum() * 0.5, rtol=1e-5, atol=1e-6)
    (out.square().mean() + aux).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    for e, grad in enumerate(moe.experts.up.weight.grad.view(4, 16, 32)):  # [E, I, C] stacked experts
        assert grad.abs().sum() > 0, f"expert {e}"
    # the aux loss alone reaches the router
    moe.zero_grad()
    moe(x)[1].backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_model_loss_includes_moe_aux_loss():
    model = compose(small_model_dict(ffn=component("moe")), seed=0)
    x = ids(B, T)
    out = model(x, labels=x)
    assert out.aux_loss is not None and out.aux_loss > 0
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + out.aux_loss)


# ============================================================================ heads
def test_lm_head_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = compose(small_model_dict(), seed=0)
    x = ids(B, T)
    labels = x.clone()
    labels[0, :4] = -100
    labels[1, -1] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, V)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    manual = -(logits[keep].log_softmax(-1).gather(1, target[keep, None])).mean()
    torch.testing.assert_close(out.loss, manual)


def test_lm_head_softcap_bounds_logits():
    model = compose(small_model_dict(head={"type": "lm", "logit_softcap": 0.5}), seed=0)
    with torch.no_grad():
        model.embed.weight.mul_(100)  # raw logits far beyond the cap
    logits = model(ids(B, T)).logits
    assert logits.abs().max() <= 0.5 and logits.abs().max() > 0.45


def test_lm_head_tied_and_untied():
    tied = compose(small_model_dict(tie_embeddings=True), seed=0)
    untied = compose(small_model_dict(tie_embeddings=False), seed=0)
    assert tied.tied and tied.head.proj.weight is tied.embed.weight
    assert not untied.tied and untied.head.proj.weight is not untied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == V * 32
    assert not torch.equal(untied.head.proj.weight, untied.embed.weight), "untied weights initialised apart"
    # tied: a gradient step on the head moves the embedding
    tied(ids(B, T), labels=ids(B, T)).loss.backward()
    assert tied.embed.weight.grad is not None
    with torch.no_grad():
        tied.head.proj.weight.add_(1.0)
    assert torch.equal(tied.head.proj.weight, tied.embed.weight)


def test_lm_head_bias_and_padded_vocabulary():
    model = compose(
        small_model_dict(head={"type": "lm", "bias": True}, vocab_size=60, pad_vocab_to_multiple_of=16), seed=0
    )
    assert model.embed.weight.shape[0] == 64 and model.head.proj.bias.shape == (64,)
    logits = model(ids(B, T, vocab=60)).logits
    assert logits.shape == (B, T, 64)
    assert torch.isinf(logits[..., 60:]).all() and torch.isfinite(logits[..., :60]).all()


def _classifier(pooling: str):
    model = compose(
        small_model_dict(
            head={"type": "classification", "num_classes": 3, "pooling": pooling},
            attention={"type": "mha", "causal": False},
            block="post_norm",
            tie_embeddings=False,
        ),
        seed=0,
    )
    return model.eval()


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_classification_pooling(pooling):
    head = _classifier(pooling).head
    hidden = torch.randn(3, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # right, left, none
    rows = {"last": [3, 5, 5], "first": [0, 2, 0]}
    if pooling == "mean":
        pooled = torch.stack([hidden[0, :4].mean(0), hidden[1, 2:].mean(0), hidden[2].mean(0)])
    else:
        pooled = hidden[torch.arange(3), rows[pooling]]
    torch.testing.assert_close(head(hidden, mask), pooled @ head.proj.weight.T + head.proj.bias)
    assert head(hidden, None).shape == (3, 3)


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_classification_is_independent_of_padding_side(pooling):
    model = _classifier(pooling)
    a, b = ids(1, 5, seed=1), ids(1, 3, seed=2)
    alone = torch.cat([model(a).logits, model(b).logits])
    pad = torch.zeros(1, 2, dtype=torch.long)
    right = model(
        torch.cat([a, torch.cat([b, pad], 1)]), attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    ).logits
    left = model(torch.cat([a, torch.cat([pad, b], 1)]), attention_mask=torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])).logits
    torch.testing.assert_close(right, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-4, atol=1e-5)
    labels = torch.tensor([1, 2])
    out = model(
        torch.cat([a, torch.cat([b, pad], 1)]), attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]), labels=labels
    )
    torch.testing.assert_close(out.loss, F.cross_entropy(right, labels))


# ============================================================================ blocks
def _block(name: str, **options):
    model = compose(small_model_dict(block={"type": name, **options}, num_layers=1, norm={"type": "layernorm"}), seed=0)
    layer = model.layers[0]
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p))
    return model, layer


def _call_attn(layer, x):
    return layer.attn(x, inputs_for(*x.shape[:2]))[0]  # the blocks' tests use no position encoding


BLOCK_FORMULAS = {
    "pre_norm": lambda m, x: (lambda h: h + m.ffn(m.ffn_norm(h)))(x + _call_attn(m, m.attn_norm(x))),
    "post_norm": lambda m, x: (lambda h: m.ffn_norm(h + m.ffn(h)))(m.attn_norm(x + _call_attn(m, x))),
    "parallel": lambda m, x: x + _call_attn(m, m.attn_norm(x)) + m.ffn(m.ffn_norm(x)),
    "parallel-shared": lambda m, x: x + _call_attn(m, m.attn_norm(x)) + m.ffn(m.attn_norm(x)),
}


@pytest.mark.parametrize("kind", sorted(BLOCK_FORMULAS))
def test_block_wiring_formula(kind):
    name, _, shared = kind.partition("-")
    model, layer = _block(name, **({"shared_norm": True} if shared else {}))
    if shared:
        assert layer.ffn_norm is None
    x = torch.randn(B, 7, 32)
    y, present, aux = layer(x, inputs_for(B, 7))
    assert present is None and aux is None
    torch.testing.assert_close(y, BLOCK_FORMULAS[kind](layer, x), rtol=1e-5, atol=1e-5)
    # post-norm blocks end with a norm, so the model adds no final norm
    assert (model.final_norm is None) == (name == "post_norm")


# ============================================================================ checkpointing
@pytest.mark.parametrize("mode,calls", [("every_layer", 3), ("every_2", 2), ("attention", 3), ("ffn", 3)])
def test_gradient_checkpointing_gives_same_loss_and_gradients(mode, calls, monkeypatch):
    cfg = small_model_dict(num_layers=3, ffn=component("moe"), position={"type": "rope"})
    ref = compose(cfg, seed=0).train()
    ckpt = compose({**cfg, "gradient_checkpointing": mode}, seed=0).train()
    count = {"n": 0}

    def counting(checkpoint):
        def wrapped(*args, **kwargs):
            count["n"] += 1
            return checkpoint(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(model_module, "checkpoint", counting(model_module.checkpoint))
    monkeypatch.setattr(block_module, "checkpoint", counting(block_module.checkpoint))
    x = ids(B, T)
    a, b = ref(x, labels=x), ckpt(x, labels=x)
    assert count["n"] == calls, f"{mode}: expected {calls} checkpointed calls, got {count['n']}"
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in ckpt.named_parameters():
        if p.grad is None and grads[name].grad is None:  # an expert no token was routed to
            continue
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    count["n"] = 0
    with torch.no_grad():
        ckpt(x)
    assert count["n"] == 0, "no recomputation without gradients"


# ============================================================================ torch.compile
# Dynamo traces the whole forward with fullgraph=True (any graph break is an error) and
# explain() counts breaks. The aot_eager backend runs the traced graph without Inductor's C++
# code generation, which alone takes ~40 s per model on this 2-core CPU; graph capture, the
# property under test, is identical.
@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("tiny", []),
        ("gpt2", ["model.num_layers=2"]),  # 2 of GPT-2's 12 identical layers, to keep the compile short
    ],
)
def test_presets_compile_without_graph_breaks(preset, overrides):
    from composer import load_config

    torch._dynamo.reset()
    model = compose(load_config([f"model={preset}", *overrides]).model, seed=0).eval()
    x = ids(2, 16, vocab=model.config.vocab_size)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, out = model(x).logits, compiled(x).logits
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
