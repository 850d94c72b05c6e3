"""Qwen3 (``model_type: qwen3``, ``Qwen3ForCausalLM``): Llama's layout plus an RMSNorm on each query and
key head before the rotary embedding (``qk_norm: per_head``, eps = rms_norm_eps), a head_dim of its own
(128 unless the config says otherwise, not hidden / heads), ``attention_bias`` on all four projections,
and optionally a sliding window on the layers from ``max_window_layers`` on (``layer_types``), which
becomes per-layer overrides here. Rope: default, linear, llama3 or YaRN (Qwen3's long-context setting).

The parameter table is llama.py's plus the two norms.
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig
from .common import Exporting, Family, HFConfig, attention_from_heads, copy, differing_slots
from .llama import RULES as LLAMA_RULES
from .rope_scaling import rope_from_hf_scaled, rope_to_hf_scaled

L = "model.layers.{i}"
RULES = (
    *LLAMA_RULES,
    copy("layers.{i}.attn.q_norm.weight", f"{L}.self_attn.q_norm.weight"),
    copy("layers.{i}.attn.k_norm.weight", f"{L}.self_attn.k_norm.weight"),
)
SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_HEAD_DIM = 128  # Qwen3Config's default (4.x and 5.x)


def layer_types(c: HFConfig, num_layers: int) -> tuple[list[str], Any]:
    """Each layer's attention type and the window (None: no sliding layer). transformers drops the window
    unless ``use_sliding_window``; without ``layer_types`` the layers from ``max_window_layers`` slide."""
    window = c.get("sliding_window", None, int, min=1, bound="max_position_embeddings")
    if not c.get("use_sliding_window", False, bool):
        window = None
    given = c.get("layer_types")
    if isinstance(given, list) and len(given) == num_layers:
        types = [SLIDING if t == SLIDING else FULL for t in given]
    else:
        first = c.get("max_window_layers", num_layers, int, min=0)
        types = [SLIDING if i >= first else FULL for i in range(num_layers)]
    if window is None:
        types = [FULL] * num_layers
    return types, window


def attention_dict(c: HFConfig, heads: int, kv_heads: int, head_dim: int, bias: bool) -> dict[str, Any]:
    return {
        **attention_from_heads(heads, kv_heads),
        "head_dim": head_dim,
        "bias": bias,
        "out_bias": bias,
        "dropout": c.get("attention_dropout", 0.0, float),
    }


def with_windows(attention: dict[str, Any], types: list[str], window: Any, heads: int, kv_heads: int, max_pos: int):
    """The model-wide attention and the overrides of the sliding layers."""
    if SLIDING not in types or window >= max_pos:
        return attention, []
    sliding = {**attention, **attention_from_heads(heads, kv_heads, window)}
    if FULL not in types:
        return sliding, []
    return attention, [{"select": [i for i, t in enumerate(types) if t == SLIDING], "attention": sliding}]


def to_composer(c: HFConfig) -> dict[str, Any]:
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    layers, max_pos = c.need("num_hidden_layers"), c.need("max_position_embeddings")
    kv_heads = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
    if c.get("hidden_act", "silu", str) not in ("silu", "swish"):
        c.fail("hidden_act", f"{c.get('hidden_act')!r} is not supported for qwen3", "SwiGLU here uses silu")
    eps = c.get("rms_norm_eps", 1e-6, float, min=0.0)
    head_dim = c.get("head_dim", DEFAULT_HEAD_DIM, int, min=1, bound="head_dim")
    attention = attention_dict(c, heads, kv_heads, head_dim, c.get("attention_bias", False, bool))
    attention.update(qk_norm="per_head", qk_norm_eps=eps)
    types, window = layer_types(c, layers)
    attention, overrides = with_windows(attention, types, window, heads, kv_heads, max_pos)
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "max_position_embeddings": max_pos,
        "dropout": 0.0,
        "block": {"type": "pre_norm"},
        "attention": attention,
        "ffn": {"type": "swiglu", "intermediate_size": c.need("intermediate_size"), "bias": False},
        "norm": {"type": "rmsnorm", "eps": eps},
        "position": rope_from_hf_scaled(c, "qwen3"),
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0),
        "layers": overrides,
        "name": "qwen3",
    }


# ----------------------------------------------------------------------------- export
def attention_key(a: Any) -> tuple:
    """What must agree across layers (all but the window)."""
    return (a.num_heads, a.kv_heads(), a.head_dim, a.bias, a.out_bias, a.qk_norm_placement(), a.qk_norm_eps)


def check_layers_alike(e: Exporting, family: str) -> list[int]:
    """The sliding layers; a problem unless every layer is alike but for one window on the sliding ones."""
    specs = e.cfg.layer_specs()
    sliding = [s.index for s in specs if s.attention.type == "sliding_window"]
    mixed = differing_slots(e.cfg)
    attns = [s.attention for s in specs]
    alike = len({attention_key(a) for a in attns}) == 1 and len({attns[i].window for i in sliding}) <= 1
    if mixed and (set(mixed) != {"attention"} or not alike):
        slot, layer = next(iter(mixed.items()))
        e.no(
            "layers",
            f"layer {layer} has a different {slot} than layer 0; Hugging Face {family} uses the same components "
            "in every layer (but for a sliding window on some)",
            "remove the per-layer override",
        )
    return sliding


def check_qk_norms(e: Exporting, a: Any, norm_eps: float, placement: str, zero_centred: bool = False) -> None:
    """The q/k norms a family's checkpoint holds: normalised ``placement`` (per_head / across_heads), scaled by
    (1 + weight) when ``zero_centred`` and by the weight otherwise, with the model norms' eps (rms_norm_eps)."""
    where = "per head" if placement == "per_head" else "across heads"
    e.require(
        a.qk_norm_placement() == placement,
        "attention.qk_norm",
        f"{a.qk_norm!r}: q/k are normalised {where}",
        f"use qk_norm: {placement}",
    )
    e.require(
        bool(getattr(a, "qk_norm_zero_centred", False)) == zero_centred,
        "attention.qk_norm_zero_centred",
        f"its q/k norms scale by {'(1 + weight)' if zero_centred else 'their weight, not (1 + weight)'}",
        f"set qk_norm_zero_centred: {'true' if zero_centred else 'false'}",
    )
    e.require(
        a.qk_norm_eps == norm_eps,
        "attention.qk_norm_eps",
        f"{a.qk_norm_eps}: its q/k norms use rms_norm_eps ({norm_eps}, norm.eps)",
        "set qk_norm_eps equal to norm.eps",
    )


def check_plain_scores(e: Exporting, a: Any, family: str) -> None:
    """The score scale is 1/sqrt(head_dim) in these families."""
    scale = a.score_scale()
    e.require(
        scale is None or abs(scale - a.head_dim**-0.5) < 1e-12,
        "attention.softmax_scale" if a.softmax_scale is not None else "attention.query_pre_attn_scalar",
        f"{family} scales scores by 1/sqrt(head_dim)",
        "leave softmax_scale and query_pre_attn_scalar null",
    )


def match(e: Exporting) -> str:
    sliding = check_layers_alike(e, "qwen3")
    specs = e.cfg.layer_specs()
    base = next((s for s in specs if s.index not in sliding), specs[0])
    a = base.attention
    check_qk_norms(e, a, base.norm.eps, "per_head")
    e.require(a.bias == a.out_bias, "attention.out_bias", "attention_bias is on all four projections or none")
    e.require(base.position.rotary_fraction == 1.0, "position.rotary_fraction", "Qwen3 rotates whole heads")
    e.require(not base.ffn.bias, "ffn.bias", "Qwen3 has no feed-forward biases", "set ffn.bias: false")
    check_plain_scores(e, a, "qwen3")
    return "qwen3"


def window_entries(cfg: ModelConfig) -> dict[str, Any]:
    specs = cfg.layer_specs()
    sliding = [s.index for s in specs if s.attention.type == "sliding_window"]
    return {
        "use_sliding_window": bool(sliding),
        "sliding_window": specs[sliding[0]].attention.window if sliding else None,
        "layer_types": [SLIDING if s.index in sliding else FULL for s in specs],
        "max_window_layers": sliding[0] if sliding else cfg.num_layers,
    }


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    s = cfg.layer(0)
    a, f = s.attention, s.ffn
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": f.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.kv_heads(),
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": s.norm.eps,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        **window_entries(cfg),
        **rope_to_hf_scaled(s.position),
    }


FAMILY = Family(
    name="qwen3",
    model_types={"qwen3": "Qwen3ForCausalLM"},
    signature={
        "position": ("rope",),
        "norm": ("rmsnorm",),
        "ffn": ("swiglu",),
        "block": ("pre_norm",),
        "attention": ("mha", "gqa", "mqa", "sliding_window"),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    ignore=(r"rotary_emb\.inv_freq$",),
    prefix="model.",
    options=("qk_norm",),
)
