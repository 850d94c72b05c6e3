"""Phi-3 (``model_type: phi3``, ``Phi3ForCausalLM``): Llama's block with q, k and v fused in one
``qkv_proj`` and gate and up in one ``gate_up_proj``, laid out as ours ([q | k | v] and [gate | up]
along rows, so both are copied as they are), rope on the first ``partial_rotary_factor`` of each head,
no biases, and a sliding window on every layer when ``sliding_window`` is set (Phi-3-mini-4k: 2047).

Rope: the default only. transformers' Phi-3 takes ``default`` and ``longrope`` (the 128k models; it
reads ``yarn`` and ``su`` as longrope too), and composer has no longrope: every scaled type is refused
naming it.
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig
from .common import Exporting, Family, HFConfig, attention_from_heads, copy, rope_to_hf
from .qwen3 import check_layers_alike, check_plain_scores
from .rope_scaling import rope_from_hf_scaled

L = "model.layers.{i}"
RULES = (
    copy("embed.weight", "model.embed_tokens.weight", vocab=True),
    copy("layers.{i}.attn_norm.weight", f"{L}.input_layernorm.weight"),
    copy("layers.{i}.attn.qkv.weight", f"{L}.self_attn.qkv_proj.weight"),  # [(H + 2 Hkv) D, C]
    copy("layers.{i}.attn.out.weight", f"{L}.self_attn.o_proj.weight"),
    copy("layers.{i}.ffn_norm.weight", f"{L}.post_attention_layernorm.weight"),
    copy("layers.{i}.ffn.gate_up.weight", f"{L}.mlp.gate_up_proj.weight"),  # [2 I, C]
    copy("layers.{i}.ffn.down.weight", f"{L}.mlp.down_proj.weight"),
    copy("final_norm.weight", "model.norm.weight"),
    copy("head.proj.weight", "lm_head.weight", vocab=True),
)


def to_composer(c: HFConfig) -> dict[str, Any]:
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    max_pos = c.need("max_position_embeddings")
    kv_heads = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
    if c.get("hidden_act", "silu", str) not in ("silu", "swish"):
        c.fail("hidden_act", f"{c.get('hidden_act')!r} is not supported for phi3", "SwiGLU here uses silu")
    if hidden % heads:
        c.fail("num_attention_heads", f"{heads} does not divide hidden_size {hidden}", "Phi-3's head_dim is C / H")
    window = c.get("sliding_window", None, int, min=1, bound="max_position_embeddings")
    window = window if window is not None and window < max_pos else None
    attention = {
        **attention_from_heads(heads, kv_heads, window),
        "bias": False,
        "dropout": c.get("attention_dropout", 0.0, float),
    }
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": c.need("num_hidden_layers"),
        "num_heads": heads,
        "max_position_embeddings": max_pos,
        "dropout": c.get("embd_pdrop", 0.0, float),  # on the embeddings (every other dropout is set here)
        "block": {"type": "pre_norm", "dropout": c.get("resid_pdrop", 0.0, float)},
        "attention": attention,
        "ffn": {"type": "swiglu", "intermediate_size": c.need("intermediate_size"), "bias": False, "dropout": 0.0},
        "norm": {"type": "rmsnorm", "eps": c.get("rms_norm_eps", 1e-5, float, min=0.0)},
        "position": rope_from_hf_scaled(c, "phi3", supported=("default",)),
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0),
        "name": "phi3",
    }


def match(e: Exporting) -> str:
    sliding = check_layers_alike(e, "phi3")
    specs = e.cfg.layer_specs()
    e.require(
        not sliding or len(sliding) == len(specs),
        "layers",
        "Phi-3's sliding window is on every layer or none",
        "set the window on all layers",
    )
    s = specs[0]
    a = s.attention
    e.require(not a.bias and not a.out_bias, "attention.bias", "Phi-3 has no attention biases", "set bias: false")
    e.require(not s.ffn.bias, "ffn.bias", "Phi-3 has no feed-forward biases", "set ffn.bias: false")
    e.require(
        a.head_dim * a.num_heads == e.cfg.hidden_size,
        "attention.head_dim",
        "Phi-3 needs head_dim * num_heads == hidden_size",
        "leave head_dim null",
    )
    e.require(
        s.position.scaling == "none",
        "position.scaling",
        f"{s.position.scaling!r}: Phi-3 in transformers has the default rope or longrope only",
        "use scaling: none",
    )
    check_plain_scores(e, a, "phi3")
    return "phi3"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    s = cfg.layer(0)
    a = s.attention
    rope = rope_to_hf(s.position, fraction_key="partial_rotary_factor")
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": s.ffn.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.kv_heads(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "original_max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": s.norm.eps,
        "attention_dropout": a.dropout,
        "resid_pdrop": s.block.dropout,
        "embd_pdrop": cfg.dropout,
        "sliding_window": a.window if a.type == "sliding_window" else None,
        **rope,
    }


FAMILY = Family(
    name="phi3",
    model_types={"phi3": "Phi3ForCausalLM"},
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
