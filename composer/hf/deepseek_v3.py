"""DeepSeek-V3 (``model_type: deepseek_v3``, ``DeepseekV3ForCausalLM``): multi-head latent attention
(``mla``, components/mla.py) in every layer; a SwiGLU feed-forward in the first ``first_k_dense_replace``
layers and DeepSeek's mixture of experts after them (``moe_deepseek``: sigmoid scores, group-limited
top-k over ``n_group`` / ``topk_group``, the aux-loss-free ``e_score_correction_bias``, routed scaling,
``n_shared_experts`` always-on experts); pre-norm RMSNorm; rope, default or YaRN (the published model:
factor 40 from 4,096 tokens, mscale = mscale_all_dim = 1), over the qk_rope_head_dim rope dims in
DeepSeek's interleaved layout (``rope_interleave``).

The attention's parameters keep transformers' names (``self_attn.q_a_proj`` is ``attn.q_a_proj``). The
experts are stacked here (``ffn.experts.gate_up`` [E x 2I, C], ``ffn.experts.down`` [E x C, I]) and one
tensor per expert in checkpoints (``mlp.experts.{j}.gate_proj`` / ``up_proj`` / ``down_proj``, as
transformers writes them); the dense layers become a per-layer ``ffn`` override. The multi-token
prediction layer of the published checkpoints (``model.layers.61``, ``num_nextn_predict_layers``) is
not part of the causal LM and is skipped, as transformers skips it. transformers computes no balancing
loss for DeepSeek-V3, so an import sets ``aux_loss_weight: 0`` (the training loss is its loss).
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig, config_to_dict
from .common import Exporting, Family, HFConfig, copy, fused, swiglu_rules
from .rope_scaling import rope_from_hf_scaled, rope_to_hf_scaled

L, A = "model.layers.{i}", "model.layers.{i}.self_attn"
ATTENTION = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
RULES = (
    copy("embed.weight", "model.embed_tokens.weight", vocab=True),
    copy("layers.{i}.attn_norm.weight", f"{L}.input_layernorm.weight"),
    *(copy(f"layers.{{i}}.attn.{m}.{p}", f"{A}.{m}.{p}") for m in (*ATTENTION, "o_proj") for p in ("weight", "bias")),
    copy("layers.{i}.ffn_norm.weight", f"{L}.post_attention_layernorm.weight"),
    # the first_k_dense_replace dense layers
    *swiglu_rules(f"{L}.mlp"),
    # the mixture-of-experts layers
    copy("layers.{i}.ffn.router.weight", f"{L}.mlp.gate.weight"),
    copy("layers.{i}.ffn.router.load.e_score_correction_bias", f"{L}.mlp.gate.e_score_correction_bias"),
    fused(
        "rows",
        "layers.{i}.ffn.experts.gate_up.weight",
        f"{L}.mlp.experts.{{j}}.gate_proj.weight",
        f"{L}.mlp.experts.{{j}}.up_proj.weight",
    ),
    fused("rows", "layers.{i}.ffn.experts.down.weight", f"{L}.mlp.experts.{{j}}.down_proj.weight"),
    fused(
        "gate_up",
        "layers.{i}.ffn.shared.gate_up.weight",
        f"{L}.mlp.shared_experts.gate_proj.weight",
        f"{L}.mlp.shared_experts.up_proj.weight",
    ),
    copy("layers.{i}.ffn.shared.down.weight", f"{L}.mlp.shared_experts.down_proj.weight"),
    copy("final_norm.weight", "model.norm.weight"),
    copy("head.proj.weight", "lm_head.weight", vocab=True),
)
LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with their default eps
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
MLA_DEFAULTS = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64}


def _attention(c: HFConfig, heads: int) -> dict[str, Any]:
    kv_heads = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
    if kv_heads != heads:
        c.fail(
            "num_key_value_heads",
            f"{kv_heads} differs from num_attention_heads={heads}: latent attention decompresses a key and a "
            "value for every head",
            "set num_key_value_heads to num_attention_heads",
        )
    out: dict[str, Any] = {"type": "mla", "norm_eps": LATENT_NORM_EPS}
    for key in MLA_KEYS:
        default = MLA_DEFAULTS.get(key, 128)
        bound = "hidden_size" if key.endswith("lora_rank") else "head_dim"
        out[key] = c.get(key, None if key == "q_lora_rank" else default, int, min=1, bound=bound)
    if "q_lora_rank" not in c.data:  # DeepseekV3Config's default
        out["q_lora_rank"] = MLA_DEFAULTS["q_lora_rank"]
    out.update(
        bias=c.get("attention_bias", False, bool),
        rope_interleave=c.get("rope_interleave", True, bool),
        dropout=c.get("attention_dropout", 0.0, float),
    )
    return out


def _moe(c: HFConfig) -> dict[str, Any]:
    width = c.need("moe_intermediate_size", bound="intermediate_size")
    shared = c.get("n_shared_experts", 1, int, min=0, bound="num_experts")
    if shared == 0:
        c.fail("n_shared_experts", "0 shared experts is not supported for deepseek_v3", "use n_shared_experts >= 1")
    experts = c.get("n_routed_experts", 256, int, min=1, bound="num_experts")
    return {
        "type": "moe_deepseek",
        "num_experts": experts,
        "top_k": c.get("num_experts_per_tok", 8, int, min=1, bound="num_experts"),
        "expert": {"type": "swiglu", "intermediate_size": width},
        "score": "sigmoid",
        "normalize_top_k": c.get("norm_topk_prob", True, bool),
        "routed_scaling_factor": c.get("routed_scaling_factor", 2.5, float, min=0.0),
        "n_group": c.get("n_group", 8, int, min=1, bound="num_experts"),
        "topk_group": c.get("topk_group", 4, int, min=1, bound="num_experts"),
        "aux_loss_weight": 0.0,
        "aux_free_bias": True,
        "shared_experts": shared,
        "shared_expert": {"type": "swiglu", "intermediate_size": width},
    }


def to_composer(c: HFConfig) -> dict[str, Any]:
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    layers, max_pos = c.need("num_hidden_layers"), c.need("max_position_embeddings")
    if c.get("hidden_act", "silu", str) not in ("silu", "swish"):
        c.fail("hidden_act", f"{c.get('hidden_act')!r} is not supported for deepseek_v3", "SwiGLU here uses silu")
    dense = c.get("first_k_dense_replace", 3, int, min=0, bound="num_layers")
    swiglu = {"type": "swiglu", "intermediate_size": c.need("intermediate_size")}
    ffn, overrides = _moe(c), []
    if dense >= layers:
        ffn = swiglu
    elif dense:
        overrides = [{"select": f"0:{dense}", "ffn": swiglu}]
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "max_position_embeddings": max_pos,
        "dropout": 0.0,
        "block": {"type": "pre_norm"},
        "attention": _attention(c, heads),
        "ffn": ffn,
        "norm": {"type": "rmsnorm", "eps": c.get("rms_norm_eps", 1e-6, float, min=0.0)},
        "position": rope_from_hf_scaled(c, "deepseek_v3"),
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0),
        "layers": overrides,
        "name": "deepseek_v3",
    }


# ----------------------------------------------------------------------------- export
def _dense_layers(cfg: ModelConfig) -> int:
    """first_k_dense_replace: the leading layers with a dense feed-forward."""
    specs = cfg.layer_specs()
    return next((s.index for s in specs if s.ffn.type == "moe_deepseek"), len(specs))


def _check_attention(e: Exporting) -> None:
    specs = e.cfg.layer_specs()
    a = specs[0].attention
    if any(config_to_dict(s.attention) != config_to_dict(a) for s in specs):
        e.no("layers", "the attention differs between layers; DeepSeek-V3 uses one in every layer", "remove it")
    e.require(a.type == "mla", "attention.type", f"'{a.type}': DeepSeek-V3 uses latent attention", "use mla")
    if a.type != "mla":
        return
    e.require(a.norm_eps == LATENT_NORM_EPS, "attention.norm_eps", f"{a.norm_eps}: its latent norms use 1e-6")
    e.require(
        "softmax_scale" in a.__dict__.get("_inherited", ()),
        "attention.softmax_scale",
        f"{a.softmax_scale}: the scale follows from the head dims and YaRN's mscale_all_dim",
        "leave softmax_scale null",
    )
    e.require(a.num_heads == e.cfg.num_heads, "attention.num_heads", "its heads are the model's num_heads")
    e.require(specs[0].position.rotary_fraction == 1.0, "position.rotary_fraction", "it rotates every rope dim")


def _check_ffn(e: Exporting) -> None:
    specs, dense = e.cfg.layer_specs(), _dense_layers(e.cfg)
    kinds = [s.ffn.type for s in specs]
    e.require(
        kinds == ["swiglu"] * dense + ["moe_deepseek"] * (len(specs) - dense),
        "ffn",
        f"feed-forwards {kinds}: its first layers are dense (swiglu), the others moe_deepseek",
        "use swiglu in the first layers and moe_deepseek after them",
    )
    dense_ffns = {repr(config_to_dict(s.ffn)) for s in specs[:dense]}
    moes = {repr(config_to_dict(s.ffn)) for s in specs[dense:]}
    e.require(len(dense_ffns) <= 1 and len(moes) <= 1, "layers", "its dense layers and its MoE layers are alike")
    if dense:
        e.require(not specs[0].ffn.bias, "ffn.bias", "its feed-forwards have no biases", "set bias: false")
    if dense < len(specs):
        _check_moe(e, specs[dense].ffn)


def _check_moe(e: Exporting, m: Any) -> None:
    expert, shared = m.expert, m.shared_expert
    e.require(m.score == "sigmoid", "ffn.score", f"{m.score}: it scores experts with a sigmoid", "score: sigmoid")
    e.require(m.aux_free_bias, "ffn.aux_free_bias", "it has the correction bias", "set aux_free_bias: true")
    e.require(not m.router_bias, "ffn.router_bias", "its router has no bias", "set router_bias: false")
    e.require(not m.shared_expert_gate, "ffn.shared_expert_gate", "its shared experts are not gated")
    e.require(m.shared_experts >= 1, "ffn.shared_experts", "it has shared experts", "set shared_experts >= 1")
    e.require(
        expert.type == shared.type == "swiglu" and not expert.bias and not shared.bias,
        "ffn.expert",
        "its experts are SwiGLU without biases",
        "use {type: swiglu, bias: false} for expert and shared_expert",
    )
    e.require(
        shared.intermediate_size == expert.intermediate_size,
        "ffn.shared_expert.intermediate_size",
        f"{shared.intermediate_size}: its shared experts are as wide as the routed ones ({expert.intermediate_size})",
    )


def match(e: Exporting) -> str:
    _check_attention(e)
    _check_ffn(e)
    return "deepseek_v3"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    specs = cfg.layer_specs()
    a, dense = specs[0].attention, _dense_layers(cfg)
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_heads,
        **{key: getattr(a, key) for key in MLA_KEYS},
        "head_dim": a.qk_rope_head_dim,
        "qk_head_dim": a.qk_nope_head_dim + a.qk_rope_head_dim,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        "rope_interleave": a.rope_interleave,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": specs[0].norm.eps,
        "first_k_dense_replace": dense,
        "num_nextn_predict_layers": 0,
        **rope_to_hf_scaled(specs[0].position),
    }
    if dense:
        out["intermediate_size"] = specs[0].ffn.intermediate_size
    if dense < len(specs):
        m = specs[dense].ffn
        out.update(
            moe_intermediate_size=m.expert.intermediate_size,
            n_routed_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            n_shared_experts=m.shared_experts,
            norm_topk_prob=m.normalize_top_k,
            routed_scaling_factor=m.routed_scaling_factor,
            n_group=m.n_group,
            topk_group=m.topk_group if m.topk_group is not None else m.n_group,
        )
        out.setdefault("intermediate_size", m.expert.intermediate_size)
    return out


FAMILY = Family(
    name="deepseek_v3",
    model_types={"deepseek_v3": "DeepseekV3ForCausalLM"},
    signature={
        "position": ("rope",),
        "norm": ("rmsnorm",),
        "ffn": ("swiglu", "moe_deepseek"),
        "block": ("pre_norm",),
        "attention": ("mla",),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    # the multi-token-prediction layer of the published checkpoints (transformers skips it too)
    ignore=(r"rotary_emb\.inv_freq$", r"^model\.layers\.61\.", r"\.(enorm|hnorm|eh_proj|shared_head)\."),
    prefix="model.",
)
