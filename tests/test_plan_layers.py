"""composer-plan per layer (issue 16): each layer's forward FLOPs per token, activations saved for backward,
KV cache and fixed state; a linear mixer's FLOPs per token and state constant in T, an attention layer's FLOPs
and KV cache growing with it; the layers (and the model-level row) adding up to the plan's totals; the table a
hybrid renders at 80 columns; and the plan's training peak of a tiny hybrid against a measured CPU step."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import small_model_dict
from rich.console import Console

from benchmarks.bench_plan_memory import hybrid as bench_hybrid
from benchmarks.bench_plan_memory import measure
from composer import compose, load_config
from composer.plan import plan
from composer.plan_render import human, render

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MIXERS = ("gated_deltanet", "mamba2", "gla")
H, D, KV = 4, 8, 2  # small_model_dict's 4 heads of 32 / 4; grouped-query attention with 2 K/V heads


def hybrid(mixer: str, **changes) -> dict:
    """Three mixer layers to one grouped-query attention layer (layer_pattern), eight layers."""
    base = dict(
        num_layers=8,
        attention={"type": "gqa", "num_kv_heads": KV},
        position={"type": "rope"},
        layer_pattern=[f"{mixer}*3", "gqa"],
        max_position_embeddings=4096,
    )
    return small_model_dict(**{**base, **changes})


def is_mixer(row) -> bool:
    return not row.attention.startswith("gqa")


@pytest.mark.parametrize("mixer", MIXERS)
def test_a_mixer_layers_flops_per_token_stay_constant_and_attentions_grow_with_the_context(mixer):
    short, long = plan(hybrid(mixer), seq_len=1024), plan(hybrid(mixer), seq_len=4096)
    kinds = [is_mixer(r) for r in short.rows]
    assert kinds == [True, True, True, False] * 2
    for s, lg in zip(short.rows, long.rows, strict=True):
        assert s.flops > 0
        if is_mixer(s):  # the layer's FLOPs over a sequence grow 4x from 1,024 to 4,096 tokens: linear in T
            assert lg.flops * 4096 / (s.flops * 1024) == pytest.approx(4.0, rel=0.02)
        else:  # scores and weighted values: 4 x context x heads x head_dim per token more
            assert lg.flops - s.flops == 4 * (4096 - 1024) * H * D
            assert lg.flops * 4096 / (s.flops * 1024) > 4.5


@pytest.mark.parametrize("mixer", MIXERS)
def test_a_mixer_layers_state_is_constant_in_t_and_an_attention_layers_kv_cache_linear(mixer):
    t_short, t_long = 256, 1024
    short, long = (plan(hybrid(mixer), seq_len=t, precision="32-true", device="cpu") for t in (t_short, t_long))
    model = compose(hybrid(mixer), device="cpu")
    for s, lg in zip(short.rows, long.rows, strict=True):
        if is_mixer(s):
            assert s.kv_cache_bytes == lg.kv_cache_bytes == 0
            cache = model.layers[s.index].attn.make_cache(1, t_long, torch.float32, "cpu")
            held = cache.state.numel() * 4 + (cache.conv.numel() * 4 if cache.conv is not None else 0)
            assert s.state_bytes == lg.state_bytes == held > 0  # what the decoding cache holds, any length
        else:
            assert s.state_bytes == lg.state_bytes == 0
            assert s.kv_cache_bytes == 2 * KV * D * 4 * t_short  # K and V, float32
            assert lg.kv_cache_bytes == s.kv_cache_bytes * t_long // t_short


def test_a_sliding_window_caps_its_layers_kv_cache():
    window = {"type": "sliding_window", "num_kv_heads": KV, "window": 16}
    cfg = hybrid("gated_deltanet", layers=[{"select": [7], "attention": window}])
    rows = plan(cfg, seq_len=1024).rows
    assert rows[3].kv_cache_bytes == 2 * KV * D * 2 * 1024  # bf16 K and V of every token
    assert rows[7].kv_cache_bytes == 2 * KV * D * 2 * 16  # the window's
    assert rows[3].flops - rows[7].flops == 4 * (1024 - 16) * H * D


@pytest.mark.parametrize("checkpointing", ["none", "every_layer", "every_2", "attention", "ffn"])
def test_the_layers_and_the_model_level_row_add_up_to_the_totals(checkpointing):
    for mixer in MIXERS:
        report = plan(hybrid(mixer), batch_size=3, seq_len=512, checkpointing=checkpointing)
        rows, top, m = report.rows, report.model_row, report.memory
        assert top is not None and top.index == -1
        assert sum(r.params for r in rows) + top.params == report.params_total
        assert sum(r.flops for r in rows) + top.flops == report.flops_forward_per_token
        assert sum(r.activation_bytes for r in rows) + top.activation_bytes + m.recompute == m.activations
        assert sum(r.state_bytes for r in rows) == report.recurrent_state_bytes > 0
        kv = sum(r.kv_cache_bytes for r in rows)
        assert kv + report.recurrent_state_bytes == report.kv_cache_bytes_max
        assert kv == report.kv_cache_bytes_per_token * 512
        expected = {"none": "none", "every_layer": "layer", "attention": "attention", "ffn": "ffn"}
        modes = [r.checkpointing for r in rows]
        assert modes == (["layer", "none"] * 4 if checkpointing == "every_2" else [expected[checkpointing]] * 8)
        assert (m.recompute > 0) == (checkpointing != "none")  # a layer or a part rebuilt in backward


def test_checkpointing_a_layer_keeps_only_its_input():
    none = plan(hybrid("mamba2"), batch_size=2, seq_len=256)
    every = plan(hybrid("mamba2"), batch_size=2, seq_len=256, checkpointing="every_layer")
    kept = 2 * 256 * 32 * 4  # float32 residual input, 32 wide
    for a, b in zip(none.rows, every.rows, strict=True):
        assert b.activation_bytes == kept < a.activation_bytes
    # while layer j is rebuilt, the 7 - j layers after it have freed their inputs
    rebuilt = [r.activation_bytes - (7 - r.index) * kept for r in none.rows]
    assert every.memory.recompute == max(rebuilt) == rebuilt[6]  # the last mixer layer


def test_recomputing_a_layer_counts_only_what_the_layers_after_it_have_not_freed():
    """Backward runs from the last layer down: when checkpointed layer j is rebuilt, the layers after it
    have freed what they kept. every_2 on [mixer x3, gqa] x2: layer 6 (a mixer) is rebuilt after layer 7
    (attention, kept whole) freed its activations, so the peak rises by the difference only."""
    none = plan(hybrid("gated_deltanet"), batch_size=2, seq_len=256).rows
    every_2 = plan(hybrid("gated_deltanet"), batch_size=2, seq_len=256, checkpointing="every_2")
    mixer, attention = none[6].activation_bytes, none[7].activation_bytes
    assert mixer > attention
    assert every_2.memory.recompute == mixer - attention  # not the whole mixer layer on top of everything
    ffn = plan(hybrid("gla"), batch_size=2, seq_len=256, checkpointing="ffn")
    assert ffn.memory.recompute > 0  # the last layer's feed-forward, rebuilt while the rest is kept


def rendered(report, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    render(report, console)
    return console.export_text()


def test_a_hybrids_table_names_its_kinds_and_shows_the_new_columns_in_80_columns():
    report = plan(hybrid("gated_deltanet"), batch_size=2, seq_len=1024)
    text = rendered(report)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert "…" not in text
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    assert header.split() == ["layer", "kind", "params", "FLOPs", "saved", "KV", "state"]
    # runs of identical layers collapsed; each kind named by its mixer, in full in the legend
    mixer, attention = report.rows[0], report.rows[3]
    for idx, row in (("0-2", mixer), ("3", attention), ("4-6", mixer), ("7", attention)):
        cells = next(line for line in lines if line.split()[:1] == [idx]).split()
        assert cells[1] == ("gated_deltanet" if row is mixer else "gqa")
        assert human(row.params) in cells and human(row.flops) in cells
    assert f"gated_deltanet = {mixer.attention}" in text and f"gqa = {attention.attention}" in text
    assert "layers (all: block pre_norm, ffn mlp, norm layernorm, position rope)" in " ".join(text.split())
    assert "embedding+head" in text
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[1] == human(report.params_total) and total[2] == human(report.flops_forward_per_token)
    # the summary: KV cache and recurrent state apart, and their sum
    state, kv = report.recurrent_state_bytes, report.kv_cache_bytes_max - report.recurrent_state_bytes
    assert f"recurrent state / sequence (any length) │ {human(state, 'B')}" in " ".join(text.split())
    assert f"KV cache / sequence of 1024 │ {human(kv, 'B')}" in " ".join(text.split())
    assert f"KV cache + state / sequence of 1024 │ {human(kv + state, 'B')}" in " ".join(text.split())


def test_a_pure_attention_models_summary_keeps_its_kv_lines_and_has_no_state_column():
    report = plan(small_model_dict(num_layers=4), seq_len=64)
    text = rendered(report)
    header = next(line for line in text.splitlines() if line.lstrip().startswith("layer"))
    assert header.split() == ["layer", "kind", "params", "FLOPs", "saved", "KV"]
    flat = " ".join(text.split())
    assert f"KV cache / sequence of 64 │ {human(report.kv_cache_bytes_max, 'B')}" in flat
    assert "recurrent state" not in flat and "KV cache + state" not in flat
    assert "0-3 mha" in flat  # four identical layers in one row


def test_layers_that_checkpoint_differently_get_a_ckpt_column():
    text = rendered(plan(hybrid("gla"), seq_len=256, checkpointing="every_2"))
    header = next(line for line in text.splitlines() if line.lstrip().startswith("layer"))
    assert "ckpt" in header.split()
    assert "recompute" in text


def test_qwen3_next_renders_in_80_columns_without_truncation():
    report = plan(load_config(["model=qwen3_next_80b_a3b"]).model, seq_len=4096)
    text = rendered(report)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert "…" not in text
    assert "44-46" in text and "gated_deltanet = gated_deltanet(h=32, kh=16)" in text


@pytest.mark.parametrize("stack", ["gated_deltanet_gqa", "mamba2_gqa"])
@pytest.mark.parametrize("checkpointing", ["none", "every_layer"])
def test_the_plan_of_a_tiny_hybrid_is_within_15_percent_of_a_measured_cpu_step(stack, checkpointing):
    """benchmarks/bench_plan_memory.py's measurement (weights + AdamW state + the step's peak of live tensor
    storages) on its quick stack: deterministic (the same storages every run) and about a second."""
    cfg = bench_hybrid(stack, quick=True)
    r = measure(cfg, batch_size=2, seq_len=cfg["max_position_embeddings"], checkpointing=checkpointing)
    assert r["step_peak_bytes"] > 0
    assert r["plan_over_measured"] == pytest.approx(1.0, abs=0.15)
