"""OLMo 2 (``model_type: olmo2``, ``Olmo2ForCausalLM``): no norm before a sub-layer; each sub-layer's
output is RMS-normalised before the residual add (``block: post_sublayer``), and queries and keys are
RMS-normalised across all heads of the projection, before the head split and the rotary embedding
(``qk_norm: across_heads``: q_norm over H D, k_norm over Hkv D). SwiGLU, rope, ``attention_bias`` on
all four projections.

Names: ``post_attention_layernorm`` is our block's ``attn_norm`` (applied on the attention's output),
``post_feedforward_layernorm`` its ``ffn_norm``. The rest of the table is llama.py's.
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig
from .common import Exporting, Family, HFConfig, attention_rules, copy, swiglu_rules
from .qwen3 import attention_dict, check_layers_alike, check_plain_scores, check_qk_norms
from .rope_scaling import rope_from_hf_scaled, rope_to_hf_scaled

L = "model.layers.{i}"
RULES = (
    copy("embed.weight", "model.embed_tokens.weight", vocab=True),
    *attention_rules(f"{L}.self_attn", qk_norm=True),  # q_norm [H D], k_norm [Hkv D]
    copy("layers.{i}.attn_norm.weight", f"{L}.post_attention_layernorm.weight"),
    *swiglu_rules(f"{L}.mlp"),
    copy("layers.{i}.ffn_norm.weight", f"{L}.post_feedforward_layernorm.weight"),
    copy("final_norm.weight", "model.norm.weight"),
    copy("head.proj.weight", "lm_head.weight", vocab=True),
)


def to_composer(c: HFConfig) -> dict[str, Any]:
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    kv_heads = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
    if c.get("hidden_act", "silu", str) not in ("silu", "swish"):
        c.fail("hidden_act", f"{c.get('hidden_act')!r} is not supported for olmo2", "SwiGLU here uses silu")
    if hidden % heads:
        c.fail("num_attention_heads", f"{heads} does not divide hidden_size {hidden}", "OLMo 2's head_dim is C / H")
    eps = c.get("rms_norm_eps", 1e-5, float, min=0.0)
    attention = attention_dict(c, heads, kv_heads, max(1, hidden // heads), c.get("attention_bias", False, bool))
    attention.update(qk_norm="across_heads", qk_norm_eps=eps)
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": c.need("num_hidden_layers"),
        "num_heads": heads,
        "max_position_embeddings": c.need("max_position_embeddings"),
        "dropout": 0.0,
        "block": {"type": "post_sublayer"},
        "attention": attention,
        "ffn": {"type": "swiglu", "intermediate_size": c.need("intermediate_size"), "bias": False},
        "norm": {"type": "rmsnorm", "eps": eps},
        "position": rope_from_hf_scaled(c, "olmo2"),
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0),
        "name": "olmo2",
    }


def match(e: Exporting) -> str:
    sliding = check_layers_alike(e, "olmo2")
    e.require(not sliding, "attention.type", "OLMo 2 has no sliding window", "use mha / gqa / mqa")
    s = e.cfg.layer(0)
    a = s.attention
    check_qk_norms(e, a, s.norm.eps, "across_heads")
    e.require(
        a.head_dim * a.num_heads == e.cfg.hidden_size,
        "attention.head_dim",
        "OLMo 2 needs head_dim * num_heads == hidden_size",
        "leave head_dim null",
    )
    e.require(a.bias == a.out_bias, "attention.out_bias", "attention_bias is on all four projections or none")
    e.require(s.position.rotary_fraction == 1.0, "position.rotary_fraction", "OLMo 2 rotates whole heads")
    e.require(not s.ffn.bias, "ffn.bias", "OLMo 2 has no feed-forward biases", "set ffn.bias: false")
    check_plain_scores(e, a, "olmo2")
    return "olmo2"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    s = cfg.layer(0)
    a = s.attention
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": s.ffn.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.kv_heads(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": s.norm.eps,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        **rope_to_hf_scaled(s.position),
    }


FAMILY = Family(
    name="olmo2",
    model_types={"olmo2": "Olmo2ForCausalLM"},
    signature={
        "position": ("rope",),
        "norm": ("rmsnorm",),
        "ffn": ("swiglu",),
        "block": ("post_sublayer",),
        "attention": ("mha", "gqa", "mqa"),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    ignore=(r"rotary_emb\.inv_freq$",),
    prefix="model.",
    options=("qk_norm",),
)
