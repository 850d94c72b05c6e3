"""Gemma 2 (``gemma2``) and Gemma 3 text (``gemma3_text``, ``Gemma3ForCausalLM``).

Both are a sandwich block (a zero-centred RMSNorm, ``(1 + w)``, before and after attention and the
feed-forward), GeGLU with the tanh GELU, grouped-query attention scaled by
``query_pre_attn_scalar ** -0.5``, embeddings multiplied by sqrt(hidden_size), a tied head, and sliding
-window attention on some layers (``layer_types``: Gemma 2 every other layer from layer 0, Gemma 3 five
of every six). Gemma 2 soft-caps the attention scores (50) and the final logits (30); Gemma 3
normalises queries and keys per head (the same zero-centred RMSNorm) and gives its sliding layers
their own rotary base (``rope_local_base_freq``, 10,000; the full layers 1,000,000, with scaling).

Here the components of layer 0 (a sliding layer in every published Gemma) are the model's and the
layers of the other type are per-layer overrides of the attention (and, Gemma 3, the position).
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import Problem
from ..schema import ModelConfig, config_to_dict
from . import qwen3
from .common import (
    Exporting,
    Family,
    HFConfig,
    attention_from_heads,
    copy,
    differing_slots,
    rope_from_hf,
    rope_to_hf,
)

L = "model.layers.{i}"
# Qwen3's table (Llama's with per-head q/k norms), without the feed-forward biases Gemma does not have and
# with its four norms around the sub-layers (the feed-forward's pre-norm is not post_attention_layernorm)
NOT_GEMMA = {"layers.{i}.ffn_norm.weight", "layers.{i}.ffn.gate_up.bias", "layers.{i}.ffn.down.bias"}
RULES = (
    *(r for r in qwen3.RULES if r.ours not in NOT_GEMMA),
    copy("layers.{i}.post_attn_norm.weight", f"{L}.post_attention_layernorm.weight"),
    copy("layers.{i}.ffn_norm.weight", f"{L}.pre_feedforward_layernorm.weight"),
    copy("layers.{i}.post_ffn_norm.weight", f"{L}.post_feedforward_layernorm.weight"),
)
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA3_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}  # Gemma3TextConfig.default_theta


# ----------------------------------------------------------------------------- import
def _layer_types(c: HFConfig, num_layers: int) -> list[str]:
    """Which layers are sliding: 5.x ``layer_types``, else Gemma 2's every other layer from layer 0 or
    Gemma 3's ``sliding_window_pattern`` (4.x; 6: five sliding, then one full)."""
    given = c.get("layer_types")
    if given is not None:
        if isinstance(given, list) and len(given) == num_layers and set(given) <= {SLIDING, FULL}:
            return list(given)
        c.fail("layer_types", f"expected {num_layers} of {SLIDING} / {FULL}", "one entry per layer")
        return [FULL] * num_layers
    period = 2
    if c.model_type == "gemma3_text":
        period = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6, int, min=1), int, min=1)
    return [SLIDING if (i + 1) % period else FULL for i in range(num_layers)]


def _ropes(c: HFConfig) -> dict[str, dict[str, Any]]:
    """Each layer type's rope: Gemma 2 one for all; Gemma 3 5.x ``rope_parameters`` per layer type, or
    4.x ``rope_theta`` (+ ``rope_scaling``) on full layers and ``rope_local_base_freq`` on sliding ones
    (the defaults and precedence of Gemma3TextConfig.convert_rope_params_to_dict)."""
    if c.model_type != "gemma3_text":
        rope = rope_from_hf(c)
        return {SLIDING: rope, FULL: rope}
    params, scaling = c.get("rope_parameters", {}), c.get("rope_scaling")
    if not isinstance(params, dict) or not isinstance(scaling, (dict, type(None))):
        c.fail("rope_parameters", "expected a mapping", f"write it as {{{FULL}: {{...}}, {SLIDING}: {{...}}}}")
        params, scaling = {}, None
    legacy = {
        FULL: c.get("rope_theta", GEMMA3_THETA[FULL], float),
        SLIDING: c.get("rope_local_base_freq", GEMMA3_THETA[SLIDING], float),
    }
    out = {}
    for kind in (FULL, SLIDING):
        own = params.get(kind) or {"rope_type": "default"}
        if not isinstance(own, dict):
            c.fail(f"rope_parameters.{kind}", "expected a mapping", "write it as {rope_type: ..., rope_theta: ...}")
            own = {}
        own = {**own, **(scaling or {})} if kind == FULL else dict(own)
        own.setdefault("rope_theta", legacy[kind])
        sub = HFConfig({"rope_parameters": own}, c.path)
        out[kind] = rope_from_hf(sub)
        prefix = f"{c.path}:rope_parameters"
        c.problems += [
            Problem(p.path.replace(prefix, f"{prefix}.{kind}", 1), p.message, p.fix, p.missing) for p in sub.problems
        ]
    return out


def _optional(c: HFConfig, key: str, default: Optional[float]) -> Any:
    """``key``'s value where config.json has it (null: none), else the config class's ``default``."""
    return c.get(key, None, float) if key in c.data else default


def _attention(c: HFConfig, heads: int, window: Optional[int]) -> dict[str, Any]:
    kv_heads = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
    bias = c.get("attention_bias", False, bool)
    out: dict[str, Any] = {
        **attention_from_heads(heads, kv_heads, window),
        "head_dim": c.get("head_dim", 256, int, min=1, bound="head_dim"),
        "bias": bias,
        "out_bias": bias,
        "dropout": c.get("attention_dropout", 0.0, float),
        "query_pre_attn_scalar": c.get("query_pre_attn_scalar", 256.0, float, min=0.0),
        # Gemma 3 keeps attn_logit_softcapping in its config but never applies it (transformers 5)
        "logit_softcap": _optional(c, "attn_logit_softcapping", 50.0) if c.model_type == "gemma2" else None,
    }
    if c.model_type == "gemma3_text":  # per-head q/k norms: Gemma3RMSNorm, the layers' eps
        out.update(qk_norm=True, qk_norm_eps=c.get("rms_norm_eps", 1e-6, float, min=0.0), qk_norm_zero_centred=True)
    return out


def to_composer(c: HFConfig) -> dict[str, Any]:
    kind = c.model_type
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    layers, max_pos = c.need("num_hidden_layers"), c.need("max_position_embeddings")
    act = c.get("hidden_activation", c.get("hidden_act", "gelu_pytorch_tanh", str), str)
    if act != "gelu_pytorch_tanh":
        c.fail("hidden_activation", f"{act!r} is not supported for {kind}", "GeGLU here uses gelu_pytorch_tanh")
    if c.get("use_bidirectional_attention", False, bool):
        c.fail("use_bidirectional_attention", "bidirectional Gemma is not supported", "import a causal model")
    window = c.get("sliding_window", 4096, int, min=1, bound="max_position_embeddings")
    if "sliding_window" in c.data and c.data["sliding_window"] is None:
        window = None  # sliding layers that see everything
    types, ropes = _layer_types(c, layers), _ropes(c)
    kinds = {}
    for t in set(types):
        local = window if t == SLIDING and window is not None and window < max_pos else None
        kinds[t] = {"attention": _attention(c, heads, local), "position": ropes[t]}
    base = kinds[types[0]]
    overrides = []
    others = [i for i, t in enumerate(types) if t != types[0]]
    if others:
        other = kinds[types[others[0]]]
        changed = {slot: other[slot] for slot in ("attention", "position") if other[slot] != base[slot]}
        overrides = [{"select": others, **changed}] if changed else []
    eps = c.get("rms_norm_eps", 1e-6, float, min=0.0)
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "max_position_embeddings": max_pos,
        "dropout": 0.0,
        "block": {"type": "sandwich"},
        "attention": base["attention"],
        "ffn": {"type": "geglu", "intermediate_size": c.need("intermediate_size"), "bias": False},
        "norm": {"type": "rmsnorm", "eps": eps, "zero_centred": True},
        "position": base["position"],
        "head": {
            "type": "lm",
            "logit_softcap": _optional(c, "final_logit_softcapping", 30.0 if kind == "gemma2" else None),
        },
        "embedding_scale": "sqrt",
        "tie_embeddings": c.get("tie_word_embeddings", True, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0),
        "layers": overrides,
        "name": kind,
    }


# ----------------------------------------------------------------------------- export
def _attention_key(a: Any) -> tuple:
    """What every layer's attention must share (all but the window)."""
    return (
        a.num_heads,
        a.kv_heads(),
        a.head_dim,
        a.bias,
        a.out_bias,
        a.qk_norm,
        a.qk_norm_eps,
        a.qk_norm_zero_centred,
        a.score_scale(),
        a.logit_softcap,
        a.dropout,
    )


def _types(cfg: ModelConfig) -> list[str]:
    """Each layer's Hugging Face type: sliding where the attention has a window. Without one anywhere
    (Gemma 3 imported with a window as long as the context), the layers with layer 0's rope are sliding
    if another layer's rope differs, else every layer is full."""
    specs = cfg.layer_specs()
    if any(s.attention.window_size() for s in specs):
        return [SLIDING if s.attention.window_size() else FULL for s in specs]
    ropes = [config_to_dict(s.position) for s in specs]
    if all(r == ropes[0] for r in ropes):
        return [FULL] * len(specs)
    return [SLIDING if r == ropes[0] else FULL for r in ropes]


def _check_layers(e: Exporting, types: list[str]) -> None:
    """The layers differ at most in attention window and (Gemma 3) rope, the same for every layer of a type."""
    specs = e.cfg.layer_specs()
    mixed = set(differing_slots(e.cfg)) - {"attention", "position"}
    for slot in sorted(mixed):
        e.no("layers", f"a layer has a different {slot} than layer 0; Hugging Face Gemma uses the same in every layer")
    if len({_attention_key(s.attention) for s in specs}) > 1:
        e.no(
            "layers",
            "the layers' attention differs in more than its window; Gemma's layers differ only in that",
            "override only the attention type and window per layer",
        )
    for kind in (SLIDING, FULL):
        group = [s for s, t in zip(specs, types, strict=True) if t == kind]
        if len({s.attention.window_size() for s in group}) > 1:
            e.no("layers", f"the {kind} layers have different windows; Gemma has one sliding_window")
        if len({repr(config_to_dict(s.position)) for s in group}) > 1:
            e.no("layers", f"the {kind} layers have different position encodings; Gemma has one per layer type")


def match(e: Exporting) -> str:
    specs, cfg = e.cfg.layer_specs(), e.cfg
    types = _types(cfg)
    _check_layers(e, types)
    a, n, f = specs[0].attention, specs[0].norm, specs[0].ffn
    kind = "gemma3_text" if a.qk_norm else "gemma2"
    e.require(n.zero_centred, "norm.zero_centred", "Gemma's RMSNorm scales by (1 + w)", "set norm.zero_centred: true")
    e.require(not f.bias, "ffn.bias", "Gemma's feed-forward has no biases", "set ffn.bias: false")
    e.require(a.bias == a.out_bias, "attention.out_bias", "Gemma has biases on all or none of q, k, v, o")
    e.require(
        cfg.embedding_scale == "sqrt", "embedding_scale", "Gemma scales the embeddings", "set embedding_scale: sqrt"
    )
    if a.qk_norm:
        e.require(
            a.logit_softcap is None,
            "attention.logit_softcap",
            "Gemma 3 does not soft-cap attention scores (its attn_logit_softcapping is unused)",
            "set attention.logit_softcap: null",
        )
        e.require(
            a.qk_norm_placement() == "per_head" and a.qk_norm_zero_centred and a.qk_norm_eps == n.eps,
            "attention.qk_norm",
            "Gemma 3 normalises queries and keys per head with the layers' zero-centred RMSNorm",
            f"set attention.qk_norm: per_head, qk_norm_zero_centred: true, qk_norm_eps: {n.eps}",
        )
    scalar = _scalar(a)
    e.require(
        isinstance(scalar, int),
        "attention.query_pre_attn_scalar",
        f"{scalar}: Gemma's query_pre_attn_scalar is an integer (the score scale is its ** -0.5)",
        "use an integer query_pre_attn_scalar (or a softmax_scale of 1 / sqrt(an integer))",
    )
    for s in specs:
        e.require(s.position.rotary_fraction == 1.0, "position.rotary_fraction", "Gemma rotates whole heads", "use 1.0")
    ropes = {t: repr(config_to_dict(s.position)) for s, t in zip(specs, types, strict=True)}
    e.require(
        kind == "gemma3_text" or len(set(ropes.values())) == 1,
        "position",
        "Gemma 2 has one rope for every layer (Gemma 3, with qk_norm, has one per layer type)",
        "use the same position encoding in every layer",
    )
    return kind


def _scalar(a: Any) -> Any:
    """query_pre_attn_scalar (an integer where it is one, as Gemma's configs write it)."""
    scale = a.score_scale()
    value = float(a.head_dim) if scale is None else scale**-2.0
    if a.query_pre_attn_scalar is not None:
        value = a.query_pre_attn_scalar
    return int(round(value)) if abs(value - round(value)) < 1e-9 * max(1.0, value) else value


def _pattern(types: list[str]) -> Optional[int]:
    """The 4.x ``sliding_window_pattern`` that gives ``types`` (layer i full iff (i + 1) % p == 0), if any."""
    n = len(types)
    for p in range(1, n + 2):
        if types == [SLIDING if (i + 1) % p else FULL for i in range(n)]:
            return p
    return None


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    specs = cfg.layer_specs()
    types = _types(cfg)
    a, f = specs[0].attention, specs[0].ffn
    windows = [s.attention.window_size() for s in specs if s.attention.window_size()]
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": f.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.kv_heads(),
        "head_dim": a.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": specs[0].norm.eps,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        "query_pre_attn_scalar": _scalar(a),
        "attn_logit_softcapping": a.logit_softcap if model_type == "gemma2" else None,
        "final_logit_softcapping": cfg.head.logit_softcap,
        "sliding_window": windows[0] if windows else cfg.max_position_embeddings,
        "layer_types": types,
        "use_bidirectional_attention": False,
    }
    rope = {t: s.position for s, t in zip(specs, types, strict=True)}
    if model_type == "gemma2":
        return {**out, **rope_to_hf(specs[0].position)}
    full, local = rope.get(FULL, specs[0].position), rope.get(SLIDING, specs[0].position)
    legacy = rope_to_hf(full)
    out.update(
        rope_parameters={FULL: legacy["rope_parameters"], SLIDING: rope_to_hf(local)["rope_parameters"]},
        rope_theta=full.theta,
        # 4.x (Gemma 3 came with 4.50, which reads rope_type; 5.x merges rope_scaling into full_attention)
        rope_scaling={k: v for k, v in legacy["rope_scaling"].items() if k != "type"}
        if legacy["rope_scaling"]
        else None,
        rope_local_base_freq=local.theta,
    )
    pattern = _pattern(types)
    if pattern is not None:
        out["sliding_window_pattern"] = pattern
    return out


FAMILY = Family(
    name="gemma",
    model_types=ARCHITECTURES,
    signature={
        "position": ("rope",),
        "norm": ("rmsnorm",),
        "ffn": ("geglu",),
        "block": ("sandwich",),
        "attention": ("mha", "gqa", "mqa", "sliding_window"),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    ignore=(r"rotary_emb\.",),
    prefix="model.",
    options=(
        "qk_norm",
        "logit_softcap",
        "query_pre_attn_scalar",
        "head.logit_softcap",
        "embedding_scale",
        "norm.zero_centred",
    ),
)
