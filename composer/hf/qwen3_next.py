"""Qwen3-Next (``model_type: qwen3_next``, ``Qwen3NextForCausalLM``): Gated DeltaNet layers and gated
attention layers (``layer_types``; attention every 4th by default), every layer pre-norm with a mixture of
SwiGLU experts plus a sigmoid-gated shared expert (dense SwiGLU on ``mlp_only_layers``):

    x = x + mixer(input_layernorm(x))        mixer: gated_deltanet, or attention with an elementwise output gate
    x = x + moe(post_attention_layernorm(x))

Every RMSNorm of the model scales by (1 + w) (``zero_centred``; the q/k norms too), except the
DeltaNet's gated output norm (w, eps ``rms_norm_eps``). Attention: per-head q/k norms, rope on a
quarter of each head (``partial_rotary_factor``), ``q_proj`` of [H, 2 D] (each head's query then its
gate), which is our fused ``qkv``'s layout. Here the attention layers are the model-wide components and
the linear layers one per-layer override (``gated_deltanet``, ``position: none``).

The DeltaNet's ``in_proj_qkvz`` interleaves rows per key head (key head i: q_i [Dk], k_i [Dk], then the v
and z rows of its r = H / Hk value heads) and ``in_proj_ba`` the b and a rows per key head (b_i [r],
a_i [r]); our ``in_proj`` is [q | k | v | z | b | a], so the rule ``qwen3_next_gdn`` regroups them. The
multi-token-prediction weights of published checkpoints (``mtp.*``) are not part of the causal LM and
are skipped on import.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..schema import ModelConfig, config_to_dict
from .common import CONVERTERS, Exporting, Family, HFConfig, attention_rules, copy, fused, swiglu_rules
from .mixtral import moe_ffn
from .qwen3 import attention_dict, check_plain_scores, check_qk_norms
from .qwen3_moe import dense_layers
from .rope_scaling import rope_from_hf_scaled, rope_to_hf_scaled

L = "model.layers.{i}"
M = "model.layers.{i}.mlp"
LINEAR, FULL = "linear_attention", "full_attention"


# ----------------------------------------------------------------------------- the DeltaNet's rows
def _sizes(attn: Any) -> tuple[int, int, int, int, int]:
    hk, h = attn.num_kv_heads, attn.num_heads
    return hk, attn.head_dim, attn.value_head_dim, h, h // hk


def gdn_to_ours(parts: list[Tensor], attn: Any) -> Tensor:
    """(in_proj_qkvz [Hk (2 Dk + 2 r Dv), C], in_proj_ba [Hk 2 r, C]) -> in_proj [q | k | v | z | b | a]."""
    hk, dk, dv, h, r = _sizes(attn)
    qkvz, ba = parts[0].unflatten(0, (hk, -1)), parts[1].unflatten(0, (hk, -1))  # [Hk, ..., C]
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=1)
    b, a = ba.split([r, r], dim=1)
    return torch.cat([x.flatten(0, 1) for x in (q, k, v, z, b, a)], dim=0)


def gdn_to_theirs(t: Tensor, attn: Any) -> list[Tensor]:
    hk, dk, dv, h, r = _sizes(attn)
    q, k, v, z, b, a = (x.unflatten(0, (hk, -1)) for x in t.split([hk * dk, hk * dk, h * dv, h * dv, h, h], dim=0))
    return [torch.cat([q, k, v, z], dim=1).flatten(0, 1), torch.cat([b, a], dim=1).flatten(0, 1)]


CONVERTERS["qwen3_next_gdn"] = (gdn_to_ours, gdn_to_theirs)

RULES = (
    copy("embed.weight", "model.embed_tokens.weight", vocab=True),
    copy("layers.{i}.attn_norm.weight", f"{L}.input_layernorm.weight"),
    copy("layers.{i}.ffn_norm.weight", f"{L}.post_attention_layernorm.weight"),
    # Gated DeltaNet layers
    fused(
        "qwen3_next_gdn",
        "layers.{i}.attn.in_proj.weight",
        f"{L}.linear_attn.in_proj_qkvz.weight",
        f"{L}.linear_attn.in_proj_ba.weight",
    ),
    copy("layers.{i}.attn.conv1d.weight", f"{L}.linear_attn.conv1d.weight"),
    copy("layers.{i}.attn.dt_bias", f"{L}.linear_attn.dt_bias"),
    copy("layers.{i}.attn.A_log", f"{L}.linear_attn.A_log"),
    copy("layers.{i}.attn.norm.weight", f"{L}.linear_attn.norm.weight"),
    copy("layers.{i}.attn.out_proj.weight", f"{L}.linear_attn.out_proj.weight"),
    # gated attention layers
    *attention_rules(f"{L}.self_attn", qk_norm=True),  # q_norm / k_norm [D]
    # the mixture of experts (one tensor per expert in the checkpoint, stacked here) and its shared expert
    copy("layers.{i}.ffn.router.weight", f"{M}.gate.weight"),
    fused(
        "rows",
        "layers.{i}.ffn.experts.gate_up.weight",
        f"{M}.experts.{{j}}.gate_proj.weight",
        f"{M}.experts.{{j}}.up_proj.weight",
    ),
    fused("rows", "layers.{i}.ffn.experts.down.weight", f"{M}.experts.{{j}}.down_proj.weight"),
    fused(
        "gate_up",
        "layers.{i}.ffn.shared.gate_up.weight",
        f"{M}.shared_expert.gate_proj.weight",
        f"{M}.shared_expert.up_proj.weight",
    ),
    copy("layers.{i}.ffn.shared.down.weight", f"{M}.shared_expert.down_proj.weight"),
    copy("layers.{i}.ffn.shared_gate.weight", f"{M}.shared_expert_gate.weight"),
    # dense layers (mlp_only_layers)
    *swiglu_rules(M),
    copy("final_norm.weight", "model.norm.weight"),
    copy("head.proj.weight", "lm_head.weight", vocab=True),
)


# ----------------------------------------------------------------------------- import
def _layer_types(c: HFConfig, layers: int) -> list[str]:
    given = c.get("layer_types")
    if given is None:  # transformers' default: full attention every 4th layer
        interval = c.get("full_attention_interval", 4, int, min=1, bound="num_layers")
        given = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(layers)]
    if not isinstance(given, list) or len(given) != layers or not set(given) <= {LINEAR, FULL}:
        c.fail("layer_types", f"expected {layers} of {LINEAR!r} / {FULL!r}", "list one type per layer")
        return [FULL] * layers
    return given


def _gated_deltanet(c: HFConfig, heads: int, eps: float) -> dict[str, Any]:
    return {
        "type": "gated_deltanet",
        "num_heads": c.get("linear_num_value_heads", 32, int, min=1, bound="num_heads"),
        "num_key_heads": c.get("linear_num_key_heads", 16, int, min=1, bound="num_heads"),
        "head_dim": c.get("linear_key_head_dim", 128, int, min=1, bound="head_dim"),
        "value_head_dim": c.get("linear_value_head_dim", 128, int, min=1, bound="head_dim"),
        "conv_size": c.get("linear_conv_kernel_dim", 4, int, min=1, max=64),
        "allow_neg_eigval": False,
        "norm_eps": eps,
    }


def _moe(c: HFConfig) -> dict[str, Any]:
    moe = moe_ffn(c, "num_experts", "moe_intermediate_size", c.get("norm_topk_prob", True, bool))
    shared = c.get("shared_expert_intermediate_size", 0, int, min=0, bound="intermediate_size")
    if shared:
        moe.update(
            shared_experts=1,
            shared_expert={"type": "swiglu", "intermediate_size": shared, "bias": False},
            shared_expert_gate=True,
        )
    return moe


def to_composer(c: HFConfig) -> dict[str, Any]:
    hidden, heads, layers = c.need("hidden_size"), c.need("num_attention_heads"), c.need("num_hidden_layers")
    kv_heads = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
    if c.get("hidden_act", "silu", str) not in ("silu", "swish"):
        c.fail("hidden_act", f"{c.get('hidden_act')!r} is not supported for qwen3_next", "SwiGLU here uses silu")
    eps = c.get("rms_norm_eps", 1e-6, float, min=0.0)
    head_dim = c.get("head_dim", None, int, min=1, bound="head_dim") or max(1, hidden // heads)
    attention = attention_dict(c, heads, kv_heads, head_dim, c.get("attention_bias", False, bool))
    attention.update(
        num_heads=heads, qk_norm="per_head", qk_norm_eps=eps, qk_norm_zero_centred=True, output_gate="elementwise"
    )
    types = _layer_types(c, layers)
    linear = [i for i, t in enumerate(types) if t == LINEAR]
    overrides = [{"select": linear, "attention": _gated_deltanet(c, heads, eps), "position": {"type": "none"}}]
    dense = dense_layers(c, layers)
    swiglu = {"type": "swiglu", "intermediate_size": c.need("intermediate_size"), "bias": False}
    if dense:
        overrides.append({"select": dense, "ffn": swiglu})
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "max_position_embeddings": c.need("max_position_embeddings"),
        "dropout": 0.0,
        "block": {"type": "pre_norm"},
        "attention": attention,
        "ffn": _moe(c) if len(dense) < layers else swiglu,
        "norm": {"type": "rmsnorm", "eps": eps, "zero_centred": True},
        "position": rope_from_hf_scaled(c, "qwen3_next"),
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0, max=1.0),
        "layers": [o for o in overrides if o["select"]],
        "name": "qwen3_next",
    }


# ----------------------------------------------------------------------------- export
def _alike(e: Exporting, specs: list, slots: tuple[str, ...], what: str) -> None:
    first = {s: config_to_dict(getattr(specs[0], s)) for s in slots}
    for spec in specs[1:]:
        for slot, value in first.items():
            if config_to_dict(getattr(spec, slot)) != value:
                e.no("layers", f"layer {spec.index}'s {slot} differs from layer {specs[0].index}'s ({what} layers)")
                return


def _check_attention(e: Exporting, s: Any) -> None:
    a = s.attention
    e.require(a.type in ("mha", "gqa", "mqa"), "attention.type", f"layer {s.index}: {a.type} has no equivalent")
    e.require(a.output_gate == "elementwise", "attention.output_gate", "its attention has an elementwise gate")
    check_qk_norms(e, a, s.norm.eps, "per_head", zero_centred=True)
    e.require(a.bias == a.out_bias, "attention.out_bias", "attention_bias is on all four projections or none")
    e.require(s.position.type == "rope", "position.type", "its attention layers use rope", "position: rope")
    check_plain_scores(e, a, "qwen3_next")


def match(e: Exporting) -> str:
    specs = e.cfg.layer_specs()
    gdn = [s for s in specs if s.attention.type == "gated_deltanet"]
    attn = [s for s in specs if s.attention.type != "gated_deltanet"]
    moe = [s for s in specs if s.ffn.type == "moe"]
    e.require(bool(gdn) and bool(attn), "layers", "Qwen3-Next has both gated_deltanet and attention layers")
    e.require(bool(moe), "ffn.type", "Qwen3-Next has mixture-of-experts layers (moe)")
    for group, slots, what in ((gdn, ("attention",), "gated_deltanet"), (attn, ("attention", "position"), "attention")):
        if group:
            _alike(e, group, slots, what)
    if attn:
        _check_attention(e, attn[0])
    if gdn:
        g = gdn[0].attention
        e.require(not g.allow_neg_eigval, "layers", "its DeltaNet keeps beta in (0, 1)", "allow_neg_eigval: false")
        e.require(g.norm_eps == specs[0].norm.eps, "layers", "its DeltaNet's output norm uses rms_norm_eps")
    e.require(all(s.norm.zero_centred for s in specs), "norm.zero_centred", "its RMSNorms scale by 1 + w")
    if moe:
        m = moe[0].ffn
        e.require(
            m.shared_experts <= 1 and m.shared_expert_gate == bool(m.shared_experts), "ffn", "one gated shared expert"
        )
        e.require(all(s.ffn.type in ("moe", "swiglu") for s in specs), "ffn.type", "moe or swiglu (dense) layers")
    return "qwen3_next"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    specs = cfg.layer_specs()
    g = next(s for s in specs if s.attention.type == "gated_deltanet").attention
    s = next(s for s in specs if s.attention.type != "gated_deltanet")
    a, m = s.attention, next(x for x in specs if x.ffn.type == "moe").ffn
    dense = [x for x in specs if x.ffn.type != "moe"]
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.kv_heads(),
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": s.norm.eps,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        "layer_types": [LINEAR if x.attention.type == "gated_deltanet" else FULL for x in specs],
        "linear_num_key_heads": g.num_key_heads,
        "linear_num_value_heads": g.num_heads,
        "linear_key_head_dim": g.head_dim,
        "linear_value_head_dim": g.value_head_dim,
        "linear_conv_kernel_dim": g.conv_size,
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "norm_topk_prob": m.normalize_top_k,
        "moe_intermediate_size": m.expert.intermediate_size,
        "shared_expert_intermediate_size": m.shared_expert.intermediate_size if m.shared_experts else 0,
        "router_aux_loss_coef": m.aux_loss_weight,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [x.index for x in dense],
        "intermediate_size": dense[0].ffn.intermediate_size if dense else m.expert.intermediate_size,
        **rope_to_hf_scaled(s.position, "partial_rotary_factor"),
    }


FAMILY = Family(
    name="qwen3_next",
    model_types={"qwen3_next": "Qwen3NextForCausalLM"},
    signature={
        "position": ("rope", "none"),
        "norm": ("rmsnorm",),
        "ffn": ("moe",),  # (layer 0's; dense layers may follow) so that a plain dense model is nearer another family
        "block": ("pre_norm",),
        "attention": ("mha", "gqa", "mqa", "gated_deltanet"),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    ignore=(r"rotary_emb\.inv_freq$", r"^mtp\."),
    prefix="model.",
    options=("qk_norm", "output_gate", "norm.zero_centred"),
)
