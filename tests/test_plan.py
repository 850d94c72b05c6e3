"""composer.plan: exact parameter counts, FLOPs and KV-cache sizes checked against hand formulas; activation
terms checked against the bytes autograd actually saves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import components.kernels as kernels
from composer import ConfigError, compose, load_config
from composer.plan import plan, training_flops_per_token
from tests.conftest import small_model_dict


def gpt2_like(c: int, layers: int, vocab: int, ctx: int) -> tuple[int, int]:
    """(matmul weights incl. head, embedding params) of a GPT-2 shape, by hand."""
    per_layer = 3 * c * c + c * c + 4 * c * c + 4 * c * c
    return layers * per_layer + vocab * c, vocab * c + ctx * c


def test_gpt2_flops_params_kv_match_hand_formulas():
    cfg = load_config(["model=gpt2"]).model
    report = plan(cfg, batch_size=16, seq_len=1024)
    matmul, embedding = gpt2_like(768, 12, 50257, 1024)
    assert report.params_total == 124_439_808
    assert report.params_embedding == embedding
    assert report.params_trainable == report.params_total
    attention = 4 * 1024 * 768 * 12  # scores + weighted values, no causal discount
    assert report.flops_forward_per_token == 2 * matmul + attention
    assert report.flops_training_per_token == 3 * report.flops_forward_per_token
    assert report.kv_cache_bytes_per_token == 2 * 12 * 768 * 2  # k and v, 12 layers, bf16
    assert report.kv_cache_bytes_max == report.kv_cache_bytes_per_token * 1024
    assert [r.params for r in report.rows] == [report.rows[0].params] * 12
    assert training_flops_per_token(cfg, 1024) == report.flops_training_per_token


def test_sliding_window_caps_context_and_cache():
    raw = small_model_dict(attention={"type": "sliding_window", "window": 8}, max_position_embeddings=64)
    full = plan(small_model_dict(max_position_embeddings=64), seq_len=64)
    windowed = plan(raw, seq_len=64)
    assert windowed.kv_cache_bytes_per_token == full.kv_cache_bytes_per_token
    assert windowed.kv_cache_bytes_max == full.kv_cache_bytes_per_token * 8
    # attention-score FLOPs shrink from 64 to 8 keys per query
    assert full.flops_forward_per_token - windowed.flops_forward_per_token == 4 * (64 - 8) * 32 * 2


def test_gqa_shrinks_kv_cache():
    mha = plan(small_model_dict())
    gqa = plan(small_model_dict(attention={"type": "gqa", "num_kv_heads": 1}))
    assert gqa.kv_cache_bytes_per_token * 4 == mha.kv_cache_bytes_per_token
    assert gqa.params_total < mha.params_total


def test_moe_counts_only_routed_experts_in_flops():
    dense = plan(small_model_dict(ffn={"type": "swiglu", "intermediate_size": 64}))
    moe = plan(
        small_model_dict(
            ffn={"type": "moe", "num_experts": 4, "top_k": 2, "expert": {"type": "swiglu", "intermediate_size": 64}}
        )
    )
    expert = 2 * (32 * 128 + 64 * 32)  # gate_up + down of one expert
    router = 2 * 32 * 4
    assert moe.flops_forward_per_token - dense.flops_forward_per_token == 2 * (expert + router)
    assert moe.params_total > dense.params_total


@pytest.mark.parametrize(
    "precision, weight, grad, state", [("32-true", 4, 4, 8), ("bf16-mixed", 6, 4, 8), ("bf16-true", 2, 2, 4)]
)
def test_memory_by_precision(precision, weight, grad, state):
    report = plan(small_model_dict(), precision=precision)
    n = report.params_total
    assert (report.memory.weights, report.memory.gradients, report.memory.optimizer) == (
        weight * n,
        grad * n,
        state * n,
    )


def test_checkpointing_orders_activation_memory():
    base = small_model_dict(num_layers=4)
    none = plan(base, batch_size=4, seq_len=32).memory.activations
    every = plan(base, batch_size=4, seq_len=32, checkpointing="every_layer").memory.activations
    every2 = plan(base, batch_size=4, seq_len=32, checkpointing="every_2").memory.activations
    attn = plan(base, batch_size=4, seq_len=32, checkpointing="attention").memory.activations
    assert every < every2 < none
    assert attn < none
    report = plan(base, batch_size=4, seq_len=32, checkpointing="every_layer")
    assert report.memory.activations == report.memory.activations_every_layer
    assert report.flops_recompute_per_token > 0
    assert plan(base, seq_len=32).flops_recompute_per_token == 0


def saved_activation_bytes(config: dict, batch: int, seq_len: int) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of one forward with labels
    (parameters excluded: they are weights, not activations)."""
    model = compose(config, seed=0).train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(storages.values())


@pytest.mark.parametrize("attn", [{"type": "mha"}, {"type": "gqa", "num_kv_heads": 2}])
def test_a_logit_softcap_stores_what_the_plan_says(attn):
    """The soft-capped attention (explicit softmax) keeps [H, T, S] float32 scores: the plan's extra
    bytes for it are the measured ones."""
    base = small_model_dict(attention=attn, num_layers=2, max_position_embeddings=128)
    capped = small_model_dict(attention={**attn, "logit_softcap": 30.0}, num_layers=2, max_position_embeddings=128)
    b, t = 2, 128  # the scores dominate; what the CPU's SDPA copies besides (contiguous q, k, v) is not planned
    measured = saved_activation_bytes(capped, b, t) - saved_activation_bytes(base, b, t)
    planned = (
        plan(capped, batch_size=b, seq_len=t, precision="32-true", device="cpu").memory.activations
        - plan(base, batch_size=b, seq_len=t, precision="32-true", device="cpu").memory.activations
    )
    assert measured > 0
    assert planned == pytest.approx(measured, rel=0.05)


def test_grouped_heads_repeated_for_sdpa_are_planned_where_they_are_repeated():
    gqa = small_model_dict(attention={"type": "gqa", "num_kv_heads": 2}, num_layers=2)
    mha = small_model_dict(num_layers=2)
    b, t, h, d = 2, 64, 4, 8

    def activations(config, precision, device):
        return plan(config, batch_size=b, seq_len=t, precision=precision, device=device).memory.activations

    repeated = b * t * 2 * (2 * h * d) * 4  # 2 layers x K and V for every query head, float32
    if kernels.SDPA_HAS_GQA:  # CUDA in float32 repeats (the flash kernel, which reads groups, needs 16 bits)
        assert activations(gqa, "32-true", "cuda") - activations(gqa, "32-true", "cpu") == repeated
        assert activations(gqa, "bf16-mixed", "cuda") == activations(gqa, "bf16-mixed", "cpu")
    for device in ("cpu", "cuda"):  # multi-head attention has nothing to repeat
        assert activations(mha, "32-true", device) == activations(mha, "32-true", "cpu")
    window = {"type": "sliding_window", "num_kv_heads": 2, "window": 16}
    flex, masked = small_model_dict(attention=window), small_model_dict(attention={**window, "kernel": "sdpa"})
    # on CUDA a window runs FlexAttention, which reads grouped heads; with kernel: sdpa it is a mask: q is folded
    assert activations(flex, "32-true", "cuda") == activations(flex, "32-true", "cpu")
    if kernels.SDPA_HAS_GQA:
        folded = b * t * 2 * (h * d) * 4
        assert activations(masked, "32-true", "cuda") - activations(masked, "32-true", "cpu") == folded


def test_padded_vocab_reported_separately():
    report = plan(small_model_dict(vocab_size=60, pad_vocab_to_multiple_of=64, tie_embeddings=True))
    assert report.params_vocab_padding == 4 * 32
    assert any("padded" in note for note in report.notes)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"precision": "fp8"}, "precision"),
        ({"seq_len": 10_000}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"checkpointing": "sometimes"}, "checkpointing"),
    ],
)
def test_bad_plan_arguments_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as err:
        plan(small_model_dict(), **kwargs)
    assert err.value.problems[0].path == key


def test_plan_of_an_8b_model_allocates_nothing():
    report = plan(load_config(["model=llama3_8b"]).model, batch_size=1, seq_len=8192)
    assert report.params_total == 8_030_261_248
    assert report.kv_cache_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_building_on_meta_does_not_import_the_compiler():
    """Random fills on meta tensors import torch._dynamo (seconds); compose must avoid them."""
    code = (
        "import sys, torch; from composer import load_config; from composer.plan import plan; "
        "plan(load_config(['model=llama3_8b']).model); assert 'torch._dynamo' not in sys.modules, 'dynamo'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
