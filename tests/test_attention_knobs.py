"""The attention and position knobs of issue 17, each against a reference written from its formula or
against transformers' own code: qk-norm per head / across heads, the sigmoid output gate (Qwen3-Next's
layout), attention sinks (gpt-oss) on both kernel paths, query_pre_attn_scalar, YaRN, a per-layer rotary
base, NoPE layers among rotary ones (SmolLM3), and the post_sublayer block (OLMo 2).

Shapes: B batch, T tokens, C hidden, H heads, Hkv key/value heads, D head dim, G gate width per head.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from conftest import small_model_dict
from core_helpers import inputs_for, rms, rope_reference

import components.kernels as kernels
from components.kernels import AttentionSpec, CallFacts, choose
from composer import ConfigError, compose
from composer.contract import CostCall
from composer.hf import import_hf
from composer.plan import plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, T, C, V = 2, 9, 48, 64


def _attn(position: str = "rope", num_layers: int = 1, **attention):
    """The first layer's attention (norm weights and biases away from 1 / 0), its position module."""
    attention.setdefault("type", "gqa")
    if attention["type"] == "gqa":
        attention.setdefault("num_kv_heads", 2)
    raw = small_model_dict(
        hidden_size=C, num_layers=num_layers, attention=attention, position={"type": position}, vocab_size=V
    )
    model = compose(raw, seed=0)
    attn = model.layers[0].attn
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    return attn, model.layer_position(0), model


def reference(attn, x: torch.Tensor, theta=None, key_valid=None) -> torch.Tensor:
    """Attention written from the formulas, in float64: projection, (gate split), qk-norm per head or across
    heads, rope, scores (scale), causal + padding mask, softmax with an optional sink column, gate, out."""
    b, t, _ = x.shape
    h, hkv, d, g = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.gate
    x = x.double()
    y = x @ attn.qkv.weight.double().T + (attn.qkv.bias.double() if attn.qkv.bias is not None else 0)
    qg = y[..., : h * (d + g)].reshape(b, t, h, d + g)
    q, gate = qg[..., :d], qg[..., d:]
    k = y[..., h * (d + g) : h * (d + g) + hkv * d].reshape(b, t, hkv, d)
    v = y[..., h * (d + g) + hkv * d :].reshape(b, t, hkv, d)
    if attn.qk_norm == "across_heads":
        q = rms(q.reshape(b, t, h * d), attn.q_norm.weight.double(), attn.q_norm.eps).reshape(b, t, h, d)
        k = rms(k.reshape(b, t, hkv * d), attn.k_norm.weight.double(), attn.k_norm.eps).reshape(b, t, hkv, d)
    elif attn.qk_norm == "per_head":
        q, k = (
            rms(q, attn.q_norm.weight.double(), attn.q_norm.eps),
            rms(k, attn.k_norm.weight.double(), attn.k_norm.eps),
        )
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|Hkv, T, D]
    if theta is not None:
        pos = torch.arange(t).expand(b, t)
        q, k = rope_reference(q, pos, theta, d), rope_reference(k, pos, theta, d)
    group = torch.arange(h) // (h // hkv)
    k, v = k[:, group], v[:, group]
    scale = attn.scale if attn.scale is not None else d**-0.5
    scores = q @ k.transpose(-1, -2) * scale  # [B, H, T, T]
    allowed = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, None, :]) | torch.eye(t, dtype=torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if attn.sinks is not None:
        sink = attn.sinks.double().view(1, h, 1, 1).expand(b, h, t, 1)
        probs = torch.cat((scores, sink), -1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    out = (probs @ v).transpose(1, 2)  # [B, T, H, D]
    if g:
        out = out * torch.sigmoid(gate)
    out = out.reshape(b, t, h * d) @ attn.out.weight.double().T
    return (out + attn.out.bias.double() if attn.out.bias is not None else out).float()


def _x(seed: int = 1, t: int = T) -> torch.Tensor:
    return torch.randn(B, t, C, generator=torch.Generator().manual_seed(seed))


# ============================================================================ qk-norm placement
@pytest.mark.parametrize("placement", [True, "per_head", "across_heads"])
def test_qk_norm_placements_match_the_reference(placement):
    attn, position, _ = _attn(qk_norm=placement, qk_norm_eps=1e-6, bias=True)
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    widths = (d, d) if placement != "across_heads" else (h * d, hkv * d)
    assert (attn.q_norm.weight.shape[0], attn.k_norm.weight.shape[0]) == widths
    assert attn.q_norm.eps == 1e-6
    x = _x()
    y, _ = attn(x, inputs_for(B, T, position))
    torch.testing.assert_close(y, reference(attn, x, theta=10000.0), rtol=1e-4, atol=1e-5)


def test_qk_norm_true_is_per_head_and_stays_true_in_the_config():
    a, _, old = _attn(qk_norm=True)
    b, _, new = _attn(qk_norm="per_head")
    assert old.config.attention.qk_norm is True and old.config.attention.qk_norm_placement() == "per_head"
    b.load_state_dict(a.state_dict())
    x = _x()
    pos = old.layer_position(0)
    torch.testing.assert_close(a(x, inputs_for(B, T, pos))[0], b(x, inputs_for(B, T, pos))[0], rtol=0, atol=0)


def test_across_heads_differs_from_per_head():
    """Same weights where the shapes allow (norm weights 1): the statistics differ, so the outputs do."""
    per, pos, _ = _attn(qk_norm="per_head")
    across, _, _ = _attn(qk_norm="across_heads")
    with torch.no_grad():
        for m in (per, across):
            m.q_norm.weight.fill_(1.0), m.k_norm.weight.fill_(1.0)
        across.qkv.load_state_dict(per.qkv.state_dict()), across.out.load_state_dict(per.out.state_dict())
    x = _x()
    assert not torch.allclose(per(x, inputs_for(B, T, pos))[0], across(x, inputs_for(B, T, pos))[0], atol=1e-3)


def test_a_bad_qk_norm_is_named_with_its_choices():
    with pytest.raises(ConfigError) as info:
        compose(small_model_dict(attention={"type": "mha", "qk_norm": "sideways"}), device="meta")
    assert "model.attention.qk_norm" in str(info.value) and "across_heads" in str(info.value)


# ============================================================================ output gate
@pytest.mark.parametrize("gate, width", [("headwise", 1), ("elementwise", 12)])
def test_output_gate_matches_the_reference(gate, width):
    attn, position, _ = _attn(output_gate=gate, qk_norm=True, head_dim=12)
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    assert attn.gate == width and attn.qkv.weight.shape == (h * (d + width) + 2 * hkv * d, C)
    x = _x()
    y, _ = attn(x, inputs_for(B, T, position))
    torch.testing.assert_close(y, reference(attn, x, theta=10000.0), rtol=1e-4, atol=1e-5)
    plain, _, _ = _attn(qk_norm=True, head_dim=12)  # the same attention without a gate
    with torch.no_grad():
        rows = attn.qkv.weight[: h * (d + width)].view(h, d + width, C)
        plain.qkv.weight.copy_(torch.cat([rows[:, :d].reshape(h * d, C), attn.qkv.weight[h * (d + width) :]]))
        plain.out.weight.copy_(attn.out.weight)
        plain.q_norm.weight.copy_(attn.q_norm.weight), plain.k_norm.weight.copy_(attn.k_norm.weight)
        rows[:, d:] = 0  # gate logits 0: sigmoid halves every output
        half, _ = attn(x, inputs_for(B, T, position))
        ungated, _ = plain(x, inputs_for(B, T, position))
    torch.testing.assert_close(half, 0.5 * ungated, rtol=1e-4, atol=1e-6)


def test_elementwise_gate_maps_qwen3_next_weights():
    """Qwen3-Next's q_proj ([H, 2D]: query, gate per head), k_proj and v_proj stacked are our qkv rows as
    they are; its zero-centred q/k norms are ours minus 1. The outputs agree with its attention."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as qn  # late: optional reference

    cfg = transformers.Qwen3NextConfig(
        hidden_size=C, num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6
    )
    cfg._attn_implementation = "eager"
    theirs = qn.Qwen3NextAttention(cfg, layer_idx=3).eval()
    attn, position, _ = _attn(output_gate="elementwise", qk_norm=True, qk_norm_eps=1e-6, head_dim=12)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 7)) * 0.3)
        attn.qkv.weight.copy_(torch.cat([theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight]))
        attn.out.weight.copy_(theirs.o_proj.weight)
        attn.q_norm.weight.copy_(1 + theirs.q_norm.weight)
        attn.k_norm.weight.copy_(1 + theirs.k_norm.weight)
    x = _x()
    inputs = inputs_for(B, T, position)
    cos, sin = inputs.rotation.cos[:, 0], inputs.rotation.sin[:, 0]  # [B|1, T, D]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want, _ = theirs(x, (cos, sin), mask)
        got, _ = attn(x, inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ============================================================================ attention sinks
def test_sinks_match_the_reference_on_both_kernel_paths(monkeypatch):
    attn, position, _ = _attn(sinks=True, num_kv_heads=2)
    assert attn.sinks.shape == (attn.num_heads,)
    with torch.no_grad():
        attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    x = _x()
    key_valid = torch.ones(B, T, dtype=torch.bool)
    key_valid[0, :3] = False
    seen = []
    real = kernels.attend
    monkeypatch.setattr("components.attention.attend", lambda c, *a, **k: seen.append(c) or real(c, *a, **k))
    for valid in (None, key_valid):
        want = reference(attn, x, theta=10000.0, key_valid=valid)
        with torch.no_grad():  # the fused kernel with its log-sum-exp
            fused, _ = attn(x, inputs_for(B, T, position, key_valid=valid))
        trained, _ = attn(x, inputs_for(B, T, position, key_valid=valid))  # explicit, with gradients
        rows = slice(None) if valid is None else (1, slice(None))
        torch.testing.assert_close(fused[rows], want[rows], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(trained[rows], want[rows], rtol=1e-4, atol=1e-5)
    assert [c.lse for c in seen] == [True, False, True, False]
    assert [c.kernel for c in seen] == ["sdpa", "explicit", "sdpa", "explicit"]


def test_sinks_gradients_match_the_reference():
    attn, position, _ = _attn(sinks=True)
    x = _x()
    y, _ = attn(x, inputs_for(B, T, position))
    (y**2).sum().backward()
    got = attn.sinks.grad.clone(), attn.qkv.weight.grad.clone()
    attn.zero_grad()
    ref = reference(attn, x, theta=10000.0)
    (ref**2).sum().backward()
    for ours, want in zip(got, (attn.sinks.grad, attn.qkv.weight.grad), strict=True):  # float32 vs float64
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_sinks_equal_gpt_oss_eager_attention():
    pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward  # late: optional reference

    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(B, 4, 7, 8, generator=gen), torch.randn(B, 2, 7, 8, generator=gen), torch.randn(B, 2, 7, 8)
    sinks = torch.randn(4, generator=gen)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    module = types.SimpleNamespace(sinks=sinks, num_key_value_groups=2, training=False)
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=8**-0.5)  # [B, T, H, D]
    spec = AttentionSpec(4, 2, 8, sinks=True)
    for facts in (CallFacts(grad=False), CallFacts(grad=True, training=True)):
        choice = choose(spec, facts)
        mask_in = kernels.make_mask(choice, spec, torch.arange(7), torch.arange(7), None, None)
        got = kernels.attend(choice, spec, q, k, v, mask_in, 0.0, sinks)
        torch.testing.assert_close(got.transpose(1, 2), want, rtol=1e-5, atol=1e-6)


def test_sinks_in_the_kernel_chooser_say_why_they_fall_back():
    spec = AttentionSpec(8, 4, 64, sinks=True)
    assert choose(spec, CallFacts("cpu", grad=False)).lse
    training = choose(spec, CallFacts("cpu", grad=True, training=True))
    assert training.kernel == "explicit" and "attention sinks with gradients" in training.fallback
    cuda = choose(spec, CallFacts("cuda", torch.bfloat16, grad=False))
    assert cuda.kernel == "explicit" and "on cuda" in cuda.fallback
    window = choose(AttentionSpec(8, 4, 64, window=16, sinks=True), CallFacts("cuda", torch.bfloat16, grad=True))
    assert window.kernel == "explicit" and window.fallback == "flex: attention sinks"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plan_counts_the_path_a_sinks_training_step_takes(dtype, monkeypatch):
    attn, position, _ = _attn(sinks=True)
    attn = attn.to(dtype).train()
    seen = []
    real = kernels.attend
    monkeypatch.setattr("components.attention.attend", lambda c, *a, **k: seen.append(c) or real(c, *a, **k))
    attn(_x().to(dtype), inputs_for(B, T, position))
    call = CostCall(T, B, activation_bytes=4 if dtype == torch.float32 else 2, device="cpu")
    assert seen == [attn.planned_choice(call)]


def test_composer_plan_shows_the_sinks_fallback():
    raw = small_model_dict(attention={"type": "mha", "sinks": True}, position={"type": "rope"})
    report = plan(raw, batch_size=2, seq_len=64)
    assert any("explicit: sdpa: attention sinks with gradients" in note for note in report.notes), report.notes
    plain = plan(small_model_dict(position={"type": "rope"}), batch_size=2, seq_len=64)
    assert report.memory.activations > plain.memory.activations  # the explicit softmax's scores


def test_sinks_decode_with_a_cache_matches_the_full_forward():
    _, _, model = _attn(sinks=True, num_layers=2)
    model.eval()
    x = torch.randint(0, V, (B, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :7], use_cache=True)
        step = model(x[:, 7:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 7:], rtol=1e-4, atol=1e-5)


# ============================================================================ query_pre_attn_scalar
def test_query_pre_attn_scalar_scales_by_its_inverse_square_root():
    attn, position, _ = _attn(query_pre_attn_scalar=20.0, logit_softcap=30.0)
    assert attn.scale == 20.0**-0.5
    other, _, _ = _attn(softmax_scale=20.0**-0.5, logit_softcap=30.0)
    other.load_state_dict(attn.state_dict())
    x = _x()
    torch.testing.assert_close(attn(x, inputs_for(B, T, position))[0], other(x, inputs_for(B, T, position))[0])
    plain, _, _ = _attn(logit_softcap=30.0)
    plain.load_state_dict(attn.state_dict())
    assert not torch.allclose(attn(x, inputs_for(B, T, position))[0], plain(x, inputs_for(B, T, position))[0])


def test_query_pre_attn_scalar_and_softmax_scale_are_exclusive():
    attention = {"type": "mha", "softmax_scale": 0.1, "query_pre_attn_scalar": 64.0}
    with pytest.raises(ConfigError) as info:
        compose(small_model_dict(attention=attention), device="meta")
    text = str(info.value)
    assert "model.attention.query_pre_attn_scalar" in text and "softmax_scale" in text


# ============================================================================ YaRN
YARN_CASES = [
    {"factor": 4.0, "original_max_position_embeddings": 32},
    {"factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    {"factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.7},
    {"factor": 2.0, "original_max_position_embeddings": 32, "attention_factor": 1.3, "partial_rotary_factor": 0.5},
]


@pytest.mark.parametrize("case", YARN_CASES)
def test_yarn_matches_transformers(case):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # late: optional reference

    theta, head_dim = 5000.0, 16
    hf = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": theta, **case},
    )
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    rope = {"type": "rope", "theta": theta, "scaling": "yarn", "scaling_factor": case["factor"]}
    rope.update({k: v for k, v in case.items() if k not in ("factor", "partial_rotary_factor")})
    rope["rotary_fraction"] = case.get("partial_rotary_factor", 1.0)
    model = compose(small_model_dict(hidden_size=64, max_position_embeddings=128, position=rope), seed=0)
    torch.testing.assert_close(model.position.inv_freq, want_inv.float(), rtol=1e-6, atol=0)
    assert math.isclose(model.position.temperature, want_factor, rel_tol=1e-12)
    cos, sin = model.position.cos_sin(torch.arange(5)[None])
    plain = torch.arange(5)[:, None].float() * model.position.inv_freq
    torch.testing.assert_close(cos[0, 0, :, : plain.shape[1]], plain.cos() * want_factor)


def test_yarn_needs_beta_fast_above_beta_slow():
    rope = {"type": "rope", "scaling": "yarn", "scaling_factor": 2.0, "beta_fast": 1.0, "beta_slow": 4.0}
    with pytest.raises(ConfigError, match=r"model\.position\.beta_fast"):
        compose(small_model_dict(position=rope), device="meta")


# ============================================================================ per-layer position: rope base, NoPE
def _reference_forward(model, x: torch.Tensor, thetas: list) -> torch.Tensor:
    """The whole pre-norm model written out, layer i rotated with thetas[i] (None: no position)."""
    h = model.embed(x)
    for layer, theta in zip(model.layers, thetas, strict=True):
        h = h + reference(layer.attn, layer.attn_norm(h), theta=theta)
        h = h + layer.ffn(layer.ffn_norm(h))
    return model.head(model.final_norm(h))


@pytest.mark.parametrize(
    "override, thetas",
    [
        ({"select": [1], "position": {"type": "rope", "theta": 500.0}}, [10000.0, 500.0, 10000.0]),  # Gemma 3 style
        ({"select": [2], "position": {"type": "none"}}, [10000.0, 10000.0, None]),  # NoPE layer
    ],
    ids=["rope_base_per_layer", "nope_layer"],
)
def test_per_layer_position_matches_the_reference(override, thetas):
    raw = small_model_dict(
        hidden_size=C,
        num_layers=3,
        vocab_size=V,
        attention={"type": "gqa", "num_kv_heads": 2},
        ffn={"type": "swiglu", "intermediate_size": 40},
        norm="rmsnorm",
        position={"type": "rope"},
        layers=[override],
    )
    model = compose(raw, seed=0).eval()
    assert [model.config.layer(i).position.type for i in range(3)] == ["none" if t is None else "rope" for t in thetas]
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(x).logits
        torch.testing.assert_close(got, _reference_forward(model, x, thetas), rtol=1e-4, atol=1e-5)
        same = _reference_forward(model, x, [10000.0] * 3)
    assert not torch.allclose(got, same, atol=1e-4), "the override changed nothing: the test is vacuous"


def test_nope_layers_match_smollm3(tmp_path):
    """SmolLM3 (transformers) skips rope on every fourth layer; its weights in a llama-laid-out composition
    with ``position: none`` on those layers give its logits."""
    transformers = pytest.importorskip("transformers")

    cfg = transformers.SmolLM3Config(
        vocab_size=V,
        hidden_size=C,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        no_rope_layer_interval=2,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    assert cfg.no_rope_layers == [1, 0, 1, 0]
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * noise if p.dim() == 1 else 0.2 * noise)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(written))
    all_rope = import_hf(tmp_path)
    raw = all_rope.config.to_dict()
    raw["layers"] = [{"select": [1, 3], "position": {"type": "none"}}]
    nope = compose(raw, seed=0).eval()
    nope.load_state_dict(all_rope.state_dict())
    x = torch.randint(0, V, (B, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(nope(x).logits, want, rtol=0, atol=1e-4)
        assert not torch.allclose(all_rope(x).logits, want, atol=1e-3)


# ============================================================================ post_sublayer block
def test_post_sublayer_block_normalises_each_branch_output():
    raw = small_model_dict(hidden_size=C, block="post_sublayer", norm="rmsnorm", position={"type": "rope"})
    model = compose(raw, seed=0)
    layer = model.layers[0]
    with torch.no_grad():
        for norm in (layer.attn_norm, layer.ffn_norm):
            norm.weight.add_(torch.randn(C, generator=torch.Generator().manual_seed(9)) * 0.3)
    x = _x()
    inputs = inputs_for(B, T, model.layer_position(0))
    y, _, _ = layer(x, inputs)
    h = x + layer.attn_norm(reference(layer.attn, x, theta=10000.0))  # no norm before the attention
    want = h + layer.ffn_norm(layer.ffn(h))
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    assert model.final_norm is not None  # the residual stream is normalised once, at the end
