"""Llama and the models sharing its layout: Mistral (sliding window) and Qwen2 (qkv bias).

Rope (with linear or Llama 3 scaling), pre-norm RMSNorm, SwiGLU, grouped-query attention. Queries,
keys and values are separate projections in Hugging Face and one fused ``qkv`` here; gate and up
are fused into ``gate_up``. Qwen2 has biases on q/k/v but not on the output projection, and may
use a sliding window on some layers (``layer_types``), which becomes per-layer overrides here.
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig
from .common import (
    Exporting,
    Family,
    HFConfig,
    attention_from_heads,
    attention_rules,
    copy,
    differing_slots,
    rope_from_hf,
    rope_to_hf,
    swiglu_rules,
)

L = "model.layers.{i}"
RULES = (
    copy("embed.weight", "model.embed_tokens.weight", vocab=True),
    copy("layers.{i}.attn_norm.weight", f"{L}.input_layernorm.weight"),
    *attention_rules(f"{L}.self_attn"),
    copy("layers.{i}.ffn_norm.weight", f"{L}.post_attention_layernorm.weight"),
    *swiglu_rules(f"{L}.mlp"),
    copy("final_norm.weight", "model.norm.weight"),
    copy("head.proj.weight", "lm_head.weight", vocab=True),
)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SLIDING, FULL = "sliding_attention", "full_attention"


def _layer_types(c: HFConfig, num_layers: int) -> list[str]:
    """Which layers use the sliding window (Mistral: all when sliding_window is set)."""
    window = c.get("sliding_window", None, int, min=1, bound="max_position_embeddings")
    if c.model_type == "mistral":
        return [SLIDING if window is not None else FULL] * num_layers
    if c.model_type == "qwen2":
        given = c.get("layer_types")
        if isinstance(given, list) and len(given) == num_layers:
            return [SLIDING if t == SLIDING and window is not None else FULL for t in given]
        on = c.get("use_sliding_window", False, bool) and window is not None
        first = c.get("max_window_layers", num_layers, int, min=0)
        return [SLIDING if on and i >= first else FULL for i in range(num_layers)]
    return [FULL] * num_layers


def to_composer(c: HFConfig) -> dict[str, Any]:
    kind = c.model_type
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    layers, max_pos = c.need("num_hidden_layers"), c.need("max_position_embeddings")
    kv_heads = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
    if c.get("hidden_act", "silu", str) not in ("silu", "swish"):
        c.fail("hidden_act", f"{c.get('hidden_act')!r} is not supported for {kind}", "SwiGLU here uses silu")
    bias = c.get("attention_bias", False, bool) if kind == "llama" else kind == "qwen2"
    out_bias = c.get("attention_bias", False, bool) if kind == "llama" else False
    attention: dict[str, Any] = {
        **attention_from_heads(heads, kv_heads),
        "bias": bias,
        "out_bias": out_bias,
        "dropout": c.get("attention_dropout", 0.0, float),
    }
    head_dim = c.get("head_dim", None, int, min=1, bound="head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        attention["head_dim"] = head_dim
    types = _layer_types(c, layers)
    window = c.get("sliding_window", None, int, min=1, bound="max_position_embeddings")
    overrides: list[dict[str, Any]] = []
    if SLIDING in types and window < max_pos:
        sliding = {**attention, **attention_from_heads(heads, kv_heads, window)}
        if FULL not in types:
            attention = sliding
        else:
            overrides = [{"select": [i for i, t in enumerate(types) if t == SLIDING], "attention": sliding}]
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "max_position_embeddings": max_pos,
        "dropout": 0.0,
        "block": {"type": "pre_norm"},
        "attention": attention,
        "ffn": {
            "type": "swiglu",
            "intermediate_size": c.need("intermediate_size"),
            "bias": c.get("mlp_bias", False, bool),
        },
        "norm": {"type": "rmsnorm", "eps": c.get("rms_norm_eps", 1e-6, float, min=0.0)},
        "position": rope_from_hf(c),
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0),
        "layers": overrides,
        "name": kind,
    }


def _sliding_layers(e: Exporting) -> list[int]:
    return [s.index for s in e.cfg.layer_specs() if s.attention.type == "sliding_window"]


def match(e: Exporting) -> str:
    specs = e.cfg.layer_specs()
    sliding = _sliding_layers(e)
    base = next((s for s in specs if s.index not in sliding), specs[0])
    a, f = base.attention, base.ffn
    e.require(
        base.position.rotary_fraction == 1.0,
        "position.rotary_fraction",
        f"{base.position.rotary_fraction}: Llama-family models rotate whole heads",
        "use rotary_fraction: 1.0",
    )
    e.require(
        a.bias or not a.out_bias,
        "attention.out_bias",
        "an output bias without a qkv bias has no equivalent",
        "set attention.out_bias: false or attention.bias: true",
    )
    kind = "qwen2" if a.bias and not a.out_bias else "mistral" if sliding and not a.bias else "llama"
    mixed = differing_slots(e.cfg)
    if mixed and (set(mixed) != {"attention"} or kind != "qwen2" or not _only_window_differs(e, sliding)):
        slot, layer = next(iter(mixed.items()))
        e.no(
            "layers",
            f"layer {layer} has a different {slot} than layer 0; Hugging Face {kind} uses the same "
            "components in every layer" + (" (Qwen2: a sliding window on some layers)" if slot == "attention" else ""),
            "remove the per-layer override",
        )
    if sliding and kind == "llama":
        e.no(
            "attention.type",
            "sliding_window with qkv and output biases has no Hugging Face equivalent "
            "(Mistral has no biases, Qwen2 no output bias)",
            "drop the biases or the window",
        )
    e.require(
        not f.bias or kind == "llama",
        "ffn.bias",
        f"{kind} has no feed-forward biases (Llama has)",
        "set ffn.bias: false",
    )
    return kind


def _only_window_differs(e: Exporting, sliding: list[int]) -> bool:
    """All layers equal up to the attention's window (one window for every sliding layer)."""

    def key(a: Any) -> tuple:
        return a.num_heads, a.kv_heads(), a.head_dim, a.bias, a.out_bias, a.qk_norm, a.softmax_scale

    attns = [s.attention for s in e.cfg.layer_specs()]
    return len({key(a) for a in attns}) == 1 and len({attns[i].window for i in sliding}) == 1


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    specs = cfg.layer_specs()
    sliding = [s.index for s in specs if s.attention.type == "sliding_window"]
    a, f = specs[0].attention, specs[0].ffn
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": f.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.kv_heads(),
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": specs[0].norm.eps,
        "attention_dropout": a.dropout,
        **rope_to_hf(specs[0].position),
    }
    window = specs[sliding[0]].attention.window if sliding else None
    if model_type == "llama":
        out.update(attention_bias=a.bias, mlp_bias=f.bias)
    elif model_type == "mistral":
        out.update(sliding_window=window)
    else:  # qwen2
        types = [SLIDING if s.index in sliding else FULL for s in specs]
        out.update(
            use_sliding_window=bool(sliding),
            sliding_window=window,
            layer_types=types,
            max_window_layers=sliding[0] if sliding else cfg.num_layers,
        )
    return out


FAMILY = Family(
    name="llama",
    model_types=ARCHITECTURES,
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
)
