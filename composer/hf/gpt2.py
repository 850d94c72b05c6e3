"""GPT-2 (``model_type: gpt2``): learned positions, pre-norm LayerNorm, MLP, fused QKV with biases.

Hugging Face GPT-2 uses Conv1D layers whose weights are stored transposed ([in, out]).
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig
from .common import ACT_TO_HF, Exporting, Family, HFConfig, activation, copy, transpose

H = "transformer.h.{i}"
RULES = (
    copy("embed.weight", "transformer.wte.weight", vocab=True),
    copy("position.weight", "transformer.wpe.weight"),
    copy("layers.{i}.attn_norm.weight", f"{H}.ln_1.weight"),
    copy("layers.{i}.attn_norm.bias", f"{H}.ln_1.bias"),
    transpose("layers.{i}.attn.qkv.weight", f"{H}.attn.c_attn.weight"),  # [C, 3C] -> [3C, C], q|k|v rows
    copy("layers.{i}.attn.qkv.bias", f"{H}.attn.c_attn.bias"),
    transpose("layers.{i}.attn.out.weight", f"{H}.attn.c_proj.weight"),
    copy("layers.{i}.attn.out.bias", f"{H}.attn.c_proj.bias"),
    copy("layers.{i}.ffn_norm.weight", f"{H}.ln_2.weight"),
    copy("layers.{i}.ffn_norm.bias", f"{H}.ln_2.bias"),
    transpose("layers.{i}.ffn.up.weight", f"{H}.mlp.c_fc.weight"),
    copy("layers.{i}.ffn.up.bias", f"{H}.mlp.c_fc.bias"),
    transpose("layers.{i}.ffn.down.weight", f"{H}.mlp.c_proj.weight"),
    copy("layers.{i}.ffn.down.bias", f"{H}.mlp.c_proj.bias"),
    copy("final_norm.weight", "transformer.ln_f.weight"),
    copy("final_norm.bias", "transformer.ln_f.bias"),
    copy("head.proj.weight", "lm_head.weight", vocab=True),
)


def to_composer(c: HFConfig) -> dict[str, Any]:
    hidden = c.need("n_embd", "hidden_size")
    if c.get("scale_attn_by_inverse_layer_idx", False, bool):
        c.fail("scale_attn_by_inverse_layer_idx", "is not supported", "only models trained with it false import")
    if c.get("add_cross_attention", False, bool):
        c.fail("add_cross_attention", "cross-attention is not supported", "import a decoder-only GPT-2")
    resid = c.get("resid_pdrop", 0.1, float)
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": c.need("n_layer", "num_hidden_layers"),
        "num_heads": c.need("n_head", "num_attention_heads"),
        "max_position_embeddings": c.need("n_positions", "max_position_embeddings"),
        "dropout": c.get("embd_pdrop", 0.1, float),
        "block": {"type": "pre_norm", "dropout": resid},
        "attention": {
            "type": "mha",
            "bias": True,
            "dropout": c.get("attn_pdrop", 0.1, float),
            "softmax_scale": None if c.get("scale_attn_weights", True, bool) else 1.0,
        },
        "ffn": {
            "type": "mlp",
            "intermediate_size": c.get("n_inner", 4 * hidden, int, min=1, bound="intermediate_size"),
            "bias": True,
            "dropout": 0.0,
            "activation": activation(c, "activation_function", "gelu_new"),
        },
        "norm": {"type": "layernorm", "eps": c.get("layer_norm_epsilon", 1e-5, float, min=0.0)},
        "position": {"type": "learned"},
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", True, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0),
        "name": "gpt2",
    }


def match(e: Exporting) -> str:
    s = e.cfg.layer(0)
    a, f, n = s.attention, s.ffn, s.norm
    e.require(a.type == "mha", "attention.type", f"'{a.type}': GPT-2 has multi-head attention only", "use mha")
    e.require(
        a.bias and a.out_bias,
        "attention.bias",
        "GPT-2 has biases on the qkv and output projections",
        "set attention.bias: true",
    )
    e.require(
        a.head_dim * a.num_heads == e.cfg.hidden_size,
        "attention.head_dim",
        "GPT-2 needs head_dim * num_heads == hidden_size",
        "leave head_dim null",
    )
    e.require(
        a.softmax_scale in (None, 1.0),
        "attention.softmax_scale",
        "GPT-2 scales by 1/sqrt(head_dim) or 1",
        "leave softmax_scale null",
    )
    e.require(f.bias, "ffn.bias", "GPT-2's MLP has biases", "set ffn.bias: true")
    e.require(n.bias, "norm.bias", "GPT-2's LayerNorms have biases", "set norm.bias: true")
    return "gpt2"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    s = cfg.layer(0)
    return {
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_positions": cfg.max_position_embeddings,
        "n_inner": s.ffn.intermediate_size,
        "activation_function": ACT_TO_HF[s.ffn.activation],
        "layer_norm_epsilon": s.norm.eps,
        "resid_pdrop": s.block.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": s.attention.dropout,
        "scale_attn_weights": s.attention.softmax_scale is None,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
    }


FAMILY = Family(
    name="gpt2",
    model_types={"gpt2": "GPT2LMHeadModel"},
    signature={
        "position": ("learned",),
        "norm": ("layernorm",),
        "ffn": ("mlp",),
        "block": ("pre_norm",),
        "attention": ("mha",),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    ignore=(r"\.attn\.(masked_)?bias$",),  # causal-mask buffers saved by old checkpoints
    prefix="transformer.",
)
