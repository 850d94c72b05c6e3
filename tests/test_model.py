"""The composed model: input checks, outputs, KV cache, padding, initialisation, meta / dtype,
ModelBuilder and gradient checkpointing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import small_model_dict
from core_helpers import attention, component, ids
from torch import nn

from components.kv_cache import Cache, KVCache
from composer import ComposedModel, ConfigError, ModelBuilder, ModelConfig, ModelError, ModelOutput, compose
from composer.registry import ATTENTION, POSITION

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, T, V = 2, 12, 64
ATTENTIONS = ATTENTION.names()
POSITIONS = POSITION.names()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def model() -> ComposedModel:
    return compose(small_model_dict(), seed=0).eval()


# ============================================================================ input checks
@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.zeros(5, dtype=torch.long), r"2-D \[batch, seq_len\].*unsqueeze\(0\)"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"2-D"),
        (torch.zeros(1, 4), r"integer tensor, got torch.float32.*\.long\(\)"),
        (torch.zeros(1, 4, dtype=torch.bool), r"integer tensor"),
        (torch.tensor([[1, -1, 2]]), r"token id -1 is outside the vocabulary \[0, 64\)"),
        (torch.tensor([[1, 64, 2]]), r"token id 64 is outside the vocabulary \[0, 64\).*vocab_size"),
        (torch.zeros(1, 65, dtype=torch.long), r"sequence length 65 .*exceeds max_position_embeddings=64"),
        (torch.zeros(1, 0, dtype=torch.long), r"empty"),
        ([[1, 2, 3]], r"torch.Tensor"),
    ],
)
def test_bad_input_ids_raise_model_error(model, bad, match):
    with pytest.raises(ModelError, match=match):
        model(bad)


@pytest.mark.parametrize(
    "device, match",
    [
        ("gpu0", r"device: 'gpu0' is not a device\. Fix: use cpu, cuda or cuda:<index>"),
        ("cuda:99", r"device: 'cuda:99': this (torch .* sees no CUDA device|machine has \d+ CUDA device)"),
    ],
)
def test_a_device_this_process_cannot_use_is_named_before_anything_is_built(device, match):
    with pytest.raises(ConfigError, match=match):
        compose(small_model_dict(), device=device)


def test_bad_attention_mask_raises_model_error(model):
    x = ids(B, 5)
    with pytest.raises(ModelError, match=r"attention_mask must have shape \(2, 5\)"):
        model(x, attention_mask=torch.ones(B, 4))
    with pytest.raises(ModelError, match=r"attention_mask must have shape"):
        model(x, attention_mask=torch.ones(5))
    with pytest.raises(ModelError, match=r"attention_mask"):
        model(x, attention_mask=[[1] * 5] * 2)


def test_length_check_counts_the_cache(model):
    out = model(ids(1, 60), use_cache=True)
    cache = out.past_key_values
    assert cache.length == 60
    model(ids(1, 4), past_key_values=cache)  # 64: fits
    with pytest.raises(ModelError, match=r"sequence length 65 \(past 64 \+ new 1\) exceeds max_position_embeddings"):
        model(ids(1, 1), past_key_values=cache)
    # with a cache the mask covers past + new tokens
    cache = model(ids(1, 3), use_cache=True).past_key_values
    with pytest.raises(ModelError, match=r"shape \(1, 5\) \[batch, past \+ seq_len\]"):
        model(ids(1, 2), attention_mask=torch.ones(1, 2), past_key_values=cache)


# ============================================================================ outputs
def test_outputs_present_only_when_asked(model):
    x = ids(B, T)
    out = model(x)
    assert isinstance(out, ModelOutput) and out.logits.shape == (B, T, V)
    assert out.loss is None and out.aux_loss is None and out.past_key_values is None
    out = model(x, labels=x)
    assert out.loss is not None and out.loss.dim() == 0 and out.aux_loss is None
    out = model(x, use_cache=True)
    assert isinstance(out.past_key_values, Cache) and len(out.past_key_values) == 2
    assert all(isinstance(c, KVCache) for c in out.past_key_values) and out.past_key_values.length == T
    moe = compose(small_model_dict(ffn=component("moe")), seed=0)
    out = moe(x)
    assert out.aux_loss is not None and out.aux_loss > 0 and out.loss is None


def test_model_config_and_parameter_counts(model):
    assert isinstance(model.config, ModelConfig) and model.config.layer(1).attention.type == "mha"
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == total - V * 32 - 64 * 32  # token + learned positions
    model.layers[0].attn.qkv.weight.requires_grad_(False)
    try:
        assert model.num_parameters(trainable_only=True) == total - 32 * 96
    finally:
        model.layers[0].attn.qkv.weight.requires_grad_(True)


# ============================================================================ KV cache
def _decode_model(attention_type: str, position: str, window: int = 4) -> ComposedModel:
    cfg = small_model_dict(attention=attention(attention_type, window=window), position=component(position))
    return compose(cfg, seed=0).eval()


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attention_type", ATTENTIONS)
def test_incremental_decoding_matches_full_forward(attention_type, position):
    model = _decode_model(attention_type, position)
    x = ids(B, T)
    with torch.no_grad():
        full = model(x).logits
        # prefill 5 tokens, then one at a time
        out = model(x[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, T):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
        # chunks of uneven length into a pre-allocated cache
        cache = model.allocate_cache(B, T)
        chunks = [
            model(x[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in [(0, 3), (3, 4), (4, 9), (9, 12)]
        ]
        torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-5)


def _has_options(name: str, *options: str) -> bool:
    return set(options) <= {f.name for f in dataclasses.fields(ATTENTION.get(name).config)}


# the mixers that have these softmax-attention options (linear-time mixers have none of them)
@pytest.mark.parametrize(
    "attention_type", [n for n in ATTENTIONS if _has_options(n, "logit_softcap", "qk_norm", "bias")]
)
def test_incremental_decoding_with_attention_options(attention_type):
    """The explicit-softmax path (logit soft-cap), qk-norm and biases decode like a full forward."""
    options = {"logit_softcap": 5.0, "qk_norm": True, "bias": True}
    model = compose(
        small_model_dict(attention=attention(attention_type, window=3, **options), position={"type": "rope"}), seed=0
    ).eval()
    x = ids(B, T)
    with torch.no_grad():
        full = model(x).logits
        cache = model.allocate_cache(B, T)
        steps = [model(x[:, :4], past_key_values=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(4, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefill", [2, 6])
def test_sliding_window_cache_rolls_with_w_slots(prefill):
    model = _decode_model("sliding_window", "rope", window=4)
    x = ids(B, 20)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :prefill], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(prefill, 20):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 20
    for layer_cache in cache:
        assert layer_cache.rolling and layer_cache.size == 4, "a sliding-window cache keeps only W slots"
        assert layer_cache.k.shape == (B, 4, 4, 8)
        assert sorted(layer_cache.slot_pos.tolist()) == [16, 17, 18, 19]
    # an explicitly allocated long cache is rolling from the start; a full-attention one is not
    assert all(c.size == 4 and c.rolling for c in model.allocate_cache(B, 100))
    full_model = _decode_model("mha", "rope")
    assert all(c.size == 100 and not c.rolling for c in full_model.allocate_cache(B, 100))


def test_mixed_window_layers_decode():
    cfg = small_model_dict(
        num_layers=3,
        position={"type": "rope"},
        layers=[{"select": "1::2", "attention": {"type": "sliding_window", "window": 3}}],
    )
    model = compose(cfg, seed=0).eval()
    x = ids(B, T)
    with torch.no_grad():
        full = model(x).logits
        cache = model.allocate_cache(B, T)
        steps = [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert [c.rolling for c in cache] == [False, True, False]


# ============================================================================ padding
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attention_type", ["mha", "sliding_window"])
def test_left_padded_batch_equals_rows_alone(attention_type, position):
    model = _decode_model(attention_type, position)
    a, b = ids(1, 9, seed=1), ids(1, 5, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(out[0], model(a).logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[1, 4:], model(b).logits[0], rtol=1e-4, atol=1e-5)
        # and decoding on after the padded prompt keeps each row equal to its own decoding
        cache = model(batch, attention_mask=mask, use_cache=True).past_key_values
        nxt = ids(B, 3, seed=3)
        steps = []
        for t in range(3):
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
            steps.append(model(nxt[:, t : t + 1], attention_mask=mask, past_key_values=cache, use_cache=True).logits)
        steps = torch.cat(steps, 1)
        torch.testing.assert_close(steps[0], model(torch.cat([a, nxt[:1]], 1)).logits[0, -3:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(steps[1], model(torch.cat([b, nxt[1:]], 1)).logits[0, -3:], rtol=1e-4, atol=1e-5)


# ============================================================================ initialisation
def test_init_is_deterministic_per_seed():
    cfg = small_model_dict(position={"type": "rope"}, ffn={"type": "swiglu", "multiple_of": 16})
    a, b, c = compose(cfg, seed=3), compose(cfg, seed=3), compose(cfg, seed=4)
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
        if p.dim() == 2:
            assert not torch.equal(p, r), f"{name}: different seeds gave the same weights"
    a.init_weights(seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_init_statistics():
    layers, width, std = 8, 256, 0.02
    cfg = small_model_dict(
        hidden_size=width,
        num_layers=layers,
        num_heads=4,
        init_std=std,
        vocab_size=512,
        attention={"type": "mha", "bias": True},
        ffn={"type": "mlp", "intermediate_size": 256},
    )
    model = compose(cfg, seed=0)
    resid = std / math.sqrt(2 * layers)
    state = model.state_dict()
    for i in (0, layers - 1):
        for name, want in [
            (f"layers.{i}.attn.out.weight", resid),
            (f"layers.{i}.ffn.down.weight", resid),
            (f"layers.{i}.attn.qkv.weight", std),
            (f"layers.{i}.ffn.up.weight", std),
        ]:
            w = state[name]
            assert w.mean().abs() < 0.05 * want, name
            assert w.std().item() == pytest.approx(want, rel=0.03), name
        for name in ("attn.qkv.bias", "attn.out.bias", "ffn.up.bias", "ffn.down.bias", "attn_norm.bias"):
            assert torch.count_nonzero(state[f"layers.{i}.{name}"]) == 0, name
        for name in ("attn_norm.weight", "ffn_norm.weight"):
            assert torch.equal(state[f"layers.{i}.{name}"], torch.ones(width)), name
    assert state["embed.weight"].std().item() == pytest.approx(std, rel=0.03)
    assert state["position.weight"].std().item() == pytest.approx(std, rel=0.03)
    assert torch.equal(state["final_norm.weight"], torch.ones(width))


def test_init_of_rmsnorm_and_qk_norm_is_one():
    model = compose(small_model_dict(norm={"type": "rmsnorm"}, attention={"type": "mha", "qk_norm": True}), seed=0)
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    assert len(norms) == 2 * 4 + 1
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms.values())


# ============================================================================ meta and dtype
def test_compose_on_meta_allocates_nothing():
    cfg = small_model_dict(
        hidden_size=4096,
        num_heads=32,
        num_layers=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        position={"type": "rope"},
    )
    model = compose(cfg, device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert model.num_parameters() > 800_000_000
    with pytest.raises(ConfigError):  # validation runs before anything is built
        compose(small_model_dict(num_heads=5), device="meta")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_is_honoured(dtype):
    model = compose(small_model_dict(position={"type": "rope"}), dtype=dtype, seed=0)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model(ids(B, T)).logits.dtype == dtype
    assert model.layers[0].attn.qkv.weight.float().std().item() == pytest.approx(0.02, rel=0.1)


# ============================================================================ ModelBuilder
class ScaleBlock(nn.Module):
    """A hand-made block: multiplies the residual stream by a learned scalar."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn  # for allocate_cache
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls = 0

    def forward(self, hidden, inputs, past_key_value=None, use_cache=False):
        self.calls += 1
        return hidden * self.scale, past_key_value, None


class MeanHead(nn.Module):
    """A hand-made head: logits are the mean hidden state, repeated per class."""

    def forward(self, hidden, attention_mask=None):
        return hidden.mean(1)[:, :2]

    def loss(self, logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels)


def test_builder_with_layer_module_and_head_module():
    donor = compose(small_model_dict(num_layers=1), seed=0)
    block = ScaleBlock(donor.layers[0].attn)
    model = ModelBuilder(small_model_dict(num_layers=3)).with_layer(-1, block).with_head(MeanHead()).build(seed=0)
    assert model.layers[2] is block and any(p is block.scale for p in model.parameters())
    assert block.scale.item() == 2.0, "hand-made modules keep their own weights"
    out = model(ids(B, T), labels=torch.tensor([0, 1]))
    assert block.calls == 1 and out.logits.shape == (B, 2) and torch.isfinite(out.loss)


def test_builder_with_layer_mapping_and_head_config():
    cfg = small_model_dict(num_layers=3)
    model = (
        ModelBuilder(cfg)
        .with_layer(1, {"attention": {"type": "mqa"}, "ffn": {"type": "swiglu"}})
        .with_head({"type": "classification", "num_classes": 5})
        .build(seed=0)
    )
    assert [layer.attn.num_kv_heads for layer in model.layers] == [4, 1, 4]
    assert model.config.layer(1).ffn.type == "swiglu" and model.config.layer(0).ffn.type == "mlp"
    assert model(ids(B, T)).logits.shape == (B, 5)
    meta = ModelBuilder(cfg).with_layer(0, {"attention": "gqa"}).build(device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in meta.parameters())


def test_builder_rejects_bad_parts():
    builder = ModelBuilder(small_model_dict())
    with pytest.raises(ConfigError, match=r"with_layer\(5\).*does not exist"):
        builder.with_layer(5, {"attention": "mqa"})
    with pytest.raises(ConfigError, match=r"block interface.*forward\(\)' lacks parameter"):
        builder.with_layer(0, nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"expected an nn.Module or a mapping"):
        builder.with_layer(0, "pre_norm!")
    with pytest.raises(ConfigError, match=r"head interface.*'loss\(\)'"):
        builder.with_head(nn.Identity())
    with pytest.raises(ConfigError, match=r"num_kv_heads"):
        builder.with_layer(0, {"attention": {"type": "gqa", "num_kv_heads": 3}}).build()


# ============================================================================ checkpointing switch
def test_set_gradient_checkpointing():
    model = compose(small_model_dict(num_layers=4), seed=0).train()
    x = ids(B, T)
    model(x, labels=x).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    for mode, layer_modes in [
        ("attention", ["attention"] * 4),
        ("ffn", ["ffn"] * 4),
        ("every_2", ["none"] * 4),
        ("none", ["none"] * 4),
    ]:
        model.set_gradient_checkpointing(mode)
        assert model.config.gradient_checkpointing == mode
        assert [layer.checkpoint for layer in model.layers] == layer_modes
        model.zero_grad()
        model(x, labels=x).loss.backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)
    model.set_gradient_checkpointing("every_2")
    assert [model.config.checkpointed(i) for i in range(4)] == ["layer", "none", "layer", "none"]
    with pytest.raises(ConfigError, match=r"gradient_checkpointing.*every_<k>"):
        model.set_gradient_checkpointing("sometimes")
    assert model.config.gradient_checkpointing == "every_2", "a refused mode leaves the model as it was"


def test_shared_per_forward_work_is_done_once_and_handed_to_layers_immutable(monkeypatch):
    """Rotary tables once per position encoding, the attention's kernel choice, mask and cache slots
    once per kind of attention, per forward; each layer receives them in an immutable LayerInputs (so a
    recomputed, checkpointed region cannot write into state outside it)."""
    import dataclasses

    from components.attention import SelfAttention
    from components.position import Rope
    from composer.contract import LayerInputs

    raw = small_model_dict(
        num_layers=4,
        position={"type": "rope"},
        layers=[{"select": [1, 3], "attention": {"type": "sliding_window", "window": 4}}],
    )
    model = compose(raw, seed=0)
    rotations, prepares, seen = [], [], []
    rotation, prepare = Rope.rotation, SelfAttention.prepare
    monkeypatch.setattr(Rope, "rotation", lambda self, *a: rotations.append(1) or rotation(self, *a))
    monkeypatch.setattr(
        SelfAttention, "prepare", lambda self, *a, **k: prepares.append(self.window) or prepare(self, *a, **k)
    )
    forward = SelfAttention.forward
    monkeypatch.setattr(
        SelfAttention, "forward", lambda self, h, inputs, *a: seen.append(inputs) or forward(self, h, inputs, *a)
    )
    mask = torch.ones(2, 6)
    mask[0, :2] = 0
    model(ids(2, 6), attention_mask=mask)
    assert len(rotations) == 1 and sorted(prepares, key=str) == [4, None]
    assert len(seen) == 4 and seen[0].prepared is seen[2].prepared and seen[1].prepared is seen[3].prepared
    assert seen[0].prepared is not seen[1].prepared and seen[0].rotation is seen[1].rotation
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[0].key_valid = None
    assert isinstance(seen[0], LayerInputs) and seen[0].key_valid.shape == (2, 6)
