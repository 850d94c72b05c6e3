"""Mixtral (``model_type: mixtral``, ``MixtralForCausalLM``): Mistral's layout with every feed-forward a
mixture of SwiGLU experts (``moe``: softmax scores, top-k renormalised, the Switch load-balancing loss
scaled by ``router_aux_loss_coef``), and a sliding window when ``sliding_window`` is set.

The experts are stacked here (``ffn.experts.gate_up`` [E x 2I, C] with [w1 | w3] rows per expert,
``ffn.experts.down`` [E x C, I]) and one tensor per expert in checkpoints
(``block_sparse_moe.experts.{j}.w1`` / ``w3`` / ``w2``, as transformers writes them); the router is
``block_sparse_moe.gate``. The attention, norms and embeddings are llama.py's table.
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig
from .common import Exporting, Family, HFConfig, attention_from_heads, copy, differing_slots, fused, rope_to_hf
from .llama import RULES as LLAMA_RULES
from .llama import to_composer as llama_to_composer

L = "model.layers.{i}.block_sparse_moe"
RULES = (
    *(r for r in LLAMA_RULES if ".ffn." not in r.ours),
    copy("layers.{i}.ffn.router.weight", f"{L}.gate.weight"),
    fused(
        "rows", "layers.{i}.ffn.experts.gate_up.weight", f"{L}.experts.{{j}}.w1.weight", f"{L}.experts.{{j}}.w3.weight"
    ),
    fused("rows", "layers.{i}.ffn.experts.down.weight", f"{L}.experts.{{j}}.w2.weight"),
)


def num_experts(c: HFConfig, key: str, default: int) -> int:
    """The routed experts: ``key`` (4.x) or ``num_local_experts`` (how transformers 5 writes them)."""
    key = key if key in c.data else "num_local_experts"
    return c.get(key, default, int, min=0, bound="num_experts")


def moe_ffn(c: HFConfig, experts_key: str, width_key: str, normalize: bool) -> dict[str, Any]:
    """The ``moe`` ffn of a softmax top-k family (Mixtral, Qwen3-MoE)."""
    return {
        "type": "moe",
        "num_experts": max(1, num_experts(c, experts_key, 8)),
        "top_k": c.get("num_experts_per_tok", 2, int, min=1, bound="num_experts"),
        "expert": {"type": "swiglu", "intermediate_size": c.need(width_key, bound="intermediate_size"), "bias": False},
        "normalize_top_k": normalize,
        "aux_loss_weight": c.get("router_aux_loss_coef", 0.001, float, min=0.0),
    }


def to_composer(c: HFConfig) -> dict[str, Any]:
    out = llama_to_composer(c)
    if c.get("router_jitter_noise", 0.0, float, min=0.0):
        c.fail("router_jitter_noise", "router jitter is not supported", "set router_jitter_noise: 0")
    window = c.get("sliding_window", None, int, min=1, bound="max_position_embeddings")
    if window is not None and window < out["max_position_embeddings"]:
        heads = out["num_heads"]
        kv = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
        out["attention"] = {**out["attention"], **attention_from_heads(heads, kv, window)}
    out["ffn"] = moe_ffn(c, "num_local_experts", "intermediate_size", normalize=True)
    return out


def check_moe(e: Exporting, m: Any, family: str, normalize: bool = None) -> None:
    """A softmax top-k mixture of SwiGLU experts without biases, shared experts or correction bias."""
    e.require(m.type == "moe", "ffn.type", f"'{m.type}': {family} routes with softmax top-k", "use ffn type moe")
    if m.type != "moe":
        return
    e.require(m.score == "softmax", "ffn.score", f"{m.score}: {family} scores experts with a softmax")
    if normalize is not None:
        e.require(m.normalize_top_k == normalize, "ffn.normalize_top_k", f"{family} renormalises the top-k")
    e.require(m.routed_scaling_factor == 1.0, "ffn.routed_scaling_factor", "no routed scaling", "set it to 1.0")
    e.require(m.n_group == 1, "ffn.n_group", "no group-limited routing", "set n_group: 1")
    e.require(not m.router_bias, "ffn.router_bias", "its router has no bias", "set router_bias: false")
    e.require(not m.aux_free_bias, "ffn.aux_free_bias", "no correction bias", "set aux_free_bias: false")
    e.require(m.shared_experts == 0, "ffn.shared_experts", "no shared experts", "set shared_experts: 0")
    x = m.expert
    e.require(
        x.type == "swiglu" and not x.bias,
        "ffn.expert",
        "its experts are SwiGLU without biases",
        "expert: {type: swiglu}",
    )


def match(e: Exporting) -> str:
    specs = e.cfg.layer_specs()
    mixed = differing_slots(e.cfg)
    if mixed:
        slot, layer = next(iter(mixed.items()))
        e.no("layers", f"layer {layer} has a different {slot}; Mixtral uses one in every layer", "remove it")
    a = specs[0].attention
    e.require(not a.bias and not a.out_bias, "attention.bias", "Mixtral's attention has no biases", "set bias: false")
    e.require(specs[0].position.rotary_fraction == 1.0, "position.rotary_fraction", "Mixtral rotates whole heads")
    check_moe(e, specs[0].ffn, "Mixtral", normalize=True)
    return "mixtral"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    s = cfg.layer(0)
    a, m = s.attention, s.ffn
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": m.expert.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.kv_heads(),
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": s.norm.eps,
        "attention_dropout": a.dropout,
        "sliding_window": a.window if a.type == "sliding_window" else None,
        "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.aux_loss_weight,
        "router_jitter_noise": 0.0,
        **rope_to_hf(s.position),
    }


FAMILY = Family(
    name="mixtral",
    model_types={"mixtral": "MixtralForCausalLM"},
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
)
