"""Schema validation: types, unknown keys, cross-field rules, per-layer overrides, round trips."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import small_model_dict
from core_helpers import component
from omegaconf import OmegaConf

from components.block import ParallelBlock, PreNormBlock
from components.ffn import MLP, GatedMLP
from components.norm import LayerNorm, RMSNorm
from composer import ConfigError, InvalidParameter, MissingParameter, ModelConfig, compose, resolve_model_config
from composer.schema import parse_select

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def problems_of(raw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        resolve_model_config(raw)
    return info.value


def paths(err: ConfigError) -> list[str]:
    return [p.path for p in err.problems]


# ============================================================================ keys and types
def test_unknown_key_is_refused_with_did_you_mean():
    err = problems_of(small_model_dict(attention={"type": "gqa", "num_kv_head": 2}))
    assert isinstance(err, InvalidParameter)
    assert paths(err) == ["model.attention.num_kv_head"]
    assert "unknown option of 'gqa'" in str(err) and "did you mean 'num_kv_heads'?" in str(err)
    err = problems_of(small_model_dict(hidden_sise=32))
    assert "model.hidden_sise" in str(err) and "did you mean 'hidden_size'?" in str(err)
    err = problems_of(small_model_dict(layers=[{"select": 0, "atention": "mqa"}]))
    assert "model.layers[0].atention" in paths(err) and "did you mean 'attention'?" in str(err)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("hidden_size", "big", "expected int, got str 'big'"),
        ("hidden_size", 32.5, "expected int"),
        ("num_layers", True, "expected int, got bool"),
        ("tie_embeddings", "yes", "expected bool"),
        ("dropout", "0.1", "expected float"),
        ("layers", 5, "expected a list"),
        ("attention", 5, "expected a attention type name or a mapping"),
        ("name", 3, "expected str"),
    ],
)
def test_wrong_types_are_refused(key, value, expected):
    err = problems_of(small_model_dict(**{key: value}))
    assert isinstance(err, InvalidParameter)
    assert f"model.{key}" in paths(err) and expected in str(err)


def test_whole_numbers_and_ints_are_accepted_where_natural():
    cfg = resolve_model_config(
        small_model_dict(hidden_size=32.0, dropout=0, attention={"type": "mha", "softmax_scale": 1})
    )
    assert cfg.hidden_size == 32 and isinstance(cfg.hidden_size, int)
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)
    assert isinstance(cfg.attention.softmax_scale, float)


def test_non_mapping_config_is_refused():
    with pytest.raises(ConfigError, match="expected a mapping of model options"):
        resolve_model_config(["not", "a", "mapping"])


def test_dictconfig_and_modelconfig_inputs():
    raw = small_model_dict(ffn={"type": "mlp", "intermediate_size": "${hidden_size}"})
    cfg = resolve_model_config(OmegaConf.create(raw))
    assert cfg.ffn.intermediate_size == 32
    assert resolve_model_config(cfg) == cfg
    with pytest.raises(ConfigError, match="interpolation"):
        resolve_model_config(OmegaConf.create(small_model_dict(hidden_size="${nowhere}")))


# ============================================================================ cross-field rules
@pytest.mark.parametrize(
    "changes,path,fragment",
    [
        ({"hidden_size": 30}, "model.hidden_size", "not divisible by num_heads=4"),
        (
            {"attention": {"type": "gqa", "num_kv_heads": 3}},
            "model.attention.num_kv_heads",
            "does not divide num_heads=4",
        ),
        (
            {"num_heads": 3, "hidden_size": 33, "attention": {"type": "gqa"}},
            "model.attention.num_kv_heads",
            "no default for an odd num_heads",
        ),
        ({"hidden_size": 20, "position": {"type": "rope"}}, "model.position.rotary_fraction", "odd"),
        (
            {"hidden_size": 24, "position": {"type": "rope", "rotary_fraction": 0.5}},
            "model.position.rotary_fraction",
            "rotates 3 dims",
        ),
        ({"position": {"type": "rope", "rotary_fraction": 0.0}}, "model.position.rotary_fraction", "outside (0, 1]"),
        ({"attention": {"type": "sliding_window", "window": 0}}, "model.attention.window", "below the minimum 1"),
        (
            {"attention": {"type": "sliding_window", "window": 65}},
            "model.attention.window",
            "exceeds max_position_embeddings=64",
        ),
        ({"dropout": 1.0}, "model.dropout", "outside [0, 1)"),
        ({"dropout": -0.1}, "model.dropout", "below the minimum"),
        ({"attention": {"type": "mha", "dropout": 1.5}}, "model.attention.dropout", "outside [0, 1)"),
        ({"ffn": {"type": "mlp", "dropout": 1.0}}, "model.ffn.dropout", "outside [0, 1)"),
        ({"block": {"type": "pre_norm", "dropout": -0.5}}, "model.block.dropout", "outside [0, 1)"),
        ({"vocab_size": 0}, "model.vocab_size", "below the minimum 1"),
        ({"hidden_size": 0}, "model.hidden_size", "below the minimum 1"),
        ({"num_layers": 0}, "model.num_layers", "below the minimum 1"),
        ({"num_heads": 0}, "model.num_heads", "below the minimum 1"),
        ({"max_position_embeddings": -1}, "model.max_position_embeddings", "below the minimum 1"),
        ({"ffn": {"type": "mlp", "intermediate_size": 0}}, "model.ffn.intermediate_size", "below the minimum 1"),
        ({"ffn": {"type": "moe", "num_experts": 2, "top_k": 3}}, "model.ffn.top_k", "exceeds num_experts=2"),
        ({"ffn": {"type": "moe", "expert": {"type": "moe"}}}, "model.ffn.expert.type", "cannot itself be a mixture"),
        ({"ffn": {"type": "mlp", "activation": "gelu2"}}, "model.ffn.activation", "did you mean 'gelu'"),
        ({"attention": {"type": "mha", "softmax_scale": -1.0}}, "model.attention.softmax_scale", "must be positive"),
        ({"head": {"type": "lm", "logit_softcap": 0.0}}, "model.head.logit_softcap", "must be positive"),
        ({"gradient_checkpointing": "every_0"}, "model.gradient_checkpointing", "k >= 1"),
        ({"gradient_checkpointing": "often"}, "model.gradient_checkpointing", "not a checkpointing mode"),
        (
            {"position": {"type": "rope", "scaling": "longrope"}},
            "model.position.scaling",
            "not one of none, linear, llama3, yarn",
        ),
    ],
)
def test_cross_field_rules(changes, path, fragment):
    err = problems_of(small_model_dict(**changes))
    assert path in paths(err), str(err)
    assert fragment in str(err)
    assert "Fix:" in str(err)


def test_rules_hold_on_per_layer_overrides():
    err = problems_of(small_model_dict(layers=[{"select": "1", "attention": {"type": "gqa", "num_kv_heads": 3}}]))
    assert paths(err) == ["model.layers[0].attention.num_kv_heads"]
    err = problems_of(
        small_model_dict(
            num_layers=4,
            layers=[
                {"select": "0", "attention": {"type": "sliding_window", "window": 100}},
                {"select": [1, 2], "ffn": {"type": "mlp", "dropout": 2.0}},
            ],
        )
    )
    assert paths(err) == ["model.layers[0].attention.window", "model.layers[1].ffn.dropout"]


def test_rope_is_checked_against_each_layers_own_head_dim():
    err = problems_of(
        small_model_dict(position={"type": "rope"}, layers=[{"select": 1, "attention": {"type": "mha", "head_dim": 5}}])
    )
    assert paths(err) == ["model.layers[0].attention"] and "rotates 5 dims, which is odd" in str(err)
    err = problems_of(
        small_model_dict(
            position={"type": "rope", "rotary_fraction": 0.5},
            layers=[{"select": "0:", "attention": {"type": "mha", "num_heads": 16}}],
        )
    )
    assert "head_dim 2 with rope rotary_fraction 0.5 rotates 1 dims" in str(err)
    err = problems_of(
        small_model_dict(
            attention={"type": "mha", "head_dim": 6},
            position="none",
            layers=[{"select": 0, "position": {"type": "rope", "rotary_fraction": 0.5}}],
        )
    )
    assert "rotates 3 dims" in str(err)
    cfg = resolve_model_config(
        small_model_dict(
            position={"type": "rope"}, layers=[{"select": 1, "attention": {"type": "mha", "num_heads": 8}}]
        )
    )
    assert cfg.layer(1).attention.head_dim == 4


def test_valid_edges_are_accepted():
    for changes in (
        {"attention": {"type": "sliding_window", "window": 1}},
        {"attention": {"type": "sliding_window", "window": 64}},
        {"dropout": 0.0},
        {"dropout": 0.999},
        {"attention": {"type": "gqa", "num_kv_heads": 1}},
        {"hidden_size": 24, "position": {"type": "rope", "rotary_fraction": 0.5}, "num_heads": 2},
    ):
        resolve_model_config(small_model_dict(**changes))


def test_small_intermediate_size_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="composer"):
        resolve_model_config(small_model_dict(ffn={"type": "mlp", "intermediate_size": 16}))
    assert any(
        "model.ffn.intermediate_size" in r.getMessage() and "smaller than hidden_size 32" in r.getMessage()
        for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="composer"):
        resolve_model_config(small_model_dict(ffn={"type": "mlp", "intermediate_size": 64}))
    assert not caplog.records


def test_all_problems_reported_together_with_full_paths():
    raw = small_model_dict(
        num_layers=3,
        dropout=2.0,
        attention={"type": "gqa", "num_kv_head": 2},
        ffn={"type": "swigloo"},
        layers=[{"select": "0", "attention": {"type": "gqa", "num_kv_heads": 3}}, {"select": [7], "norm": "rmsnorm"}],
    )
    err = problems_of(raw)
    assert set(paths(err)) >= {
        "model.dropout",
        "model.attention.num_kv_head",
        "model.ffn.type",
        "model.layers[0].attention.num_kv_heads",
        "model.layers[1].select[0]",
    }
    text = str(err)
    assert f"({len(err.problems)} problems)" in text
    for p in err.problems:
        assert p.path in text and p.fix, p


def test_missing_and_invalid_parameter_classes():
    raw = small_model_dict()
    del raw["hidden_size"]
    err = problems_of(raw)
    assert type(err) is MissingParameter and paths(err) == ["model.hidden_size"] and "is required" in str(err)
    err = problems_of(small_model_dict(head={"type": "classification"}))
    assert type(err) is MissingParameter and paths(err) == ["model.head.num_classes"]
    err = problems_of(small_model_dict(attention={"window": 3}))
    assert type(err) is MissingParameter and paths(err) == ["model.attention.type"]
    assert "mha" in str(err) and "sliding_window" in str(err)
    err = problems_of(small_model_dict(vocab_size="???"))  # OmegaConf's mandatory mark
    assert type(err) is MissingParameter
    err = problems_of(small_model_dict(num_heads=0))
    assert type(err) is InvalidParameter
    del raw["num_layers"]
    raw["dropout"] = 5.0
    err = problems_of(raw)
    assert type(err) is ConfigError and not isinstance(err, (MissingParameter, InvalidParameter))


@pytest.mark.parametrize(
    "family,bad,hint",
    [
        ("attention", "mqaa", "did you mean 'mqa'?"),
        ("ffn", "swigl", "did you mean 'swiglu'?"),
        ("norm", "rms_norm", "did you mean 'rmsnorm'?"),
        ("position", "rotary", ""),
        ("head", "classifier", "did you mean 'classification'?"),
        ("block", "prenorm", "did you mean 'pre_norm'?"),
    ],
)
def test_unknown_component_type_lists_registered_names(family, bad, hint):
    from composer.registry import FAMILIES

    err = problems_of(small_model_dict(**{family: {"type": bad}}))
    assert paths(err) == [f"model.{family}.type"]
    assert f"unknown {family} type {bad!r}" in str(err)
    assert f"registered {family} types: {', '.join(FAMILIES[family].names())}" in str(err)
    assert hint in str(err)


def test_bad_dotted_plugin_path_is_a_config_error():
    for bad in ("no_such_pkg.Attention", "os.path", "torch.nn.NoSuchClass"):
        err = problems_of(small_model_dict(attention={"type": bad}))
        assert paths(err) == ["model.attention.type"] and bad in str(err)


# ============================================================================ layer selection
@pytest.mark.parametrize(
    "select,want",
    [
        ("1::2", [1, 3]),
        ("::2", [0, 2, 4]),
        ("-2:", [3, 4]),
        (":2", [0, 1]),
        ("1:4:2", [1, 3]),
        ("::-1", [0, 1, 2, 3, 4]),
        (3, [3]),
        (-1, [4]),
        ("-5", [0]),
        ("2", [2]),
        ([0, -1], [0, 4]),
        ([4, 1, 1], [1, 4]),
    ],
)
def test_layer_selection_semantics(select, want):
    problems = []
    assert sorted(parse_select(select, 5, "model.layers[0].select", problems)) == want
    assert not problems
    cfg = resolve_model_config(small_model_dict(num_layers=5, layers=[{"select": select, "attention": "mqa"}]))
    assert [i for i in range(5) if cfg.layer(i).attention.type == "mqa"] == want


@pytest.mark.parametrize(
    "select,fragment",
    [
        (5, "layer 5 does not exist (the model has 5 layers)"),
        (-6, "layer -6 does not exist"),
        ("10:", "selects no layer of 5"),
        ("::0", "step must not be zero"),
        ("a:b", "invalid layer selection"),
        ("1-3", "invalid layer selection"),
        ([], "invalid layer selection"),
        ([1, "x"], "must be an integer"),
        (1.5, "invalid layer selection"),
        (True, "invalid layer selection"),
        ({"a": 1}, "invalid layer selection"),
    ],
)
def test_bad_layer_selection(select, fragment):
    err = problems_of(small_model_dict(num_layers=5, layers=[{"select": select, "attention": "mqa"}]))
    assert any(p.startswith("model.layers[0].select") for p in paths(err)), str(err)
    assert fragment in str(err)


def test_override_needs_select_and_a_component():
    err = problems_of(small_model_dict(layers=[{"attention": "mqa"}]))
    assert "model.layers[0].select" in paths(err) and type(err) is MissingParameter
    err = problems_of(small_model_dict(layers=[{"select": 0}]))
    assert "model.layers[0]" in paths(err) and "overrides no component" in str(err)
    err = problems_of(small_model_dict(layers=[{"select": None, "attention": "mqa"}]))
    assert "model.layers[0].select" in paths(err)


def test_learned_position_cannot_be_per_layer():
    err = problems_of(small_model_dict(position={"type": "rope"}, layers=[{"select": 0, "position": "learned"}]))
    assert paths(err) == ["model.layers[0].position.type"] and "cannot differ per layer" in str(err)


# ============================================================================ overrides build the layer
def test_per_layer_overrides_change_the_built_layer():
    raw = small_model_dict(
        num_layers=3,
        position={"type": "alibi"},
        layers=[
            {
                "select": [1],
                "block": {"type": "parallel"},
                "attention": {"type": "gqa", "num_kv_heads": 2, "qk_norm": True},
                "ffn": {"type": "swiglu", "intermediate_size": 48},
                "norm": {"type": "rmsnorm", "eps": 1e-3},
                "position": {"type": "rope", "theta": 100.0},
            }
        ],
    )
    model = compose(raw, seed=0)
    plain, changed = model.layers[0], model.layers[1]
    assert type(plain) is PreNormBlock and type(changed) is ParallelBlock
    assert plain.attn.num_kv_heads == 4 and changed.attn.num_kv_heads == 2 and changed.attn.q_norm is not None
    assert type(plain.ffn) is MLP and type(changed.ffn) is GatedMLP and changed.ffn.intermediate_size == 48
    assert type(plain.attn_norm) is LayerNorm and type(changed.attn_norm) is RMSNorm and changed.attn_norm.eps == 1e-3
    assert model.layer_position(1) is not model.position and model.layer_position(1).cfg.theta == 100.0
    assert model.layer_position(0) is model.position and type(model.layers[2]) is PreNormBlock
    assert model.state_dict()["layers.1.attn.qkv.weight"].shape == ((4 + 2 * 2) * 8, 32)
    out = model(torch.randint(0, 64, (2, 6)))
    assert out.logits.shape == (2, 6, 64)


def test_type_change_carries_shared_options_and_drops_others():
    cfg = resolve_model_config(
        small_model_dict(
            num_layers=3,
            attention={"type": "sliding_window", "window": 8, "bias": True, "qk_norm": True, "num_kv_heads": 2},
            layers=[
                {"select": 0, "attention": {"type": "mha"}},
                {"select": 1, "attention": {"type": "gqa"}},
                {"select": "1:", "attention": {"bias": False}},
            ],
        )
    )
    l0, l1, l2 = (cfg.layer(i).attention for i in range(3))
    assert l0.type == "mha" and l0.bias and l0.qk_norm and not hasattr(l0, "window")
    assert l1.type == "gqa" and l1.num_kv_heads == 2 and l1.qk_norm and not l1.bias, "later overrides stack"
    assert l2.type == "sliding_window" and l2.window == 8 and not l2.bias


def test_override_isolated_from_other_layers_and_model_config():
    cfg = resolve_model_config(small_model_dict(num_layers=2, layers=[{"select": 1, "ffn": {"activation": "relu"}}]))
    assert cfg.layer(1).ffn.activation == "relu" and cfg.layer(0).ffn.activation == "gelu"
    assert cfg.ffn.activation == "gelu" and cfg.layer(0).ffn is cfg.ffn


# ============================================================================ to_dict / replace
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"dropout": 0.1, "attention": {"type": "gqa", "num_kv_heads": 2, "dropout": 0.2}, "position": "rope"},
        {
            "num_layers": 4,
            "layers": [
                {"select": "1::2", "attention": {"type": "sliding_window", "window": 3}},
                {"select": [0], "ffn": component("moe")},
            ],
            "head": component("classification"),
        },
    ],
)
def test_to_dict_round_trips(changes):
    cfg = resolve_model_config(small_model_dict(**changes))
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data, "plain JSON-able data"
    again = resolve_model_config(data)
    assert again == cfg
    assert again.layer_specs() == cfg.layer_specs()
    assert again.to_dict() == data


def test_to_dict_saves_inherited_values_as_null():
    cfg = resolve_model_config(small_model_dict(dropout=0.1, attention={"type": "gqa", "dropout": 0.3}))
    assert cfg.attention.dropout == 0.3 and cfg.ffn.dropout == 0.1 and cfg.attention.num_heads == 4
    data = cfg.to_dict()
    assert data["attention"]["dropout"] == 0.3, "explicit values stay"
    assert data["ffn"]["dropout"] is None and data["ffn"]["intermediate_size"] is None
    assert data["attention"]["num_heads"] is None and data["attention"]["num_kv_heads"] is None
    # so changing the model-wide value later still flows into the components
    wider = cfg.replace(dropout=0.2, hidden_size=64)
    assert wider.ffn.dropout == 0.2 and wider.ffn.intermediate_size == 256 and wider.attention.head_dim == 16


def test_replace_revalidates_and_leaves_the_original():
    cfg = resolve_model_config(small_model_dict())
    deeper = cfg.replace(num_layers=5, name="deeper")
    assert isinstance(deeper, ModelConfig) and deeper.num_layers == 5 and len(deeper.layer_specs()) == 5
    assert cfg.num_layers == 2 and cfg.name == ""
    with pytest.raises(InvalidParameter, match="not divisible by num_heads=5"):
        cfg.replace(num_heads=5)
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        cfg.replace(num_layer=3)
