"""GPT-NeoX (``model_type: gpt_neox``; Pythia): rope on the first ``rotary_pct`` of each head,
LayerNorm, MLP with biases, and a parallel residual with two norms (``use_parallel_residual``).

Hugging Face fuses q, k, v per head ([h0 q,k,v | h1 q,k,v | ...]); ours is [q | k | v].
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig
from .common import ACT_TO_HF, Exporting, Family, HFConfig, activation, copy, fused, rope_from_hf, rope_to_hf

L = "gpt_neox.layers.{i}"
RULES = (
    copy("embed.weight", "gpt_neox.embed_in.weight", vocab=True),
    copy("layers.{i}.attn_norm.weight", f"{L}.input_layernorm.weight"),
    copy("layers.{i}.attn_norm.bias", f"{L}.input_layernorm.bias"),
    fused("neox_qkv", "layers.{i}.attn.qkv.weight", f"{L}.attention.query_key_value.weight"),
    fused("neox_qkv", "layers.{i}.attn.qkv.bias", f"{L}.attention.query_key_value.bias"),
    copy("layers.{i}.attn.out.weight", f"{L}.attention.dense.weight"),
    copy("layers.{i}.attn.out.bias", f"{L}.attention.dense.bias"),
    copy("layers.{i}.ffn_norm.weight", f"{L}.post_attention_layernorm.weight"),
    copy("layers.{i}.ffn_norm.bias", f"{L}.post_attention_layernorm.bias"),
    copy("layers.{i}.ffn.up.weight", f"{L}.mlp.dense_h_to_4h.weight"),
    copy("layers.{i}.ffn.up.bias", f"{L}.mlp.dense_h_to_4h.bias"),
    copy("layers.{i}.ffn.down.weight", f"{L}.mlp.dense_4h_to_h.weight"),
    copy("layers.{i}.ffn.down.bias", f"{L}.mlp.dense_4h_to_h.bias"),
    copy("final_norm.weight", "gpt_neox.final_layer_norm.weight"),
    copy("final_norm.bias", "gpt_neox.final_layer_norm.bias"),
    copy("head.proj.weight", "embed_out.weight", vocab=True),
)


def to_composer(c: HFConfig) -> dict[str, Any]:
    bias = c.get("attention_bias", True, bool)
    hidden = c.need("hidden_size")
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": c.need("num_hidden_layers"),
        "num_heads": c.need("num_attention_heads"),
        "max_position_embeddings": c.need("max_position_embeddings"),
        "dropout": 0.0,
        "block": {
            "type": "parallel" if c.get("use_parallel_residual", True, bool) else "pre_norm",
            "dropout": c.get("hidden_dropout", 0.0, float),
        },
        "attention": {"type": "mha", "bias": bias, "out_bias": bias, "dropout": c.get("attention_dropout", 0.0, float)},
        "ffn": {
            "type": "mlp",
            "intermediate_size": c.get("intermediate_size", 4 * hidden, int, min=1, bound="intermediate_size"),
            "bias": True,
            "activation": activation(c, "hidden_act", "gelu"),
            "dropout": 0.0,
        },
        "norm": {"type": "layernorm", "eps": c.get("layer_norm_eps", 1e-5, float, min=0.0)},
        "position": rope_from_hf(c, theta_key="rotary_emb_base", fraction_key="rotary_pct", default_fraction=0.25),
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0),
        "name": "gpt_neox",
    }


def match(e: Exporting) -> str:
    s = e.cfg.layer(0)
    a = s.attention
    e.require(a.type == "mha", "attention.type", f"'{a.type}': GPT-NeoX has multi-head attention only", "use mha")
    e.require(
        a.bias == a.out_bias,
        "attention.out_bias",
        "GPT-NeoX has biases on both attention projections or on neither",
        "set attention.out_bias equal to attention.bias",
    )
    e.require(
        a.head_dim * a.num_heads == e.cfg.hidden_size,
        "attention.head_dim",
        "GPT-NeoX needs head_dim * num_heads == hidden_size",
        "leave head_dim null",
    )
    e.require(
        a.softmax_scale is None,
        "attention.softmax_scale",
        "GPT-NeoX scales by 1/sqrt(head_dim)",
        "leave softmax_scale null",
    )
    e.require(s.ffn.bias, "ffn.bias", "GPT-NeoX's MLP has biases", "set ffn.bias: true")
    e.require(s.norm.bias, "norm.bias", "GPT-NeoX's LayerNorms have biases", "set norm.bias: true")
    e.require(
        not getattr(s.block, "shared_norm", False),
        "block.shared_norm",
        "GPT-NeoX's parallel residual has two norms (one shared norm is GPT-J)",
        "set shared_norm: false",
    )
    return "gpt_neox"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    s = cfg.layer(0)
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": s.ffn.intermediate_size,
        "hidden_act": ACT_TO_HF[s.ffn.activation],
        "max_position_embeddings": cfg.max_position_embeddings,
        "layer_norm_eps": s.norm.eps,
        "use_parallel_residual": s.block.type == "parallel",
        "attention_bias": s.attention.bias,
        "attention_dropout": s.attention.dropout,
        "hidden_dropout": s.block.dropout,
        **rope_to_hf(s.position, fraction_key="rotary_pct"),
        "rotary_emb_base": s.position.theta,
    }


FAMILY = Family(
    name="gpt_neox",
    model_types={"gpt_neox": "GPTNeoXForCausalLM"},
    signature={
        "position": ("rope",),
        "norm": ("layernorm",),
        "ffn": ("mlp",),
        "block": ("pre_norm", "parallel"),
        "attention": ("mha",),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    ignore=(r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$",),
    prefix="gpt_neox.",
)
