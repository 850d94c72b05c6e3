"""Property tests (hypothesis): random valid configs compose and keep the shape invariants;
random invalid configs always raise ConfigError and nothing else."""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composer import ConfigError, compose, resolve_model_config
from composer.registry import FAMILIES
from composer.schema import ModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small example counts keep the file at a few seconds; a run with max_examples=500 passed too.
VALID_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INVALID_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ============================================================================ valid configs
# One strategy per built-in component, given the model's sizes. Every built-in must have one
# (test_every_component_has_a_strategy), so a new component joins the property tests.
def _attention(kind: str):
    def make(draw, s: dict) -> dict:
        out: dict[str, Any] = {
            "type": kind,
            "bias": draw(st.booleans()),
            "qk_norm": draw(st.sampled_from([False, True, "per_head", "across_heads"])),
            "causal": draw(st.booleans()) if kind != "sliding_window" else True,
            "output_gate": draw(st.sampled_from(["none", "headwise", "elementwise"])),
            "sinks": draw(st.booleans()),
        }
        if draw(st.booleans()):
            out["query_pre_attn_scalar"] = draw(st.sampled_from([16.0, 256.0]))
        if draw(st.booleans()):
            out["logit_softcap"] = draw(st.sampled_from([5.0, 30.0]))
        if kind in ("gqa", "sliding_window"):
            out["num_kv_heads"] = draw(st.sampled_from([d for d in range(1, s["heads"] + 1) if s["heads"] % d == 0]))
        if kind == "sliding_window":
            out["window"] = draw(st.integers(1, s["max_pos"]))
        if s.get("layer_heads"):  # a per-layer override may change the number of heads (and head_dim)
            out["num_heads"] = s["heads"]
        return out

    return make


def _mla(draw, s: dict) -> dict:
    """Latent attention (components/mla.py) at small sizes; rope dims a multiple of 4, so rope rotates an
    even number of them at any rotary_fraction drawn."""
    out: dict[str, Any] = {
        "type": "mla",
        "q_lora_rank": draw(st.sampled_from([None, 3])),
        "kv_lora_rank": draw(st.integers(1, 6)),
        "qk_nope_head_dim": draw(st.integers(1, 4)),
        "qk_rope_head_dim": draw(st.sampled_from([4, 8])),
        "v_head_dim": draw(st.integers(1, 5)),
        "bias": draw(st.booleans()),
        "causal": draw(st.booleans()),
        "form": draw(st.sampled_from(["auto", "absorbed"])),
    }
    if draw(st.booleans()):
        out["logit_softcap"] = draw(st.sampled_from([5.0, 30.0]))
    if s.get("layer_heads"):
        out["num_heads"] = s["heads"]
    return out


def _ffn(kind: str):
    def make(draw, s: dict) -> dict:
        if kind == "mlp":
            return {
                "type": "mlp",
                "intermediate_size": draw(st.integers(4, 24)),
                "bias": draw(st.booleans()),
                "activation": draw(st.sampled_from(["gelu", "gelu_tanh", "relu", "silu", "relu2"])),
            }
        if kind.startswith("moe"):
            experts = draw(st.integers(1, 3))
            expert = draw(
                st.sampled_from([{"type": "mlp", "intermediate_size": 8}, {"type": "swiglu", "intermediate_size": 8}])
            )
            groups = {"n_group": 1, "topk_group": None} if kind == "moe_deepseek" else {}  # its default: 4 groups
            top_k = draw(st.integers(1, experts))
            return {"type": kind, "num_experts": experts, "top_k": top_k, "expert": expert, **groups}
        return {"type": kind, "multiple_of": draw(st.sampled_from([4, 8])), "bias": draw(st.booleans())}

    return make


def _position(kind: str):
    def make(draw, s: dict) -> dict:
        if kind == "rope":
            fractions = [f for f in (1.0, 0.5) if int(s["head_dim"] * f) % 2 == 0]
            return {
                "type": "rope",
                "rotary_fraction": draw(st.sampled_from(fractions)),
                "scaling": draw(st.sampled_from(["none", "linear", "llama3"])),
                "scaling_factor": 2.0,
                "original_max_position_embeddings": 16,
            }
        return {"type": kind}

    return make


def _mixer(kind: str):
    """The linear-time mixers (components/mamba2.py, gated_deltanet.py, gla.py): small states, any chunk."""

    def make(draw, s: dict) -> dict:
        out: dict[str, Any] = {"type": kind, "chunk_size": draw(st.integers(1, 8)), "form": "auto"}
        if kind == "mamba2":
            heads = draw(st.integers(1, 3))
            out.update(num_heads=heads, head_dim=draw(st.sampled_from([4, 8])), state_size=draw(st.integers(1, 4)))
            out.update(n_groups=draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0])))
        elif kind == "gated_deltanet":
            out["num_key_heads"] = draw(st.sampled_from([d for d in range(1, s["heads"] + 1) if s["heads"] % d == 0]))
            out.update(allow_neg_eigval=draw(st.booleans()), conv_size=draw(st.integers(1, 4)))
        else:
            out.update(feature_map=draw(st.sampled_from(["none", "relu", "elu_plus_one"])))
            out.update(use_output_gate=draw(st.booleans()), conv_size=draw(st.sampled_from([0, 2])))
        if kind != "mamba2":
            out["num_heads"] = s["heads"]
        return out

    return make


COMPONENT_STRATEGIES = {
    "attention": {
        **{k: _attention(k) for k in ("mha", "gqa", "mqa", "sliding_window")},
        **{k: _mixer(k) for k in ("mamba2", "gated_deltanet", "gla")},
        "mla": _mla,
    },
    "ffn": {
        **{k: _ffn(k) for k in ("mlp", "swiglu", "geglu", "swiglu_clamped", "moe", "moe_deepseek", "moe_gpt_oss")},
        "none": lambda draw, s: {"type": "none"},  # no feed-forward (Mamba-2 layers); every block drawn skips it
    },
    "norm": {
        "layernorm": lambda draw, s: {"type": "layernorm", "bias": draw(st.booleans())},
        "rmsnorm": lambda draw, s: {"type": "rmsnorm", "eps": 1e-6},
    },
    "position": {k: _position(k) for k in ("learned", "rope", "alibi", "none")},
    "head": {
        "lm": lambda draw, s: {
            "type": "lm",
            "bias": draw(st.booleans()),
            "logit_softcap": draw(st.sampled_from([None, 10.0])),
        },
        "classification": lambda draw, s: {
            "type": "classification",
            "num_classes": draw(st.integers(2, 4)),
            "pooling": draw(st.sampled_from(["last", "mean", "first"])),
        },
    },
    "block": {
        "pre_norm": lambda draw, s: {"type": "pre_norm"},
        "post_norm": lambda draw, s: {"type": "post_norm"},
        "parallel": lambda draw, s: {"type": "parallel", "shared_norm": draw(st.booleans())},
        "post_sublayer": lambda draw, s: {"type": "post_sublayer"},
        "sandwich": lambda draw, s: {"type": "sandwich"},
    },
}


def test_every_component_has_a_strategy():
    for family, reg in FAMILIES.items():
        builtins = {n for n in reg.names() if reg.get(n).cls.__module__.startswith("components.")}
        missing = builtins - set(COMPONENT_STRATEGIES[family])
        assert not missing, f"add a {family} strategy for {sorted(missing)}"


def _component(draw, family: str, s: dict, exclude: tuple = ()) -> dict:
    name = draw(st.sampled_from(sorted(set(COMPONENT_STRATEGIES[family]) - set(exclude))))
    return COMPONENT_STRATEGIES[family][name](draw, s)


def _select(draw, layers: int) -> Any:
    index = st.integers(-layers, layers - 1)
    return draw(
        st.one_of(
            index,
            index.map(str),
            st.lists(index, min_size=1, max_size=3),
            st.tuples(st.integers(0, layers - 1), st.integers(1, 2)).map(lambda a: f"{a[0]}::{a[1]}"),
            st.integers(1, layers).map(lambda n: f"-{n}:"),
        )
    )


@st.composite
def valid_configs(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    s = {"heads": heads, "head_dim": head_dim, "max_pos": draw(st.integers(8, 24)), "layers": draw(st.integers(1, 3))}
    cfg = {
        "vocab_size": draw(st.integers(8, 40)),
        "hidden_size": heads * head_dim,
        "num_layers": s["layers"],
        "num_heads": heads,
        "max_position_embeddings": s["max_pos"],
        "dropout": draw(st.sampled_from([0.0, 0.1])),
        "tie_embeddings": draw(st.booleans()),
        "pad_vocab_to_multiple_of": draw(st.sampled_from([1, 8])),
        "gradient_checkpointing": draw(st.sampled_from(["none", "every_layer", "every_2", "attention", "ffn"])),
    }
    for family in ("attention", "ffn", "norm", "position", "head", "block"):
        cfg[family] = _component(draw, family, s)
    cfg["layers"] = []
    for _ in range(draw(st.integers(0, 2))):
        family = draw(st.sampled_from(["attention", "ffn", "norm", "position", "block"]))
        # learned positions are model-wide only; a type change keeps the shared options
        here = dict(s)
        if family == "attention":  # overrides of one layer stack: each states its heads, which its kv heads divide
            here["layer_heads"] = True
            if draw(st.booleans()):
                hidden = heads * head_dim  # other head counts whose head_dim rope can rotate at any fraction
                here["heads"] = draw(
                    st.sampled_from(
                        [h for h in range(1, hidden + 1) if hidden % h == 0 and (hidden // h) % 4 == 0] or [heads]
                    )
                )
        override = _component(draw, family, here, exclude=("learned",) if family == "position" else ())
        cfg["layers"].append({"select": _select(draw, s["layers"]), family: override})
    return cfg


@VALID_SETTINGS
@given(raw=valid_configs(), batch=st.integers(1, 2), data=st.data())
def test_valid_configs_compose_and_keep_shapes(raw, batch, data):
    model = compose(raw, seed=0).eval()
    cfg = model.config
    assert model.num_parameters() > 0
    t = data.draw(st.integers(1, cfg.max_position_embeddings), label="seq_len")
    x = torch.randint(0, cfg.vocab_size, (batch, t))
    with torch.no_grad():
        out = model(x)
    if cfg.head.type == "classification":
        assert out.logits.shape == (batch, cfg.head.num_classes)
    else:
        assert out.logits.shape == (batch, t, cfg.padded_vocab_size)
        out.logits = out.logits[..., : cfg.vocab_size]
    assert torch.isfinite(out.logits).all()
    # the resolved config is a fixed point
    assert resolve_model_config(cfg.to_dict()) == cfg


PATTERN_KINDS = ("mha", "gqa", "mqa", "sliding_window", "mamba2", "gated_deltanet", "gla", "mla")


@st.composite
def patterned_configs(draw) -> tuple[dict, list[str]]:
    """A valid config whose mixers come from a ``layer_pattern`` (the list or the first/last/cycle form,
    ``name*k`` repeats) with ``mixers`` options per type, and the mixer type each layer should get."""
    cfg = draw(valid_configs())
    s = {"heads": cfg["num_heads"], "head_dim": cfg["hidden_size"] // cfg["num_heads"], "layer_heads": True}
    s["max_pos"], n = cfg["max_position_embeddings"], draw(st.integers(1, 6))
    kinds = draw(st.lists(st.sampled_from(PATTERN_KINDS), min_size=1, max_size=3))
    repeats = [draw(st.integers(1, 2)) for _ in kinds]
    cycle = [k if r == 1 else f"{k}*{r}" for k, r in zip(kinds, repeats, strict=True)]
    order = [k for k, r in zip(kinds, repeats, strict=True) for _ in range(r)]
    first = draw(st.lists(st.sampled_from(PATTERN_KINDS), max_size=min(1, n - 1)))
    last = draw(st.lists(st.sampled_from(PATTERN_KINDS), max_size=min(1, n - 1 - len(first))))
    middle = n - len(first) - len(last)
    expected = first + [order[i % len(order)] for i in range(middle)] + last
    pattern: Any = cycle if not (first or last) else {"cycle": cycle, "first": first, "last": last}
    if isinstance(pattern, dict) and middle % len(order) == 0:
        pattern["exact"] = draw(st.booleans())  # the cycle tiles the unpinned layers: exact may be asked
    mixers = {}
    for kind in set(expected):
        options = COMPONENT_STRATEGIES["attention"][kind](draw, s)
        mixers[kind] = {k: v for k, v in options.items() if k != "type"}
    # the model-wide mixer is a bare type: options a type change carries over are tested elsewhere
    cfg.update(num_layers=n, layer_pattern=pattern, mixers=mixers, layers=[], attention={"type": expected[0]})
    if cfg["position"]["type"] == "learned" or cfg["ffn"]["type"] == "none":
        cfg["position"], cfg["ffn"] = {"type": "rope"}, {"type": "swiglu"}
    return cfg, expected


@VALID_SETTINGS
@given(drawn=patterned_configs(), data=st.data())
def test_layer_patterns_compose_to_the_mixer_each_layer_was_given(drawn, data):
    raw, expected = drawn
    model = compose(raw, seed=0).eval()
    cfg = model.config
    assert [cfg.layer(i).attention.type for i in range(cfg.num_layers)] == expected
    for i in range(cfg.num_layers):  # the mixers' options reach every layer of their type
        given = raw["mixers"][expected[i]]
        assert {k: getattr(cfg.layer(i).attention, k) for k in given} == given
    t = data.draw(st.integers(1, cfg.max_position_embeddings), label="seq_len")
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (1, t))).logits
    assert torch.isfinite(logits[..., : cfg.vocab_size] if logits.dim() == 3 else logits).all()  # padding: -inf
    assert resolve_model_config(cfg.to_dict()) == cfg


@VALID_SETTINGS
@given(drawn=patterned_configs(), extra=st.integers(1, 3))
def test_a_cycle_that_cannot_tile_exactly_is_named(drawn, extra):
    raw, expected = drawn
    cycle = raw["layer_pattern"]["cycle"] if isinstance(raw["layer_pattern"], dict) else raw["layer_pattern"]
    length = sum(int(k.split("*")[1]) if "*" in k else 1 for k in cycle)
    if extra % length == 0:
        return  # these layers still tile
    raw = {**raw, "num_layers": length * 2 + extra, "layer_pattern": {"cycle": cycle, "exact": True}}
    with pytest.raises(ConfigError, match=r"model\.layer_pattern"):
        compose(raw, device="meta")


# ============================================================================ invalid configs
BASE = {"vocab_size": 16, "hidden_size": 8, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 16}
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
INT_FIELDS = [n for n, t in FIELD_TYPES.items() if t == "int"]
JUNK = st.one_of(
    st.text(string.ascii_letters, min_size=1, max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from("abc"), st.integers(), max_size=1),
    st.none(),
)


def _valid_names() -> set[str]:
    return {n for reg in FAMILIES.values() for n in reg.names()}


@st.composite
def wrong_types(draw) -> dict:
    field = draw(st.sampled_from(sorted(FIELD_TYPES)))
    kind = FIELD_TYPES[field]
    if kind == "int":
        bad = draw(st.one_of(JUNK, st.booleans(), st.floats(0.1, 0.9)))
    elif kind == "float":
        bad = draw(st.one_of(JUNK, st.booleans()))
    elif kind == "bool":
        bad = draw(st.one_of(JUNK, st.integers(0, 1), st.sampled_from(["true", "yes"])))
    elif kind == "str":
        bad = draw(st.one_of(st.integers(), st.lists(st.text(max_size=2), max_size=2), st.booleans()))
    elif kind == "list":
        bad = draw(st.one_of(st.text(max_size=3), st.integers(), st.dictionaries(st.text(max_size=2), st.integers())))
    elif kind == "dict" or field == "layer_pattern":  # layer_pattern: a list, a mapping or null
        bad = draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans()))
    else:  # a component slot
        bad = draw(
            st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers()), st.none())
        )
    # component options of the wrong type
    option = draw(
        st.sampled_from(
            [
                None,
                ("attention", {"type": "mha", "bias": "no"}),
                ("ffn", {"type": "mlp", "intermediate_size": "big"}),
                ("norm", {"type": "rmsnorm", "eps": [1e-5]}),
                ("head", {"type": "lm", "logit_softcap": "cap"}),
            ]
        )
    )
    if option is not None and draw(st.booleans()):
        return {**BASE, option[0]: option[1]}
    return {**BASE, field: bad}


@st.composite
def bad_values(draw) -> dict:
    return {
        **BASE,
        **draw(
            st.one_of(
                st.sampled_from(INT_FIELDS).flatmap(lambda f: st.integers(-5, 0).map(lambda v: {f: v})),
                st.sampled_from([3, 5, 6, 7]).map(lambda h: {"num_heads": h}),
                st.one_of(st.floats(1.0, 10.0), st.floats(-10.0, -0.001)).map(lambda p: {"dropout": p}),
                st.sampled_from(["attention", "ffn", "block"]).flatmap(
                    lambda f: st.floats(1.0, 5.0).map(
                        lambda p: {
                            f: {"type": {"attention": "mha", "ffn": "mlp", "block": "pre_norm"}[f], "dropout": p}
                        }
                    )
                ),
                st.integers(-3, 0).map(lambda w: {"attention": {"type": "sliding_window", "window": w}}),
                st.integers(17, 100).map(lambda w: {"attention": {"type": "sliding_window", "window": w}}),
                st.just({"head": {"type": "classification"}}),
                st.just({"attention": {"type": "gqa", "num_kv_heads": 3}}),
                st.just({"hidden_size": 6, "position": {"type": "rope"}}),
                st.sampled_from([1, 3, 5, 7]).map(
                    lambda d: {
                        "position": {"type": "rope"},
                        "layers": [{"select": 0, "attention": {"type": "mha", "head_dim": d}}],
                    }
                ),  # rope vs a layer's own head_dim
                st.just(
                    {
                        "position": {"type": "rope", "rotary_fraction": 0.5},
                        "layers": [{"select": -1, "attention": {"type": "gqa", "num_heads": 4, "num_kv_heads": 2}}],
                    }
                ),
                st.floats(1.01, 3.0).map(lambda f: {"position": {"type": "rope", "rotary_fraction": f}}),
                st.integers(3, 9).map(lambda k: {"ffn": {"type": "moe", "num_experts": 2, "top_k": k}}),
                st.just({"ffn": {"type": "moe", "expert": {"type": "moe"}}}),
                st.integers(-2, 1).map(lambda k: {"head": {"type": "classification", "num_classes": k}}),
                st.just({"head": {"type": "classification"}}),
                st.text(string.ascii_lowercase, min_size=1, max_size=6)
                .filter(lambda s: s not in ("none", "attention", "ffn"))
                .map(lambda m: {"gradient_checkpointing": m}),
                st.text(string.ascii_lowercase, min_size=1, max_size=6)
                .filter(lambda s: s not in ("gelu", "relu", "silu"))
                .map(lambda a: {"ffn": {"type": "mlp", "activation": a}}),
                st.floats(-1.0, -0.001).map(lambda s: {"init_std": s}),
            )
        ),
    }


@st.composite
def unknown_keys(draw) -> dict:
    key = draw(st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
    where = draw(st.sampled_from(["model", "attention", "ffn", "norm", "position", "head", "block", "layer"]))
    raw = dict(BASE)
    if where == "model":
        if key in FIELD_TYPES:
            key += "_x"
        raw[key] = 1
    elif where == "layer":
        if key in ("select", "block", "attention", "ffn", "norm", "position"):
            key += "_x"
        raw["layers"] = [{"select": 0, "attention": "mha", key: 1}]
    else:
        defaults = {
            "attention": "mha",
            "ffn": "mlp",
            "norm": "layernorm",
            "position": "rope",
            "head": "lm",
            "block": "pre_norm",
        }
        fields = {f.name for f in dataclasses.fields(FAMILIES[where].get(defaults[where]).config)}
        if key in fields:
            key += "_x"
        raw[where] = {"type": defaults[where], key: 1}
    return raw


BAD_SELECTIONS = st.one_of(
    st.integers(2, 50),
    st.integers(-50, -3),
    st.lists(st.integers(2, 9), min_size=1, max_size=3),
    st.just([]),
    st.lists(st.sampled_from(["x", 1.5, None, True]), min_size=1, max_size=2),
    st.sampled_from(["::0", "5:", "2:9", "a", "1-2", "", "0:1:2:3", "--1"]),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@st.composite
def bad_selections(draw) -> dict:
    return {**BASE, "layers": [{"select": draw(BAD_SELECTIONS), "ffn": {"type": "swiglu"}}]}


@st.composite
def nonsense_types(draw) -> dict:
    family = draw(st.sampled_from(["attention", "ffn", "norm", "position", "head", "block"]))
    kind = draw(
        st.one_of(
            st.text(string.ascii_letters + "_-", min_size=1, max_size=10).filter(lambda s: s not in _valid_names()),
            st.from_regex(r"nonexistent_pkg_[a-z]{1,5}\.[A-Z][a-z]{1,5}", fullmatch=True),
            st.integers(),
            st.lists(st.text(max_size=2), max_size=2),
            st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
            st.booleans(),
        )
    )
    if draw(st.booleans()):
        return {**BASE, family: {"type": kind}}
    layer_family = family if family != "head" else "norm"
    return {**BASE, "layers": [{"select": 0, layer_family: {"type": kind}}]}


@INVALID_SETTINGS
@given(raw=st.one_of(wrong_types(), bad_values(), unknown_keys(), bad_selections(), nonsense_types()))
def test_invalid_configs_raise_config_error_only(raw):
    with pytest.raises(ConfigError) as info:
        compose(raw, device="meta")
    err = info.value
    assert err.problems and all(p.path.startswith("model") for p in err.problems), str(err)
    assert str(err).startswith("invalid configuration")
