"""Multi-head latent attention (components/mla.py): parity with transformers' DeepseekV3Attention,
the latent cache (only the latent and the rope key; decoding with it equals decoding without it;
static caches), both forms of the attention, padding, gradient checkpointing, the kernel chooser and
composer-plan's figures for DeepSeek-V3's attention geometry."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_model_dict
from core_helpers import ids, inputs_for

import components.mla as mla_module
from components.kernels import CallFacts, choose
from components.mla import LatentAttention
from components.mla_cache import LatentCache
from composer import compose
from composer.contract import CostCall, LayerInputs
from composer.errors import ConfigError
from composer.plan import plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# odd sizes: C 30, H 3, L 10, Lq 12, N 7, R 6, V 5
MLA = {"type": "mla", "kv_lora_rank": 10, "qk_nope_head_dim": 7, "qk_rope_head_dim": 6, "v_head_dim": 5}
YARN = {"scaling": "yarn", "scaling_factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.7}


def _model(attention=None, position=None, **changes):
    cfg = small_model_dict(
        hidden_size=30,
        num_heads=3,
        attention={**MLA, **(attention or {})},
        position=position if position and "type" in position else {"type": "rope", "theta": 500.0, **(position or {})},
        norm={"type": "rmsnorm"},
        ffn={"type": "swiglu", "intermediate_size": 40},
        **changes,
    )
    model = compose(cfg, seed=0)
    with torch.no_grad():  # non-trivial norm weights and biases
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


# ----------------------------------------------------------------------------- transformers parity
def _hf_attention(q_lora_rank, bias: bool, rope: dict):
    from transformers import DeepseekV3Config  # late: heavy, only the parity tests need it
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # late: heavy, as above
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    config = DeepseekV3Config(
        hidden_size=30,
        num_attention_heads=3,
        num_key_value_heads=3,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=10,
        qk_nope_head_dim=7,
        qk_rope_head_dim=6,
        v_head_dim=5,
        attention_bias=bias,
        max_position_embeddings=64,
        rope_parameters=rope,
        rope_interleave=True,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    attn = DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return attn, DeepseekV3RotaryEmbedding(config)


PARITY = {
    "q-lora": (12, False, {"rope_type": "default", "rope_theta": 500.0}, {}),
    "plain-q-bias": (None, True, {"rope_type": "default", "rope_theta": 500.0}, {}),
    "yarn": (
        12,
        True,
        {
            "rope_type": "yarn",
            "rope_theta": 500.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 0.7,
            "mscale_all_dim": 0.9,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
        {**YARN, "mscale_all_dim": 0.9},
    ),
}


@pytest.mark.parametrize("case", PARITY)
def test_matches_transformers_deepseek_v3_attention(case):
    q_lora, bias, rope, position = PARITY[case]
    hf, rotary = _hf_attention(q_lora, bias, rope)
    model = _model({"q_lora_rank": q_lora, "bias": bias}, position, num_layers=1)
    attn = model.layers[0].attn
    attn.load_state_dict(hf.state_dict())  # the same names, strictly
    assert attn.spec.scale == pytest.approx(hf.scaling, rel=1e-12)
    if case == "yarn":  # the softmax scale carries mscale(factor, mscale_all_dim)^2
        assert hf.scaling == pytest.approx((7 + 6) ** -0.5 * (0.1 * 0.9 * math.log(4.0) + 1) ** 2)
    b, t = 2, 11
    x = torch.randn(b, t, 30, generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(t).expand(b, t)
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]  # [1, 1, T, T] additive
    with torch.no_grad():
        want = hf(x, position_embeddings=rotary(x, position_ids), attention_mask=causal)[0]
        got, _ = attn(x, inputs_for(b, t, model.layer_position(0)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rope_layout_matters():
    """Without rope_interleave the same weights give other outputs (the parity above is not vacuous)."""
    hf, rotary = _hf_attention(12, False, {"rope_type": "default", "rope_theta": 500.0})
    model = _model({"q_lora_rank": 12, "rope_interleave": False}, num_layers=1)
    attn = model.layers[0].attn
    attn.load_state_dict(hf.state_dict())
    x = torch.randn(1, 9, 30)
    pos = torch.arange(9)[None]
    with torch.no_grad():
        want = hf(x, position_embeddings=rotary(x, pos), attention_mask=torch.full((9, 9), -math.inf).triu(1))[0]
        got, _ = attn(x, inputs_for(1, 9, model.layer_position(0)))
    assert not torch.allclose(got, want, atol=1e-3)


# ----------------------------------------------------------------------------- the two forms
def test_absorbed_form_equals_decompressed():
    model = _model({"q_lora_rank": 12})
    absorbed = _model({"q_lora_rank": 12, "form": "absorbed"})
    absorbed.load_state_dict(model.state_dict())
    x = ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(absorbed(x, **kwargs).logits, model(x, **kwargs).logits, rtol=1e-4, atol=1e-5)


def test_auto_form_absorbs_when_decoding_and_decompresses_otherwise():
    attn = _model().layers[0].attn
    assert attn.form_for(1, 200, cached=True) == "absorbed"  # a decode step over a cache
    assert attn.form_for(12, 12, cached=True) == "decompressed"  # a prefill
    assert attn.form_for(12, 12, cached=False) == "decompressed"  # training
    cache = attn.make_cache(2, 16, torch.float32, "cpu")
    prefill = attn.prepare(LayerInputs(position_ids=torch.arange(5)[None]), cache, None)
    assert prefill.form == "decompressed" and prefill.spec == attn.spec and prefill.spec.num_kv_heads == 3
    cache.write_latent(torch.zeros(2, 1, 5, 16), prefill.write)
    step = attn.prepare(LayerInputs(position_ids=torch.full((1, 1), 5), past_length=5), cache, None)
    assert step.form == "absorbed" and step.spec.num_kv_heads == 1 and step.spec.head_dim == 10 + 6


# ----------------------------------------------------------------------------- the cache
def test_cache_holds_only_the_latent_and_the_rope_key():
    model = _model({"q_lora_rank": 12})
    attn = model.layers[0].attn
    b, t, lat, r = 2, 7, 10, 6
    cache = attn.make_cache(b, 16, torch.float32, "cpu")
    assert isinstance(cache, LatentCache)
    x = torch.randn(b, t, 30)
    with torch.no_grad():
        _, present = attn(x, inputs_for(b, t, model.layer_position(0)), cache, use_cache=True)
    assert present is cache and cache.length == t
    assert cache.k.shape == (b, 1, 16, lat + r)  # one buffer: latent and rope key, per token
    assert cache.v.numel() == 0  # no values: they are the latent
    assert cache.latent.shape == (b, 1, 16, lat) and cache.rope_key.shape == (b, 1, 16, r)
    per_token = sum(buf.numel() // buf.shape[2] for buf in (cache.k, cache.v)) // b
    assert per_token == lat + r
    with torch.no_grad():  # what it holds is the normalised latent
        latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x)[..., :lat])
    torch.testing.assert_close(cache.latent[:, 0, :t], latent)
    assert not cache.latent[:, :, t:].any()


def test_decoding_with_the_cache_equals_decoding_without_it():
    model = _model({"q_lora_rank": 12})
    prompt = ids(2, 6, seed=3)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        full = model(cached).logits  # the same logits, token by token over the cache
        out = model(cached[:, :6], use_cache=True)
        steps = [out.logits]
        for i in range(6, cached.shape[1]):
            out = model(cached[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert all(isinstance(c, LatentCache) for c in out.past_key_values)


def test_static_cache_decodes_like_the_full_forward():
    model = _model()
    x = ids(2, 9, seed=5)
    cache = model.allocate_cache(2, 16, static=True)
    assert all(isinstance(c, LatentCache) and c.static for c in cache)
    with torch.no_grad():
        full = model(x).logits
        steps = [model(x[:, :4], past_key_values=cache, use_cache=True).logits]
        for i in range(4, 9):
            steps.append(model(x[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
        cache.reset()  # reused from scratch
        again = model(x[:, :4], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(again, full[:, :4], rtol=1e-4, atol=1e-5)


def test_left_padded_row_equals_the_prompt_alone():
    model = _model({"q_lora_rank": 12})
    long, short = ids(1, 8, seed=1), ids(1, 5, seed=2)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone = model.generate(short, max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(
            model(batch, attention_mask=mask).logits[1, 3:], model(short).logits[0], atol=1e-5, rtol=1e-4
        )
    assert torch.equal(together[1, 8:], alone[0, 5:])


def test_cache_select_keeps_rows():
    model = _model()
    x = ids(3, 5)
    with torch.no_grad():
        out = model(x, use_cache=True)
        cache = out.past_key_values
        cache.select(torch.tensor([2, 0]))
        nxt = ids(2, 1, seed=9)
        got = model(nxt, past_key_values=cache, use_cache=True).logits
        want = model(torch.cat([x[[2, 0]], nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["every_layer", "attention"])
def test_gradient_checkpointing_gives_equal_grads(mode):
    plain = _model({"q_lora_rank": 12}).train()
    checkpointed = _model({"q_lora_rank": 12}, gradient_checkpointing=mode).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = ids(2, 10)
    losses = []
    for model in (plain, checkpointed):
        loss = model(x, labels=x).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_attends_through_the_kernel_chooser(monkeypatch):
    """The training step runs the chooser's path for the decompressed spec (the one cost() plans)."""
    model = _model().train()
    seen = []
    attend = mla_module.attend

    def spy(choice, spec, *args, **kwargs):
        seen.append((choice, spec))
        return attend(choice, spec, *args, **kwargs)

    monkeypatch.setattr(mla_module, "attend", spy)
    x = ids(2, 8)
    model(x, labels=x).loss.backward()
    attn = model.layers[0].attn
    facts = CallFacts("cpu", torch.float32, grad=True, training=True, mask="causal", queries=8, keys=8)
    assert [c for c, _ in seen] == [choose(attn.spec, facts)] * 2
    assert attn.planned_choice(CostCall(8, 2, device="cpu")) == seen[0][0]  # what composer-plan counts
    assert all(spec == attn.spec for _, spec in seen)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "options,key",
    [
        ({"softmax_scale": -1.0}, "softmax_scale"),
        ({"form": "squeezed"}, "form"),
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"qk_rope_head_dim": 5}, "qk_rope_head_dim"),  # rope needs an even rotary width
    ],
)
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError) as err:
        _model(options)
    assert key in str(err.value)


# ----------------------------------------------------------------------------- composer-plan
# DeepSeek-V3's published attention hyper-parameters (config.json of deepseek-ai/DeepSeek-V3)
V3 = dict(
    hidden_size=7168,
    num_hidden_layers=61,
    num_attention_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    vocab_size=129280,
    max_position_embeddings=163840,
)


def test_plan_shows_deepseek_v3_latent_cache_against_full_kv():
    g = V3
    attention = {
        "type": "mla",
        **{k: g[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
    }
    cfg = {
        "vocab_size": g["vocab_size"],
        "hidden_size": g["hidden_size"],
        "num_layers": g["num_hidden_layers"],
        "num_heads": g["num_attention_heads"],
        "max_position_embeddings": g["max_position_embeddings"],
        "attention": attention,
        "ffn": {"type": "swiglu", "intermediate_size": 18432},
        "norm": {"type": "rmsnorm"},
        "position": {"type": "rope", "theta": 10000.0},
        "head": {"type": "lm"},
    }
    report = plan(cfg, seq_len=4096, precision="bf16-mixed")
    layers, heads, bf16 = g["num_hidden_layers"], g["num_attention_heads"], 2
    latent = layers * (g["kv_lora_rank"] + g["qk_rope_head_dim"]) * bf16
    full = layers * heads * (g["qk_nope_head_dim"] + g["qk_rope_head_dim"] + g["v_head_dim"]) * bf16
    assert report.kv_cache_bytes_per_token == latent  # 70,272 B: about 70 KB per token
    assert report.kv_cache_bytes_max == latent * 4096
    assert 69_000 < latent < 71_000 and 4.9e6 < full < 5.1e6  # the "about 70 KB against about 5 MB"
    per_layer_full = full // (layers * bf16)
    kept = g["kv_lora_rank"] + g["qk_rope_head_dim"]
    note = f"{kept} values per token and layer (full per-head K and V: {per_layer_full:,})"
    assert any(note in n for n in report.notes)
    # the attention's parameters are transformers' DeepseekV3Attention's for the published config
    from transformers import DeepseekV3Config  # late: heavy, only this check needs it
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention  # late: as above

    with torch.device("meta"):
        hf = DeepseekV3Attention(DeepseekV3Config(**V3), layer_idx=0)
    attn = report.rows[0].params - 2 * g["hidden_size"] - 3 * g["hidden_size"] * 18432  # less norms and ffn
    assert attn == sum(p.numel() for p in hf.parameters())


def test_cost_cache_matches_the_cache_it_makes():
    attn = _model().layers[0].attn
    cache = attn.make_cache(1, 8, torch.bfloat16, "cpu")
    per_token = cache.k[0, :, 0].numel() * cache.k.element_size()
    assert attn.cost(CostCall(8, activation_bytes=2)).cache == per_token
    assert isinstance(attn, LatentAttention)


@pytest.mark.parametrize("q_lora", [None, 12])
def test_planned_activation_bytes_are_the_saved_ones(q_lora):
    """What cost() says the decompressed training step keeps for backward is what autograd keeps
    (float32 on the CPU's fused kernel; no rotation, whose tables are the position encoding's part)."""
    model = _model({"q_lora_rank": q_lora}, {"type": "none"}, num_layers=1, max_position_embeddings=128).train()
    attn = model.layers[0].attn
    weights = {p.untyped_storage().data_ptr() for p in attn.parameters()}
    b, t = 2, 96
    x = torch.randn(b, t, 30, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attn(x, inputs_for(b, t, None))
    planned = attn.cost(CostCall(t, b, device="cpu")).saved
    assert sum(storages.values()) / (b * t) == pytest.approx(planned, rel=0.02)
