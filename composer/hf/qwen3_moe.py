"""Qwen3-MoE (``model_type: qwen3_moe``, ``Qwen3MoeForCausalLM``): Qwen3's attention (an RMSNorm on each
query and key head, its own head_dim, optional sliding layers; qwen3.py) with a mixture of SwiGLU experts
in every layer (``moe``: softmax scores, top-k renormalised when ``norm_topk_prob``, the Switch
balancing loss scaled by ``router_aux_loss_coef``; no shared expert).

Checkpoints hold one tensor per expert (``mlp.experts.{j}.gate_proj`` / ``up_proj`` / ``down_proj``, as
transformers writes them) and the router ``mlp.gate``; here they are stacked (moe_experts.py). Models
with dense layers (``mlp_only_layers``, ``decoder_sparse_step`` > 1) become per-layer ``ffn`` overrides
(a SwiGLU of ``intermediate_size``) on import; export takes models whose every layer is a mixture.
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig
from . import qwen3
from .common import Exporting, Family, HFConfig, copy, fused
from .mixtral import check_moe, moe_ffn, num_experts
from .rope_scaling import rope_to_hf_scaled

L = "model.layers.{i}.mlp"
RULES = (
    *qwen3.RULES,  # attention, norms, embeddings and the dense layers' gate_proj / up_proj / down_proj
    copy("layers.{i}.ffn.router.weight", f"{L}.gate.weight"),
    fused(
        "rows",
        "layers.{i}.ffn.experts.gate_up.weight",
        f"{L}.experts.{{j}}.gate_proj.weight",
        f"{L}.experts.{{j}}.up_proj.weight",
    ),
    fused("rows", "layers.{i}.ffn.experts.down.weight", f"{L}.experts.{{j}}.down_proj.weight"),
)


def dense_layers(c: HFConfig, num_layers: int) -> list[int]:
    """The layers with a dense feed-forward (transformers' Qwen3MoeDecoderLayer rule)."""
    only = c.get("mlp_only_layers", [])
    only = only if isinstance(only, list) else []
    step = c.get("decoder_sparse_step", 1, int, min=1, bound="num_layers")
    experts = num_experts(c, "num_experts", 128)
    return [i for i in range(num_layers) if i in only or experts == 0 or (i + 1) % step]


def to_composer(c: HFConfig) -> dict[str, Any]:
    out = qwen3.to_composer(c)
    if c.data.get("head_dim") is None:  # Qwen3-MoE's default is hidden / heads (Qwen3's is 128)
        width = out["hidden_size"] // out["num_heads"]
        for attention in [out["attention"], *(o["attention"] for o in out["layers"] if "attention" in o)]:
            attention["head_dim"] = width
    dense = out["ffn"]  # Qwen3's SwiGLU of intermediate_size
    out["ffn"] = moe_ffn(c, "num_experts", "moe_intermediate_size", c.get("norm_topk_prob", False, bool))
    layers = dense_layers(c, out["num_layers"])
    if len(layers) == out["num_layers"]:
        out["ffn"] = dense
    elif layers:
        out["layers"] = [*out["layers"], {"select": layers, "ffn": dense}]
    out["name"] = "qwen3_moe"
    return out


def match(e: Exporting) -> str:
    specs = e.cfg.layer_specs()
    sliding = qwen3.check_layers_alike(e, "qwen3_moe")
    base = next((s for s in specs if s.index not in sliding), specs[0])
    a = base.attention
    qwen3.check_qk_norms(e, a, base.norm.eps, "per_head")  # Qwen3's: by the weight, not (1 + weight)
    e.require(a.bias == a.out_bias, "attention.out_bias", "attention_bias is on all four projections or none")
    e.require(base.position.rotary_fraction == 1.0, "position.rotary_fraction", "it rotates whole heads")
    qwen3.check_plain_scores(e, a, "qwen3_moe")
    check_moe(e, base.ffn, "Qwen3-MoE")
    return "qwen3_moe"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    s = cfg.layer(0)
    a, m = s.attention, s.ffn
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": m.expert.intermediate_size,
        "moe_intermediate_size": m.expert.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.kv_heads(),
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": s.norm.eps,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "norm_topk_prob": m.normalize_top_k,
        "router_aux_loss_coef": m.aux_loss_weight,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        **qwen3.window_entries(cfg),
        **rope_to_hf_scaled(s.position),
    }


FAMILY = Family(
    name="qwen3_moe",
    model_types={"qwen3_moe": "Qwen3MoeForCausalLM"},
    signature={
        "position": ("rope",),
        "norm": ("rmsnorm",),
        "ffn": ("moe",),
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
