"""The Gemma knobs as components, each against its formula (and transformers' own modules where they exist):
the sandwich block, the zero-centred RMSNorm (also as the attention's qk norm), norms without a weight
(and LayerNorm without a bias), and the embedding scale.

The conformance suite (tests/test_components.py) picks the sandwich block up by itself; these tests
check what it cannot: the formulas, bit-exact agreement with Gemma's RMSNorm and embedding scale in
float32 and bfloat16, initialisation, and the configuration errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model_dict
from core_helpers import inputs_for

from components.norm import LayerNorm, LayerNormConfig, RMSNorm, RMSNormConfig
from composer import compose
from composer.contract import BuildContext, CostCall
from composer.errors import ConfigError

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 24


def ctx(hidden: int = C) -> BuildContext:
    return BuildContext(hidden, 64, 64, 1)


def _random_weight(norm: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


# ----------------------------------------------------------------------------- zero-centred RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reference", ["Gemma2RMSNorm", "Gemma3RMSNorm"])
def test_zero_centred_rmsnorm_is_gemmas_bit_for_bit(reference, dtype):
    """(x / rms(x)) * (1 + w) in float32, cast back after the product: the same bits as transformers'."""
    module = getattr(
        T.models.gemma3.modeling_gemma3 if "3" in reference else T.models.gemma2.modeling_gemma2, reference
    )
    theirs = module(C, eps=1e-6)
    ours = RMSNorm(RMSNormConfig(eps=1e-6, zero_centred=True), ctx())
    _random_weight(theirs)
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = (torch.randn(3, 5, C) * 3 + 1).to(dtype)
    got = ours(x)
    assert got.dtype == dtype
    assert torch.equal(got, theirs(x))
    # and the formula, in float64
    x64, w64 = x.double(), ours.weight.double()
    want = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6) * (1 + w64)
    torch.testing.assert_close(got.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_zero_centred_rmsnorm_starts_as_the_identity_scale_and_learns():
    model = compose(small_model_dict(norm={"type": "rmsnorm", "zero_centred": True}, num_layers=1), seed=0)
    norm = model.layers[0].attn_norm
    assert torch.equal(norm.weight, torch.zeros(32))  # 1 + 0: a unit scale
    x = torch.randn(2, 4, 32)
    torch.testing.assert_close(norm(x), x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5))
    norm(x).square().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_zero_centred_needs_a_weight():
    with pytest.raises(ConfigError, match=r"model\.norm\.zero_centred: needs a weight"):
        compose(small_model_dict(norm={"type": "rmsnorm", "zero_centred": True, "weight": False}), device="meta")


def test_zero_centred_qk_norm_is_gemma3s():
    """attention.qk_norm_zero_centred: the per-head q/k norms are Gemma3RMSNorm (zeros at init, (1 + w))."""
    cfg = small_model_dict(
        num_layers=1, attention={"type": "mha", "qk_norm": True, "qk_norm_eps": 1e-6, "qk_norm_zero_centred": True}
    )
    attn = compose(cfg, seed=0).layers[0].attn
    assert attn.q_norm.zero_centred and attn.k_norm.zero_centred and torch.equal(attn.q_norm.weight, torch.zeros(8))
    theirs = T.models.gemma3.modeling_gemma3.Gemma3RMSNorm(8, eps=1e-6)
    _random_weight(theirs, seed=3)
    with torch.no_grad():
        attn.q_norm.weight.copy_(theirs.weight)
    q = torch.randn(2, 4, 5, 8)  # [B, H, T, D]
    assert torch.equal(attn.q_norm(q), theirs(q))


# ----------------------------------------------------------------------------- norms without weight / bias
def test_rmsnorm_without_weight():
    norm = RMSNorm(RMSNormConfig(eps=1e-3, weight=False), ctx())
    assert list(norm.parameters()) == []
    x = torch.randn(4, C) * 2
    torch.testing.assert_close(norm(x), x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-3))
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    assert norm.cost(CostCall(16, device="cpu")).params == 0


@pytest.mark.parametrize("weight, bias", [(False, False), (False, True), (True, False)])
def test_layernorm_with_or_without_weight_and_bias(weight, bias):
    norm = LayerNorm(LayerNormConfig(eps=1e-3, weight=weight, bias=bias), ctx())
    _random_weight(norm)
    assert sum(p.numel() for p in norm.parameters()) == C * (weight + bias)
    x = torch.randn(3, C) * 4 + 2
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-3)
    want = want * (norm.weight if weight else 1) + (norm.bias if bias else 0)
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "norm", [{"type": "rmsnorm", "weight": False}, {"type": "layernorm", "weight": False, "bias": False}]
)
def test_a_model_with_weightless_norms_trains_and_counts_no_norm_parameters(norm):
    with_weights = compose(small_model_dict(norm={"type": norm["type"]}), device="meta").num_parameters()
    model = compose(small_model_dict(norm=norm), seed=0)
    per_norm = 32 * (2 if norm["type"] == "layernorm" else 1)
    assert model.num_parameters() == with_weights - per_norm * (2 * 2 + 1)  # 2 per layer + the final norm
    x = torch.randint(0, 64, (2, 6))
    out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- the sandwich block
def _sandwich(**changes):
    cfg = small_model_dict(
        **{"block": "sandwich", "num_layers": 1, "norm": {"type": "rmsnorm", "zero_centred": True}, **changes}
    )
    model = compose(cfg, seed=0)
    layer = model.layers[0]
    for name in ("attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm"):
        _random_weight(getattr(layer, name), seed=len(name))
    return model, layer


def test_sandwich_block_formula():
    """x = x + post_attn_norm(attn(attn_norm(x))); x = x + post_ffn_norm(ffn(ffn_norm(x)))."""
    model, m = _sandwich()
    norms = [m.attn_norm, m.post_attn_norm, m.ffn_norm, m.post_ffn_norm]
    assert len({id(n) for n in norms}) == 4  # four norms, each its own weights
    x = torch.randn(2, 7, 32)
    y, present, aux = m(x, inputs_for(2, 7))
    assert present is None and aux is None
    h = x + m.post_attn_norm(m.attn(m.attn_norm(x), inputs_for(2, 7))[0])
    want = h + m.post_ffn_norm(m.ffn(m.ffn_norm(h)))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert model.final_norm is not None  # a pre-norm-like block: the model adds a final norm


def test_sandwich_cost_counts_its_four_norms():
    model, m = _sandwich()
    cost = m.cost(CostCall(16, device="cpu"))
    assert cost.params == sum(p.numel() for p in m.parameters())
    norm = m.attn_norm.cost(CostCall(16, device="cpu"))
    assert cost.parts["attention"].params == m.attn.cost(CostCall(16, device="cpu")).params + 2 * norm.params
    assert cost.parts["ffn"].saved == m.ffn.cost(CostCall(16, device="cpu")).saved + 2 * norm.saved


def test_sandwich_residual_dropout_acts_on_the_post_normed_branches():
    """The residual dropout sees each branch after its post-norm (what is added to the stream)."""
    model, m = _sandwich(block={"type": "sandwich", "dropout": 0.25})
    assert m.drop.p == 0.25
    seen = []

    class Record(torch.nn.Module):
        def forward(self, t):
            seen.append(t)
            return t

    m.drop = Record()
    x = torch.randn(2, 5, 32)
    y, _, _ = m(x, inputs_for(2, 5))
    a = m.post_attn_norm(m.attn(m.attn_norm(x), inputs_for(2, 5))[0])
    f = m.post_ffn_norm(m.ffn(m.ffn_norm(x + a)))
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], a)
    torch.testing.assert_close(seen[1], f)
    torch.testing.assert_close(y, x + a + f)


# ----------------------------------------------------------------------------- embedding scale
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_scale_is_gemmas_normaliser(dtype):
    """embedding_scale: sqrt multiplies the embeddings by sqrt(hidden_size) rounded to their dtype, as
    Gemma's scaled word embedding does (bf16: 55.5 for sqrt(3072) = 55.43, not 55.43)."""
    hidden = 3072
    cfg = small_model_dict(hidden_size=hidden, num_heads=24, num_layers=1, embedding_scale="sqrt", position="none")
    model = compose(cfg, seed=0, dtype=dtype)
    theirs = T.models.gemma2.modeling_gemma2.Gemma2TextScaledWordEmbedding(64, hidden, 0, embed_scale=hidden**0.5)
    with torch.no_grad():
        theirs.weight.copy_(model.embed.weight.float())
    theirs = theirs.to(dtype)
    ids = torch.randint(0, 64, (2, 5))
    got = model._embed(ids, torch.arange(5)[None])
    assert got.dtype == dtype and torch.equal(got, theirs(ids))
    plain = compose({**cfg, "embedding_scale": None}, seed=0, dtype=dtype)
    assert torch.equal(plain._embed(ids, torch.arange(5)[None]), model.embed(ids))
    if dtype == torch.bfloat16:
        assert model._embed_scale[torch.bfloat16] == 55.5 != math.sqrt(hidden)


def test_embedding_scale_changes_the_logits_and_trains():
    cfg = small_model_dict(num_layers=1, embedding_scale="sqrt")
    scaled, plain = compose(cfg, seed=0), compose({**cfg, "embedding_scale": None}, seed=0)
    x = torch.randint(0, 64, (2, 6))
    assert not torch.allclose(scaled(x).logits, plain(x).logits)
    out = scaled(x, labels=x)
    out.loss.backward()
    assert scaled.embed.weight.grad is not None


def test_embedding_scale_must_be_sqrt_or_null():
    with pytest.raises(ConfigError) as info:
        compose(small_model_dict(embedding_scale="two"), device="meta")
    assert "model.embedding_scale: 'two' is not one of sqrt" in str(info.value)
    with pytest.raises(ConfigError, match="model.embedding_scale"):
        compose(small_model_dict(embedding_scale=2.0), device="meta")


def test_gelu_tanh_geglu_is_gemmas_mlp():
    """Gemma's MLP (gelu_pytorch_tanh gate) is geglu: the same output from the same weights."""
    cfg = T.Gemma2Config(hidden_size=32, intermediate_size=40, hidden_activation="gelu_pytorch_tanh")
    theirs = T.models.gemma2.modeling_gemma2.Gemma2MLP(cfg)
    ffn = compose(small_model_dict(num_layers=1, ffn={"type": "geglu", "intermediate_size": 40}), seed=0).layers[0].ffn
    with torch.no_grad():
        ffn.gate_up.weight.copy_(torch.cat([theirs.gate_proj.weight, theirs.up_proj.weight]))
        ffn.down.weight.copy_(theirs.down_proj.weight)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(ffn(x), theirs(x), rtol=0, atol=1e-6)
    assert F.gelu(torch.tensor(1.0), approximate="tanh") == ffn.act(torch.tensor(1.0))
