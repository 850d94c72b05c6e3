"""The linear-time sequence mixers (every registered built-in mixer that is not softmax attention):
causality, chunked form == recurrent form, bf16, gradient checkpointing, torch.compile, padding
isolation, cache equivalence (alone and in hybrids with attention layers), fixed-size caches, costs;
and each mixer against an independent reference: transformers' own Mamba2Mixer and
Qwen3NextGatedDeltaNet / OlmoHybridGatedDeltaNet (weights copied), and for GLA a per-step recurrence
written here from the paper's equations.

Parametrised from the registry at collection time: a new mixer is covered without editing this file
(it needs ``form`` and ``chunk_size`` options, which the chunked-vs-recurrent test drives).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model_dict
from core_helpers import attention as attention_cfg
from core_helpers import ids, is_builtin

from components import kernels
from components.kernels import CallFacts, ScanSpec, choose, fla_available
from components.linear_recurrence import RecurrentCache
from composer import ComposedModel, ConfigError, compose
from composer.contract import CostCall, LayerInputs
from composer.plan import plan
from composer.registry import ATTENTION

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_time(name: str) -> bool:
    """A mixer whose decoding cache does not grow with the tokens (its cost states no per-token cache,
    a fixed state instead): softmax attention (any flavour, latent or windowed) is not one."""
    m = compose(small_model_dict(attention=attention_cfg(name), num_layers=1), device="meta")
    cost = getattr(m.layers[0].attn, "cost", None)
    return callable(cost) and cost(CostCall(seq_len=64)).cache == 0


MIXERS = [n for n in ATTENTION.names() if is_builtin("attention", n) and linear_time(n)]
# Small sizes with odd corners: grouped B/C, key heads fewer than value heads, a short convolution on GLA.
SMALL = {
    "mamba2": {"num_heads": 4, "head_dim": 8, "state_size": 6, "n_groups": 2, "conv_size": 3, "use_bias": True},
    "gated_deltanet": {"num_heads": 4, "num_key_heads": 2, "head_dim": 6, "value_head_dim": 5, "conv_size": 3},
    "gla": {"num_heads": 2, "conv_size": 3, "gate_logit_normalizer": 4.0},
}
B, V = 2, 64


def mixer_cfg(name: str, **options) -> dict:
    return {"type": name, **SMALL.get(name, {}), **options}


def model(name: str, seed: int = 0, **changes):
    attention = changes.pop("attention", mixer_cfg(name))
    return compose(small_model_dict(attention=attention, **changes), seed=seed)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter drawn at random (norm weights, biases, decays included), so no term is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)


def inputs(t: int, key_valid=None) -> LayerInputs:
    return LayerInputs(position_ids=torch.arange(t)[None], key_valid=key_valid)


def mixer_module(name: str, **options):
    m = model(name, num_layers=1, attention=mixer_cfg(name, **options))
    mix = m.layers[0].attn
    randomise(mix)
    return mix


def test_the_mixers_are_found():
    assert {"mamba2", "gated_deltanet", "gla"} <= set(MIXERS)
    assert not {"mha", "gqa", "mqa", "sliding_window", "mla"} & set(MIXERS)


# ============================================================================ forms
@pytest.mark.parametrize("name", MIXERS)
def test_causal(name):
    m = model(name)
    x = ids(B, 12)
    changed = x.clone()
    changed[:, 6:] = (x[:, 6:] + 1) % V
    a, b = m(x).logits, m(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:]), "changing tokens changed nothing: the test is vacuous"


@pytest.mark.parametrize("length", [7, 13])
@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("name", MIXERS)
def test_chunked_form_equals_recurrent_form(name, chunk, length):
    fields = {f.name for f in dataclasses.fields(ATTENTION.get(name).config)}
    assert {"form", "chunk_size"} <= fields, f"{name}: a mixer needs form and chunk_size options"
    chunked = mixer_module(name, form="chunk", chunk_size=chunk)
    stepped = mixer_module(name, form="recurrent", chunk_size=chunk)
    x = torch.randn(B, length, 32, generator=torch.Generator().manual_seed(1))
    caches = [m.make_cache(B, 64, torch.float32, "cpu") for m in (chunked, stepped)]
    y1, _ = chunked(x, inputs(length), caches[0])
    y2, _ = stepped(x, inputs(length), caches[1])
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].state, caches[1].state, rtol=1e-5, atol=1e-5)
    assert y1.abs().max() > 0.1, "outputs near zero: the comparison is vacuous"


@pytest.mark.parametrize("name", MIXERS)
def test_bf16_is_kept(name):
    mix = mixer_module(name).to(torch.bfloat16)
    x = torch.randn(B, 9, 32).to(torch.bfloat16)
    cache = mix.make_cache(B, 16, torch.bfloat16, "cpu")
    y, _ = mix(x, inputs(9), cache)
    step, _ = mix(x[:, :1], inputs(1), cache)
    assert y.dtype == step.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert cache.state.dtype == torch.float32, "the recurrent state stays float32"
    ref, _ = mixer_module(name)(x.float(), inputs(9))
    torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("name", MIXERS)
def test_gradients_equal_with_and_without_checkpointing(name):
    ref = model(name, num_layers=3, position={"type": "rope"}).train()
    ckpt = model(name, num_layers=3, position={"type": "rope"}, gradient_checkpointing="every_layer").train()
    x = ids(B, 10)
    a, b = ref(x, labels=x), ckpt(x, labels=x)
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    grads = dict(ref.named_parameters())
    for n, p in ckpt.named_parameters():
        assert p.grad is not None, f"{n} receives no gradient"
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", MIXERS)
def test_chunked_forward_compiles_without_graph_breaks(name):
    """Dynamo captures the chunked forward whole (fullgraph); the eager backend keeps it quick (graph
    capture is the property under test; Inductor's code generation would add ~40 s on this CPU)."""
    torch._dynamo.reset()
    mix = mixer_module(name, form="chunk", chunk_size=4)
    x = torch.randn(B, 10, 32)
    explanation = torch._dynamo.explain(mix)(x, inputs(10))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(mix, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, inputs(10))[0], mix(x, inputs(10))[0], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ============================================================================ padding and caches
@pytest.mark.parametrize("name", MIXERS)
def test_left_padding_does_not_leak_into_the_state(name):
    """A left-padded row gives exactly what its prompt alone gives, whatever the pad tokens are."""
    m = model(name).eval()
    randomise(m.layers[0].attn)
    prompt = ids(1, 6, seed=3)
    for pad_ids in (torch.zeros(1, 4, dtype=torch.long), ids(1, 4, seed=9)):
        padded = torch.cat([pad_ids, prompt], dim=1)
        mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
        with torch.no_grad():
            alone, left = m(prompt).logits, m(padded, attention_mask=mask).logits
        torch.testing.assert_close(left[:, 4:], alone, rtol=1e-5, atol=1e-5)
    batch = torch.cat([padded, ids(1, 10, seed=4)])
    mask = torch.cat([mask, torch.ones(1, 10, dtype=torch.long)])
    out = m.generate(batch, 6, attention_mask=mask)
    torch.testing.assert_close(out[0, 4:], m.generate(prompt, 6)[0])
    torch.testing.assert_close(out[1], m.generate(batch[1:], 6)[0])


def hybrid(name: str, **changes) -> dict:
    """Mixer layers on 1::2 of four, grouped-query attention elsewhere, rope positions."""
    base = dict(
        num_layers=4,
        attention={"type": "gqa", "num_kv_heads": 2},
        position={"type": "rope"},
        layers=[{"select": "1::2", "attention": mixer_cfg(name)}],
        init_std=0.35,
    )
    return small_model_dict(**{**base, **changes})


@pytest.mark.parametrize("kind", ["alone", "hybrid"])
@pytest.mark.parametrize("name", MIXERS)
def test_greedy_decoding_with_cache_equals_without(name, kind):
    cfg = hybrid(name) if kind == "hybrid" else small_model_dict(attention=mixer_cfg(name), init_std=0.35)
    m = compose(cfg, seed=0).eval()
    if kind == "hybrid":
        assert [type(layer.attn).__name__ == "SelfAttention" for layer in m.layers] == [True, False, True, False]
    x = ids(B, 7, seed=5)
    mask = torch.ones(B, 7, dtype=torch.long)
    mask[0, :2] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        cached = m.generate(x, 10, **kwargs)
        assert torch.equal(cached, m.generate(x, 10, use_cache=False, **kwargs))
        assert len(set(cached[:, 7:].flatten().tolist())) > 1, "one token repeated: the test is vacuous"


@pytest.mark.parametrize("name", MIXERS)
def test_prefill_then_uneven_chunks_equal_the_full_forward(name):
    m = compose(hybrid(name), seed=0).eval()
    x = ids(B, 12)
    with torch.no_grad():
        full = m(x).logits
        cache = m.allocate_cache(B, 12)
        parts = [m(x[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in [(0, 5), (5, 6), (6, 12)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 12 and all(c.length == 12 for c in cache)


@pytest.mark.parametrize("name", MIXERS)
def test_cache_is_fixed_size_and_selects_and_resets(name):
    mix = mixer_module(name)
    small, large = (mix.make_cache(3, n, torch.float32, "cpu") for n in (8, 4096))
    assert isinstance(small, RecurrentCache) and small.state.shape == large.state.shape
    x = torch.randn(3, 5, 32)
    mix(x, inputs(5), small)
    assert small.length == 5 and small.state.abs().sum() > 0
    kept = small.state[[2, 0]].clone()
    small.select(torch.tensor([2, 0]))
    assert small.batch_size == 2 and torch.equal(small.state, kept)
    # the selected rows continue as those rows of the full batch do
    full = mix.make_cache(3, 8, torch.float32, "cpu")
    mix(x, inputs(5), full)
    nxt = torch.randn(3, 1, 32)
    y_full, _ = mix(nxt, inputs(1), full)
    y_sel, _ = mix(nxt[[2, 0]], inputs(1), small)
    torch.testing.assert_close(y_sel, y_full[[2, 0]], rtol=1e-5, atol=1e-6)
    small.reset()
    assert small.length == 0 and small.state.abs().sum() == 0
    assert small.conv is None or small.conv.abs().sum() == 0


@pytest.mark.parametrize("name", MIXERS)
def test_static_cache_is_written_in_place(name):
    m = compose(hybrid(name), seed=0).eval()
    cache = m.allocate_cache(B, 16, static=True)
    mixer_cache = cache[1]
    state = mixer_cache.state
    x = ids(B, 9)
    with torch.no_grad():
        full = m(x).logits
        steps = [m(x[:, :4], past_key_values=cache, use_cache=True).logits]
        steps += [m(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(4, 9)]
    assert mixer_cache.state is state, "a static cache keeps its buffers"
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MIXERS)
def test_save_and_load_a_hybrid(name, tmp_path):
    m = compose(hybrid(name), seed=0).eval()
    randomise(m.layers[1].attn, seed=2)
    m.save_pretrained(tmp_path / "ckpt")
    loaded = ComposedModel.from_pretrained(tmp_path / "ckpt").eval()
    x = ids(B, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, m(x).logits, rtol=0, atol=0)
    assert loaded.config.layer(1).attention.type == name


@pytest.mark.slow
def test_compiled_static_decoding_of_a_hybrid_equals_eager():
    """generate(compile=True) traces one decode step over attention and mixer caches (Inductor: ~90 s)."""
    torch._dynamo.reset()
    layers = [{"select": [0], "attention": mixer_cfg("mamba2")}, {"select": [1], "attention": mixer_cfg("gla")}]
    cfg = hybrid("mamba2", num_layers=3, layers=layers)
    m = compose(cfg, seed=0).eval()
    x = ids(B, 7)
    mask = torch.ones(B, 7, dtype=torch.long)
    mask[0, :3] = 0
    assert torch.equal(m.generate(x, 6, attention_mask=mask, compile=True), m.generate(x, 6, attention_mask=mask))
    torch._dynamo.reset()


# ============================================================================ costs and validation
@pytest.mark.parametrize("name", MIXERS)
def test_cost_is_linear_in_length_with_a_constant_state(name):
    mix = mixer_module(name)
    short, long = mix.cost(CostCall(seq_len=1024)), mix.cost(CostCall(seq_len=4096))
    assert short.flops == long.flops > 0, "FLOPs per token do not grow with T"
    assert short.saved == long.saved > 0
    assert short.cache == 0 and short.state == long.state > 0
    assert short.params == sum(p.numel() for p in mix.parameters())
    cache = mix.make_cache(1, 4096, torch.float32, "cpu")
    held = cache.state.numel() * 4 + (cache.conv.numel() * 4 if cache.conv is not None else 0)
    assert short.state == held, "the planned state is the cache's bytes"


@pytest.mark.parametrize("name", MIXERS)
def test_plan_of_a_hybrid(name):
    cfg = hybrid(name, max_position_embeddings=4096)
    short, long = plan(cfg, seq_len=1024), plan(cfg, seq_len=4096)
    attention_only = plan(
        small_model_dict(num_layers=2, attention={"type": "gqa", "num_kv_heads": 2}, max_position_embeddings=4096),
        seq_len=1024,
    )
    assert short.not_planned == [] and short.params_total == compose(cfg, device="meta").num_parameters()
    assert short.kv_cache_bytes_per_token == attention_only.kv_cache_bytes_per_token  # mixers add no per-token cache
    state = short.kv_cache_bytes_max - short.kv_cache_bytes_per_token * 1024
    assert state > 0 and long.kv_cache_bytes_max - long.kv_cache_bytes_per_token * 4096 == state
    assert [r.attention.split("(")[0] for r in short.rows] == ["gqa", name, "gqa", name]


def test_saved_activations_are_close_to_what_autograd_keeps():
    """Each mixer's planned bytes saved for backward within 15% of what autograd keeps (float32, CPU)."""
    t = 128
    base = small_model_dict(num_layers=1, attention={"type": "gqa", "num_kv_heads": 2}, max_position_embeddings=t)
    for name in MIXERS:
        cfg = {**base, "attention": {"type": name}}
        measured = saved_activation_bytes(cfg, 2, t) - saved_activation_bytes(base, 2, t)
        planned = (
            plan(cfg, batch_size=2, seq_len=t, precision="32-true", device="cpu").memory.activations
            - plan(base, batch_size=2, seq_len=t, precision="32-true", device="cpu").memory.activations
        )
        assert planned == pytest.approx(measured, rel=0.15), name


def saved_activation_bytes(config: dict, batch: int, seq_len: int) -> int:
    """Bytes of the distinct storages autograd saves for one training forward (as tests/test_plan.py)."""
    m = compose(config, seed=0).train()
    x = ids(batch, seq_len, vocab=m.config.vocab_size)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x, labels=x)
    return sum(storages.values())


@pytest.mark.parametrize(
    "attention,key",
    [
        ({"type": "mamba2", "num_heads": 3, "n_groups": 2}, "n_groups"),
        ({"type": "mamba2", "expand": 1.5, "head_dim": 7}, "expand"),
        ({"type": "gated_deltanet", "num_heads": 4, "num_key_heads": 3}, "num_key_heads"),
        ({"type": "gla", "expand_k": 0.3}, "expand_k"),
        ({"type": "gla", "feature_map": "tanh"}, "feature_map"),
        ({"type": "mamba2", "form": "scan"}, "form"),
    ],
)
def test_bad_options_are_named(attention, key):
    with pytest.raises(ConfigError, match=rf"attention\.{key}"):
        compose(small_model_dict(attention=attention), device="meta")


def test_kernel_choice_goes_through_the_attention_chooser(monkeypatch):
    """The mixers ask components.kernels.choose, as attention does: form by the call's length, fla only on
    CUDA with the package and outside torch.compile, and every refusal named."""

    def pick(kernel="auto", form="auto", **facts):
        return choose(ScanSpec(kernel, form), CallFacts(**{"queries": 7, "keys": 7, **facts}))

    assert pick(queries=1, keys=1).form == "recurrent" and pick().form == "chunk"
    cpu = pick(form="chunk")
    assert (cpu.kernel, cpu.path) == ("torch", "torch_chunk") and "CUDA" in cpu.fallback
    assert pick("torch", device="cuda").kernel == "torch" and pick("torch", device="cuda").fallback == ""
    monkeypatch.setattr(kernels, "fla_available", lambda: False)
    assert "not installed" in pick(device="cuda").fallback
    monkeypatch.setattr(kernels, "fla_available", lambda: True)
    assert pick(device="cuda", queries=1).path == "fla_recurrent" and pick("fla", device="cuda").path == "fla_chunk"
    assert "torch.compile" in pick(device="cuda", compiling=True).fallback
    m = compose(small_model_dict(attention={"type": "gla"}), seed=0)
    x = torch.randn(2, 5, m.config.hidden_size)
    assert m.layers[0].attn.choice(x) == choose(ScanSpec(), CallFacts(grad=True, training=True, queries=5, keys=5))


@pytest.mark.skipif(fla_available(), reason="flash-linear-attention is installed here")
@pytest.mark.parametrize("name", MIXERS)
def test_asking_for_fla_without_it_names_the_extra(name):
    with pytest.raises(ConfigError, match=r"attention\.kernel: fla needs flash-linear-attention.*\[fla\]"):
        compose(small_model_dict(attention={"type": name, "kernel": "fla"}), device="meta")
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    assert re.search(r'^fla = \["flash-linear-attention>=[\d.]+"\]$', pyproject, re.M)


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("name", MIXERS)
def test_fla_kernels_equal_the_pytorch_form(name):
    torch_form = mixer_module(name, kernel="torch").cuda()
    fla_form = mixer_module(name, kernel="fla").cuda()
    x = torch.randn(B, 70, 32, device="cuda")
    for t in (70, 1):
        c1, c2 = (m.make_cache(B, 80, torch.float32, "cuda") for m in (torch_form, fla_form))
        step = LayerInputs(position_ids=torch.arange(t, device="cuda")[None])
        y1, _ = torch_form(x[:, :t], step, c1)
        y2, _ = fla_form(x[:, :t], step, c2)
        torch.testing.assert_close(y2, y1, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(c2.state, c1.state, rtol=2e-3, atol=2e-3)


# ============================================================================ references
def test_mamba2_equals_transformers_mamba2_mixer():
    """Same state dict (names and shapes 1:1), same outputs: both forms, chunk not dividing T."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    hf = Mamba2Config(
        hidden_size=24,
        num_heads=6,
        head_dim=8,
        state_size=5,
        n_groups=3,
        conv_kernel=3,
        expand=2,
        chunk_size=4,
        use_bias=True,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        num_hidden_layers=1,
    )
    torch.manual_seed(0)
    ref = Mamba2Mixer(hf, 0).float().eval()
    randomise(ref, seed=1)
    options = {"num_heads": 6, "head_dim": 8, "state_size": 5, "n_groups": 3, "conv_size": 3, "use_bias": True}
    for form, chunk in (("chunk", 4), ("chunk", 5), ("recurrent", 4)):
        m = compose(
            small_model_dict(
                hidden_size=24,
                num_layers=1,
                attention={"type": "mamba2", **options, "chunk_size": chunk, "form": form},
            ),
            seed=0,
        )
        mix = m.layers[0].attn
        mix.load_state_dict(ref.state_dict())  # strict: the same names and shapes
        x = torch.randn(2, 11, 24, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = ref(x)
            got, _ = mix(x, inputs(11))
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def qwen3_next_to_composer(sd: dict, hk: int, h: int, dk: int, dv: int, c: int) -> dict:
    """Qwen3NextGatedDeltaNet's state dict in gated_deltanet's layout: in_proj_qkvz (rows per key head:
    q, k, then v and z of its value heads) and in_proj_ba (b, a per key head) regrouped into in_proj."""
    r = h // hk
    q, k, v, z = sd["in_proj_qkvz.weight"].view(hk, 2 * dk + 2 * r * dv, c).split([dk, dk, r * dv, r * dv], dim=1)
    b, a = sd["in_proj_ba.weight"].view(hk, 2 * r, c).split([r, r], dim=1)
    out = {k2: sd[k2] for k2 in ("conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight")}
    return {"in_proj.weight": torch.cat([t.reshape(-1, c) for t in (q, k, v, z, b, a)]), **out}


def test_gated_deltanet_equals_transformers_qwen3_next():
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    c, hk, h, dk, dv = 24, 2, 6, 5, 7
    hf = Qwen3NextConfig(
        hidden_size=c,
        linear_num_key_heads=hk,
        linear_num_value_heads=h,
        linear_key_head_dim=dk,
        linear_value_head_dim=dv,
        linear_conv_kernel_dim=3,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    ref = Qwen3NextGatedDeltaNet(hf, 0).float().eval()
    randomise(ref, seed=1)
    options = {"num_heads": h, "num_key_heads": hk, "head_dim": dk, "value_head_dim": dv, "conv_size": 3}
    for form, chunk in (("chunk", 4), ("chunk", 64), ("recurrent", 4)):
        m = compose(
            small_model_dict(
                hidden_size=c,
                num_layers=1,
                attention={"type": "gated_deltanet", **options, "chunk_size": chunk, "form": form},
            ),
            seed=0,
        )
        mix = m.layers[0].attn
        mix.load_state_dict(qwen3_next_to_composer(ref.state_dict(), hk, h, dk, dv, c))
        x = torch.randn(2, 11, c, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = ref(x)
            got, _ = mix(x, inputs(11))
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gated_deltanet_equals_transformers_olmo_hybrid():
    """OLMo-Hybrid's separate projections stack into in_proj; beta in (0, 2) (allow_neg_eigval)."""
    from transformers import OlmoHybridConfig
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridGatedDeltaNet

    c, h, dk, dv = 24, 3, 6, 5
    hf = OlmoHybridConfig(
        hidden_size=c,
        linear_num_key_heads=h,
        linear_num_value_heads=h,
        linear_key_head_dim=dk,
        linear_value_head_dim=dv,
        linear_conv_kernel_dim=4,
        linear_allow_neg_eigval=True,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
    )
    torch.manual_seed(0)
    ref = OlmoHybridGatedDeltaNet(hf, 0).float().eval()
    randomise(ref, seed=1)
    sd = ref.state_dict()
    mine = {
        "in_proj.weight": torch.cat([sd[f"{p}_proj.weight"] for p in ("q", "k", "v", "g", "b", "a")]),
        "conv1d.weight": sd["conv1d.weight"],
        "dt_bias": sd["dt_bias"],
        "A_log": sd["A_log"],
        "norm.weight": sd["o_norm.weight"],
        "out_proj.weight": sd["o_proj.weight"],
    }
    options = {"num_heads": h, "head_dim": dk, "value_head_dim": dv, "allow_neg_eigval": True, "norm_eps": 1e-5}
    m = compose(
        small_model_dict(hidden_size=c, num_layers=1, attention={"type": "gated_deltanet", **options, "chunk_size": 4}),
        seed=0,
    )
    mix = m.layers[0].attn
    mix.load_state_dict(mine)
    x = torch.randn(2, 9, c, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(x)
        got, _ = mix(x, inputs(9))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def naive_gla(mix, x: torch.Tensor) -> torch.Tensor:
    """Gated linear attention from Yang et al. 2023 (eqs. for GLA with a low-rank gate), one step at a
    time in float64: S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(d_k),
    alpha_t = sigmoid(x W1 W2 + b)^(1/tau); out = W_o (RMSNorm(o) * swish(x W_g)). No short convolution."""
    x = x.double()
    h, dk, dv = mix.num_heads, mix.head_dim, mix.value_head_dim
    b, t, _ = x.shape

    def lin(layer, inp):
        out = inp @ layer.weight.double().T
        return out + layer.bias.double() if layer.bias is not None else out

    q = lin(mix.q_proj, x).view(b, t, h, dk)
    k = lin(mix.k_proj, x).view(b, t, h, dk)
    v = lin(mix.v_proj, x).view(b, t, h, dv)
    alpha = torch.sigmoid(lin(mix.gk_up, lin(mix.gk_down, x))).pow(1.0 / mix.normalizer).view(b, t, h, dk)
    s = torch.zeros(b, h, dk, dv, dtype=torch.float64)
    outs = []
    for i in range(t):
        s = alpha[:, i, :, :, None] * s + k[:, i, :, :, None] * v[:, i, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i], s) / dk**0.5)
    o = torch.stack(outs, 1)  # [B, T, H, Dv]
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + mix.norm.eps) * mix.norm.weight.double()
    o = o * F.silu(lin(mix.g_proj, x).view(b, t, h, dv))
    return lin(mix.o_proj, o.reshape(b, t, h * dv))


@pytest.mark.parametrize("form,chunk", [("chunk", 4), ("chunk", 16), ("recurrent", 4)])
def test_gla_equals_the_papers_recurrence(form, chunk):
    mix = mixer_module("gla", conv_size=0, form=form, chunk_size=chunk)
    x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, _ = mix(x, inputs(13))
    expected = naive_gla(mix, x).float()
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gla_feature_map_and_no_output_gate():
    mix = mixer_module("gla", feature_map="elu_plus_one", use_output_gate=False)
    assert mix.g_proj is None
    x = torch.randn(1, 6, 32)
    y, _ = mix(x, inputs(6))
    plain = mixer_module("gla", use_output_gate=False)
    assert torch.isfinite(y).all() and not torch.allclose(y, plain(x, inputs(6))[0])
