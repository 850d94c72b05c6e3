"""The ``layer_pattern`` shorthand (with ``layer_kinds`` and ``mixers``): it compiles into per-layer
overrides that combine with ``layers:``, shows in ``config.layer(i)``, survives a save, and every problem
in it is reported with its path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from composer import ConfigError, compose, resolve_model_config
from composer.config import load_config

BASE = dict(
    vocab_size=64,
    hidden_size=32,
    num_layers=6,
    num_heads=4,
    max_position_embeddings=64,
    attention={"type": "gqa", "num_kv_heads": 2},
    position="rope",
    norm="rmsnorm",
    ffn="swiglu",
)
KINDS = {
    "local": {"attention": {"type": "sliding_window", "window": 4}, "position": {"type": "rope", "theta": 500.0}},
    "global": {"attention": "gqa"},
}


def _types(cfg) -> list[str]:
    return [s.attention.type for s in cfg.layer_specs()]


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        resolve_model_config({**BASE, **raw})
    return [f"{p.path}: {p.message}" for p in info.value.problems]


def test_a_list_is_cycled_and_repeats_expand():
    cfg = resolve_model_config({**BASE, "num_layers": 7, "layer_pattern": ["mqa*2", "gqa"]})
    assert _types(cfg) == ["mqa", "mqa", "gqa", "mqa", "mqa", "gqa", "mqa"]


def test_first_and_last_pin_layers_and_the_cycle_fills_the_rest():
    pattern = {"first": ["mha"], "cycle": ["mqa", "gqa"], "last": ["mha", "mha"]}
    cfg = resolve_model_config({**BASE, "num_layers": 7, "layer_pattern": pattern})
    assert _types(cfg) == ["mha", "mqa", "gqa", "mqa", "gqa", "mha", "mha"]


def test_named_kinds_set_several_slots_and_options_carry_over():
    cfg = resolve_model_config({**BASE, "layer_pattern": ["local*2", "global"], "layer_kinds": KINDS})
    local, glob = cfg.layer(0), cfg.layer(2)
    assert (local.attention.type, local.attention.window, local.position.theta) == ("sliding_window", 4, 500.0)
    assert (glob.attention.type, glob.attention.num_kv_heads, glob.position.theta) == ("gqa", 2, 10000.0)
    # the model's gqa options carry over to the sliding layers (num_kv_heads exists there too)
    assert local.attention.num_kv_heads == 2


def test_mixers_options_apply_to_every_layer_of_that_type_and_explicit_options_win():
    raw = {
        **BASE,
        "layer_pattern": ["sliding_window", "gqa"],
        "mixers": {"sliding_window": {"window": 8, "qk_norm": True}},
        "layers": [{"select": -1, "attention": {"type": "sliding_window", "window": 3}}],
    }
    cfg = resolve_model_config(raw)
    assert [(s.attention.type, getattr(s.attention, "window", None)) for s in cfg.layer_specs()] == [
        ("sliding_window", 8),
        ("gqa", None),
        ("sliding_window", 8),
        ("gqa", None),
        ("sliding_window", 8),
        ("sliding_window", 3),  # the explicit override comes after the pattern and wins
    ]
    assert cfg.layer(0).attention.qk_norm and cfg.layer(5).attention.qk_norm
    # the model-wide mixer takes its shared options too, unless it sets them itself
    wide = resolve_model_config({**BASE, "attention": "sliding_window", "mixers": {"sliding_window": {"window": 5}}})
    assert wide.attention.window == 5 and wide.layer(3).attention.window == 5
    own = {"type": "sliding_window", "window": 2}
    assert resolve_model_config({**wide.to_dict(), "attention": own}).attention.window == 2


def test_one_types_mixers_options_do_not_carry_over_to_another_type():
    """model.attention gla takes mixers.gla (no convolution: conv_size 0); its mamba2 layers must not
    inherit that, nor gla's defaults (chunks of 16), while options written on model.attention carry over."""
    raw = {
        **BASE,
        "num_layers": 2,
        "attention": {"type": "gla", "num_heads": 2},
        "layer_pattern": ["gla", "mamba2"],
        "mixers": {"gla": {"conv_size": 0}, "mamba2": {"head_dim": 16}},
    }
    cfg = resolve_model_config(raw)
    gla, mamba2 = cfg.layer(0).attention, cfg.layer(1).attention
    assert (gla.conv_size, gla.num_heads) == (0, 2)
    assert (mamba2.conv_size, mamba2.chunk_size) == (4, 64)  # its own defaults
    assert (mamba2.head_dim, mamba2.num_heads) == (16, 2)  # its mixers options; the option model.attention set


def test_the_pattern_builds_a_model_that_round_trips_through_a_checkpoint(tmp_path):
    raw = {**BASE, "layer_pattern": ["local*2", "global"], "layer_kinds": KINDS}
    model = compose(raw)
    windows = [layer.attn.window for layer in model.layers]
    assert windows == [4, 4, None, 4, 4, None]
    model.save_pretrained(tmp_path / "ckpt")
    again = type(model).from_pretrained(tmp_path / "ckpt")
    assert [layer.attn.window for layer in again.layers] == windows
    ids = torch.randint(0, 64, (1, 9))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_every_problem_is_named_with_its_path():
    found = _problems(
        {
            "layer_pattern": {"cycle": ["gqaa", "mqa*0", 3], "first": ["global"], "exact": "yes", "lats": []},
            "mixers": {"mhaa": {}, "gqa": {"type": "mqa"}},
            "layer_kinds": {"global": {"atention": "gqa"}},
        }
    )
    want = [
        "model.mixers.mhaa: 'mhaa' is not a registered sequence mixer",
        "model.mixers.gqa: expected a mapping of gqa options",
        "model.layer_kinds.global.atention: is not a layer slot",
        "model.layer_pattern.lats: is not a pattern key",
        "model.layer_pattern.cycle[0]: 'gqaa' is neither a layer kind nor a registered sequence mixer",
        "model.layer_pattern.cycle[1]: invalid pattern entry 'mqa*0'",
        "model.layer_pattern.cycle[2]: invalid pattern entry 3",
        "model.layer_pattern.exact: expected true or false",
    ]
    for w in want:
        assert any(f.startswith(w) for f in found), (w, found)
    assert not any("'global' is neither" in f for f in found)  # a kind with a problem is not also "unknown"


@pytest.mark.parametrize(
    "pattern, message",
    [
        ({"cycle": ["gqa"] * 4, "exact": True}, "4 kinds do not tile 6 layers exactly"),
        ({"first": ["gqa"] * 4, "last": ["mqa"] * 3}, "pins 7 layers but the model has 6"),
        ({"first": ["gqa"]}, "is empty but 5 layers are not pinned"),
        (["gqa*65536", "gqa*65536"], "expands to more than"),
        (7, "expected a list of layer kinds"),
    ],
)
def test_a_pattern_that_cannot_tile_as_asked_is_refused(pattern, message):
    assert any(message in f for f in _problems({"layer_pattern": pattern})), message


def test_bad_options_in_a_kind_are_reported_under_the_kind():
    found = _problems(
        {"layer_pattern": ["local", "gqa"], "layer_kinds": {"local": {"attention": {"type": "mqa", "windw": 3}}}}
    )
    assert any(f.startswith("model.layer_kinds.local.attention.windw") for f in found), found
    found = _problems({"layer_pattern": ["mqa", "gqa"], "mixers": {"mqa": {"num_heads": 0}}})
    assert any(f.startswith("model.mixers.mqa.num_heads") for f in found), found


def test_a_pattern_given_on_the_command_line_composes():
    cfg = load_config(["model=tiny", "+model.layer_pattern=[mqa*3,gqa]", "model.num_layers=8"])
    model = resolve_model_config(cfg.model)
    assert _types(model) == ["mqa", "mqa", "mqa", "gqa"] * 2


@settings(max_examples=60, deadline=None)
@given(
    first=st.lists(st.sampled_from(["mha", "mqa"]), max_size=2),
    cycle=st.lists(st.sampled_from(["mha", "mqa", "gqa", "sliding_window"]), min_size=1, max_size=5),
    last=st.lists(st.sampled_from(["gqa", "mqa"]), max_size=2),
    num_layers=st.integers(4, 12),
)
def test_property_each_layer_gets_the_kind_the_pattern_puts_there(first, cycle, last, num_layers):
    cfg = resolve_model_config(
        {**BASE, "num_layers": num_layers, "layer_pattern": {"first": first, "cycle": cycle, "last": last}}
    )
    middle = num_layers - len(first) - len(last)
    want = first + [cycle[i % len(cycle)] for i in range(middle)] + last
    assert _types(cfg) == want
    # a pattern is the same as the per-layer overrides it stands for
    layers = [{"select": i, "attention": kind} for i, kind in enumerate(want)]
    assert _types(resolve_model_config({**BASE, "num_layers": num_layers, "layers": layers})) == want
