"""One attention-kernel chooser: the path the attention takes at run time is the path composer-plan
counts, over a grid of the facts that decide it (observed on the CPU; the CUDA rows from the chooser's
own table), and every path computes the same attention."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import small_model_dict

import components.kernels as kernels
from components.kernels import AttentionSpec, CallFacts, choose
from composer import compose
from composer.contract import CostCall

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, T, V = 2, 12, 64


def _model(kind: str, groups: int, head_dim: int, window, softcap, dropout: float, position: str, causal: bool):
    heads = 4
    attention = {"type": kind, "num_heads": heads, "head_dim": head_dim, "dropout": dropout, "causal": causal}
    if kind == "gqa":
        attention["num_kv_heads"] = heads // groups
    if window is not None:
        attention.update(type="sliding_window", window=window, num_kv_heads=heads // groups)
    if softcap is not None:
        attention["logit_softcap"] = softcap
    return compose(small_model_dict(attention=attention, position={"type": position}, num_layers=1), seed=0)


def _observe(model, monkeypatch, **call):
    seen = []
    attend = kernels.attend

    def spy(choice, *args, **kwargs):
        seen.append(choice)
        return attend(choice, *args, **kwargs)

    monkeypatch.setattr(kernels, "attend", spy)
    monkeypatch.setattr("components.attention.attend", spy)
    model(torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0)), **call)
    monkeypatch.undo()
    return seen


TRAINING_GRID = list(
    itertools.product(
        [torch.float32, torch.bfloat16],  # dtype
        [1, 2],  # K/V groups
        [8, 16],  # head dim
        [None, 4],  # window
        [None, 20.0],  # soft-cap
        [0.0, 0.1],  # attention dropout
        ["learned", "alibi"],  # alibi: a position bias
        [True, False],  # causal
    )
)


@pytest.mark.parametrize("dtype, groups, head_dim, window, softcap, dropout, position, causal", TRAINING_GRID)
def test_the_plan_counts_the_path_a_training_step_takes(
    dtype, groups, head_dim, window, softcap, dropout, position, causal, monkeypatch
):
    if window is not None and not causal:
        causal = True  # a window is causal local attention here
    model = _model("gqa", groups, head_dim, window, softcap, dropout, position, causal).to(dtype).train()
    taken = _observe(model, monkeypatch, labels=None)
    attn = model.layers[0].attn
    call = CostCall(
        T, B, activation_bytes=4 if dtype == torch.float32 else 2, device="cpu", position_bias=position == "alibi"
    )
    planned = attn.planned_choice(call)
    assert [(c.path, c.mask, c.materialises) for c in taken] == [(planned.path, planned.mask, planned.materialises)]


CACHE_CASES = [  # (cache kind, new tokens, padded, window) -> the path and mask on the CPU
    ("none", 12, False, None, "sdpa_gqa", "causal"),
    ("none", 12, True, None, "sdpa_gqa", "boolean"),
    ("dynamic", 1, False, None, "sdpa_gqa", "none"),
    ("dynamic", 3, False, None, "sdpa_gqa", "boolean"),
    ("dynamic", 1, True, None, "sdpa_gqa", "boolean"),
    ("rolling", 1, False, 4, "sdpa_gqa", "boolean"),
    ("static", 1, False, None, "sdpa_gqa", "boolean"),
]


@pytest.mark.parametrize("cache, new, padded, window, path, mask", CACHE_CASES)
def test_decoding_paths_on_the_cpu(cache, new, padded, window, path, mask, monkeypatch):
    model = _model("gqa", 2, 8, window, None, 0.0, "rope", True).eval()
    prompt = torch.randint(0, V, (B, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if cache == "none":
            attention_mask = torch.ones(B, T)
            attention_mask[0, 0] = 0
            taken = _observe(model, monkeypatch, **({"attention_mask": attention_mask} if padded else {}))
        else:
            kv = model.allocate_cache(B, 6 + new if cache != "rolling" else 32, static=cache == "static")
            prompt_mask = torch.ones(B, 6)
            if padded:
                prompt_mask[0, 0] = 0
            model(
                prompt,
                attention_mask=prompt_mask if padded or cache == "static" else None,
                past_key_values=kv,
                use_cache=True,
            )
            step = torch.randint(0, V, (B, new), generator=torch.Generator().manual_seed(2))
            full = torch.ones(B, 6 + new) if cache != "static" else torch.ones(B, new)
            if padded and cache != "static":
                full[0, 0] = 0
            seen = []
            attend = kernels.attend
            monkeypatch.setattr("components.attention.attend", lambda c, *a, **k: seen.append(c) or attend(c, *a, **k))
            position_ids = torch.arange(6, 6 + new)[None].expand(B, new) if cache == "static" else None
            model(
                step,
                attention_mask=full if padded or cache == "static" else None,
                past_key_values=kv,
                use_cache=True,
                position_ids=position_ids,
            )
            taken = seen
    assert [(c.path, c.mask) for c in taken] == [(path, mask)]


def spec(groups: int = 2, head_dim: int = 64, window=None, softcap=None, dropout=0.0, kernel="auto", causal=True):
    return AttentionSpec(8, 8 // groups, head_dim, causal, window, softcap, dropout, kernel)


def cuda(dtype=torch.bfloat16, **facts) -> CallFacts:
    return CallFacts(
        **{"device": "cuda", "dtype": dtype, "grad": True, "training": True, "queries": 256, "keys": 256, **facts}
    )


CUDA_TABLE = [  # the CUDA rows, from the kernels' documented rules
    (spec(), cuda(), "sdpa_gqa", "causal"),  # bf16, no mask: flash reads grouped heads
    (spec(), cuda(torch.float32), "sdpa_repeated", "causal"),  # float32: no flash; causal kernel needs rows in order
    (spec(), cuda(mask="padding"), "sdpa_folded", "boolean"),  # a mask: queries folded, K/V read once
    (spec(head_dim=320), cuda(), "sdpa_repeated", "causal"),  # head dim past flash's 256
    (spec(groups=1), cuda(torch.float32), "sdpa", "causal"),
    (spec(window=128), cuda(), "flex_compiled", "block"),  # a window over the whole sequence
    (spec(window=128), cuda(compiling=True), "flex", "block"),  # inside torch.compile: flex as it is
    (spec(window=128), cuda(mask="padding"), "sdpa_folded", "boolean"),  # padding: no block mask
    (spec(window=128), cuda(mask="bias"), "sdpa_folded", "additive"),  # a position bias: SDPA with it
    (spec(window=128, kernel="sdpa"), cuda(), "sdpa_folded", "boolean"),
    (spec(window=128, dropout=0.1), cuda(), "sdpa_folded", "boolean"),  # dropout while training
    (spec(window=128, dropout=0.1), cuda(training=False, grad=False), "flex_compiled", "block"),
    (spec(window=128), cuda(cache="rolling", queries=1), "sdpa_folded", "boolean"),
    (spec(softcap=50.0), cuda(), "explicit", "boolean"),  # no fused kernel takes a soft-cap
    (spec(softcap=50.0, groups=1), cuda(cache="dynamic", queries=1), "explicit", "none"),
    (spec(), cuda(cache="dynamic", queries=1, grad=False, training=False), "sdpa_gqa", "none"),
    (spec(), cuda(cache="static", queries=1, grad=False, training=False), "sdpa_folded", "boolean"),
    # decoding in float32 (no flash): one query sees the whole cache, so queries fold without a mask
    (spec(), cuda(torch.float32, cache="dynamic", queries=1, grad=False, training=False), "sdpa_folded", "none"),
    # MLA's absorbed decode: 8 query heads over one latent head of 576 dims (past flash): folded, no copy
    (spec(groups=8, head_dim=576), cuda(cache="dynamic", queries=1, grad=False, training=False), "sdpa_folded", "none"),
    (spec(causal=False), cuda(torch.float32), "sdpa_folded", "none"),  # an encoder: no mask at all
]


NEEDS_FLEX = pytest.mark.skipif(kernels.flex_attention is None, reason="no FlexAttention in this torch")


@pytest.mark.parametrize(
    "attention, facts, path, mask",
    [pytest.param(*row, marks=NEEDS_FLEX) if row[2].startswith("flex") else row for row in CUDA_TABLE],
)
def test_cuda_rows_of_the_chooser(attention, facts, path, mask):
    if not kernels.SDPA_HAS_GQA and path == "sdpa_gqa":
        path = "sdpa_repeated" if mask == "causal" else "sdpa_folded"
    choice = choose(attention, facts)
    assert (choice.path, choice.mask) == (path, mask)
    if attention.window and not path.startswith("flex"):
        assert choice.fallback.startswith("flex: "), "where a window falls back from FlexAttention, it says why"


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plan_asks_the_chooser_for_cuda_too(device, dtype):
    """composer-plan's choice for a device is the chooser's choice for a training step there."""
    for window, softcap, bias in itertools.product([None, 16], [None, 30.0], [False, True]):
        model = _model("gqa", 2, 8, window, softcap, 0.0, "alibi" if bias else "learned", True)
        attn = model.layers[0].attn
        call = CostCall(64, 2, activation_bytes=4 if dtype == torch.float32 else 2, device=device, position_bias=bias)
        facts = CallFacts(
            device,
            call.dtype,
            grad=True,
            training=True,
            mask="bias" if bias else "causal",
            cache="none",
            queries=64,
            keys=64,
        )
        assert attn.planned_choice(call) == choose(attn.spec, facts)


def test_folded_queries_need_no_mask_where_every_query_sees_every_key():
    """Decoding (one query over the cache) and encoders: the folded rows read K/V once, no copy, no mask."""
    s = AttentionSpec(6, 2, 8, causal=False)
    q = torch.randn(2, 6, 3, 8, generator=torch.Generator().manual_seed(0))
    k, v = (torch.randn(2, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    for t in (1, 3):
        folded = kernels.attend(kernels.Choice("sdpa", "folded", "none"), s, q[:, :, :t], k, v, None)
        repeated = kernels.attend(kernels.Choice("sdpa", "repeated", "none"), s, q[:, :, :t], k, v, None)
        torch.testing.assert_close(folded, repeated, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 10.0])
@pytest.mark.parametrize("padded", [False, True])
def test_every_grouped_path_computes_the_same_attention(softcap, padded):
    q = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    k, v = (torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    s = spec(groups=2, head_dim=8, softcap=softcap)
    s = AttentionSpec(4, 2, 8, True, None, softcap)
    valid = torch.ones(2, 6, dtype=torch.bool)
    if padded:
        valid[0, :2] = False
    pos = torch.arange(6)
    mask = kernels.build_mask(pos, pos, valid, True, None)
    outs = []
    for grouping in ("native", "folded", "repeated"):
        if grouping == "native" and not kernels.SDPA_HAS_GQA:
            continue
        kernel = "explicit" if softcap else "sdpa"
        if kernel == "explicit" and grouping != "repeated":
            continue
        choice = kernels.Choice(kernel, grouping, "boolean")
        outs.append(kernels.attend(choice, s, q, k, v, mask))
    reference = kernels.attend(
        kernels.Choice("explicit" if softcap else "sdpa", "repeated", "boolean"), s, q, k, v, mask
    )
    for out in outs:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
