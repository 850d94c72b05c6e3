"""gpt-oss (``model_type: gpt_oss``, ``GptOssForCausalLM``; OpenAI, 2025): pre-norm RMSNorm, grouped-query
attention with biases on q, k, v and o and a learned per-head sink logit in the softmax (``sinks: true``),
sliding-window layers (``layer_types``: every other layer from layer 0, window 128) beside full ones,
YaRN rope (factor 32 from 4,096 tokens, not truncated), and in every layer a mixture of clamped SwiGLU
experts with biases (``moe_gpt_oss``: a router with a bias, top-k of the logits, softmax over the chosen,
which is the renormalised softmax of ``normalize_top_k``; components/moe.py, components/moe_experts.py).

Here the full layers' attention is the model's and the sliding layers are per-layer overrides of it
(qwen3.with_windows), as for Qwen2 / Qwen3. The attention, norm and embedding table is llama.py's.

The experts: transformers stores each layer's experts as four fused tensors, ``[E, in, out]``, with gate and
up INTERLEAVED along the last dim of ``gate_up_proj`` (gate = [..., 0::2], up = [..., 1::2]):

    mlp.experts.gate_up_proj       [E, C, 2I]   <->  ffn.experts.gate_up.weight  [E x 2I, C], [gate | up] rows
    mlp.experts.gate_up_proj_bias  [E, 2I]      <->  ffn.experts.gate_up.bias    [E x 2I]
    mlp.experts.down_proj          [E, I, C]    <->  ffn.experts.down.weight     [E x C, I]
    mlp.experts.down_proj_bias     [E, C]       <->  ffn.experts.down.bias       [E x C]

transformers' own ``hidden_act`` is not read by its gpt-oss modules (the experts' activation is the clamped
SwiGLU of ``swiglu_limit`` / ``swiglu_alpha``), so it is not read here either. Refused by name: quantized
checkpoints (``quantization_config``, the MXFP4 of the published release: dequantize them first), a
partial rotary fraction, sliding layers without a ``sliding_window``, unknown ``layer_types``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..schema import ModelConfig
from . import qwen3
from .common import CONVERTERS, Exporting, Family, HFConfig, copy, fused
from .llama import RULES as LLAMA_RULES
from .rope_scaling import rope_from_hf_scaled, rope_to_hf_scaled

SLIDING, FULL = qwen3.SLIDING, qwen3.FULL
DEFAULT_THETA = 150000.0  # GptOssConfig.default_theta
DEFAULT_ROPE = {  # GptOssConfig's rope when config.json has none (the published model's)
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


# ----------------------------------------------------------------------------- the fused experts
def _interleaved_to_halves(x: Tensor) -> Tensor:
    """[E, 2I, ...] rows gate_0, up_0, gate_1, up_1, ... -> [E, 2I, ...] rows [gate | up]."""
    return torch.cat([x[:, 0::2], x[:, 1::2]], dim=1)


def _halves_to_interleaved(x: Tensor) -> Tensor:
    """[E, 2I, ...] rows [gate | up] -> [E, 2I, ...] rows gate_0, up_0, gate_1, up_1, ..."""
    gate, up = x.chunk(2, dim=1)
    return torch.stack([gate, up], dim=2).reshape(x.shape)


def gate_up_to_ours(parts: list[Tensor], ffn: Any) -> Tensor:
    """gate_up_proj [E, C, 2I] -> [E x 2I, C]; gate_up_proj_bias [E, 2I] -> [E x 2I]."""
    t = parts[0]
    if t.dim() == 3:
        return _interleaved_to_halves(t.transpose(1, 2)).reshape(-1, t.shape[1])
    return _interleaved_to_halves(t).reshape(-1)


def gate_up_to_theirs(t: Tensor, ffn: Any) -> list[Tensor]:
    e = ffn.num_experts
    if t.dim() == 2:  # [E x 2I, C] -> [E, C, 2I]
        return [_halves_to_interleaved(t.reshape(e, -1, t.shape[1])).transpose(1, 2).contiguous()]
    return [_halves_to_interleaved(t.reshape(e, -1))]


def down_to_ours(parts: list[Tensor], ffn: Any) -> Tensor:
    """down_proj [E, I, C] -> [E x C, I]; down_proj_bias [E, C] -> [E x C]."""
    t = parts[0]
    return t.transpose(1, 2).reshape(-1, t.shape[1]) if t.dim() == 3 else t.reshape(-1)


def down_to_theirs(t: Tensor, ffn: Any) -> list[Tensor]:
    e = ffn.num_experts
    if t.dim() == 2:  # [E x C, I] -> [E, I, C]
        return [t.reshape(e, -1, t.shape[1]).transpose(1, 2).contiguous()]
    return [t.reshape(e, -1)]


CONVERTERS["gpt_oss_gate_up"] = (gate_up_to_ours, gate_up_to_theirs)
CONVERTERS["gpt_oss_down"] = (down_to_ours, down_to_theirs)

L, M = "model.layers.{i}", "model.layers.{i}.mlp"
RULES = (
    *(r for r in LLAMA_RULES if ".ffn." not in r.ours),  # embeddings, norms, q/k/v/o with their biases, head
    copy("layers.{i}.attn.sinks", f"{L}.self_attn.sinks"),
    copy("layers.{i}.ffn.router.weight", f"{M}.router.weight"),
    copy("layers.{i}.ffn.router.bias", f"{M}.router.bias"),
    fused("gpt_oss_gate_up", "layers.{i}.ffn.experts.gate_up.weight", f"{M}.experts.gate_up_proj"),
    fused("gpt_oss_gate_up", "layers.{i}.ffn.experts.gate_up.bias", f"{M}.experts.gate_up_proj_bias"),
    fused("gpt_oss_down", "layers.{i}.ffn.experts.down.weight", f"{M}.experts.down_proj"),
    fused("gpt_oss_down", "layers.{i}.ffn.experts.down.bias", f"{M}.experts.down_proj_bias"),
)


# ----------------------------------------------------------------------------- import
def _refuse(c: HFConfig) -> None:
    """What config.json may say that has no equivalent here."""
    if c.data.get("quantization_config") is not None:
        method = c.data["quantization_config"]
        method = method.get("quant_method", "?") if isinstance(method, dict) else method
        c.fail(
            "quantization_config",
            f"quantized weights ({method}) are not supported",
            "dequantize first: transformers' from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True))"
            ".save_pretrained(out), then import `out`",
        )


def _layer_types(c: HFConfig, num_layers: int) -> list[str]:
    """Each layer's attention: ``layer_types``, else GptOssConfig's default (sliding on even layers)."""
    given = c.get("layer_types")
    if given is None:
        return [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
    if not isinstance(given, list) or len(given) != num_layers or any(t not in (SLIDING, FULL) for t in given):
        c.fail("layer_types", f"expected {num_layers} entries of {SLIDING} / {FULL}", "one entry per layer")
        return [FULL] * num_layers
    return list(given)


def _window(c: HFConfig, types: list[str]) -> Any:
    window = c.get("sliding_window", 128, int, min=1, bound="max_position_embeddings")
    if "sliding_window" in c.data and c.data["sliding_window"] is None:
        window = None
    if window is None and SLIDING in types:
        c.fail("sliding_window", f"is null but layer_types has {SLIDING} layers", "set sliding_window (e.g. 128)")
    return window


def _rope(c: HFConfig) -> dict[str, Any]:
    """GptOssConfig's defaults (YaRN, theta 150,000) where config.json has no rope of its own."""
    if c.data.get("rope_parameters") is None and c.data.get("rope_scaling") is None:
        c.data["rope_parameters"] = dict(DEFAULT_ROPE)
    given = [c.data.get(key) for key in ("rope_scaling", "rope_parameters")]
    if "rope_theta" not in c.data and not any(isinstance(g, dict) and "rope_theta" in g for g in given):
        c.data["rope_theta"] = DEFAULT_THETA
    out = rope_from_hf_scaled(c, "gpt_oss")
    if out.get("rotary_fraction", 1.0) != 1.0:
        c.fail("partial_rotary_factor", "gpt-oss rotates whole heads", "remove partial_rotary_factor (or set 1.0)")
    return out


def _moe(c: HFConfig) -> dict[str, Any]:
    return {
        "type": "moe_gpt_oss",
        "num_experts": c.get("num_local_experts", 128, int, min=1, bound="num_experts"),
        "top_k": c.get("num_experts_per_tok", 4, int, min=1, bound="num_experts"),
        "expert": {
            "type": "swiglu_clamped",
            "intermediate_size": c.need("intermediate_size"),
            "bias": True,
            "limit": c.get("swiglu_limit", 7.0, float, min=0.0),
            "alpha": c.get("swiglu_alpha", 1.702, float, min=0.0),
        },
        "score": "softmax",
        "normalize_top_k": True,  # softmax over the top-k logits = the renormalised top-k of the softmax
        "router_bias": True,
        "aux_loss_weight": c.get("router_aux_loss_coef", 0.001, float, min=0.0),
    }


def to_composer(c: HFConfig) -> dict[str, Any]:
    _refuse(c)
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    layers, max_pos = c.need("num_hidden_layers"), c.need("max_position_embeddings")
    kv_heads = c.get("num_key_value_heads", 8, int, min=1, bound="num_heads")  # GptOssConfig's defaults
    head_dim = c.get("head_dim", 64, int, min=1, bound="head_dim")
    attention = qwen3.attention_dict(c, heads, kv_heads, head_dim, c.get("attention_bias", True, bool))
    attention["sinks"] = True
    types = _layer_types(c, layers)
    window = _window(c, types)
    attention, overrides = qwen3.with_windows(attention, types, window or max_pos, heads, kv_heads, max_pos)
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "max_position_embeddings": max_pos,
        "dropout": 0.0,
        "block": {"type": "pre_norm"},
        "attention": attention,
        "ffn": _moe(c),
        "norm": {"type": "rmsnorm", "eps": c.get("rms_norm_eps", 1e-5, float, min=0.0)},
        "position": _rope(c),
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0),
        "layers": overrides,
        "name": "gpt_oss",
    }


# ----------------------------------------------------------------------------- export
def _check_attention(e: Exporting) -> None:
    specs = e.cfg.layer_specs()
    no_sinks = [s.index for s in specs if not s.attention.sinks]
    e.require(not no_sinks, "attention.sinks", f"layers {no_sinks} have none: every gpt-oss layer has sinks")
    a = specs[0].attention
    e.require(a.bias == a.out_bias, "attention.out_bias", "attention_bias is on all four projections or none")
    qwen3.check_plain_scores(e, a, "gpt_oss")
    e.require(specs[0].position.rotary_fraction == 1.0, "position.rotary_fraction", "gpt-oss rotates whole heads")


def _check_moe(e: Exporting, m: Any) -> None:
    """Softmax over the top-k logits with a router bias, clamped SwiGLU experts with biases, nothing else."""
    e.require(m.score == "softmax", "ffn.score", f"{m.score}: gpt-oss scores experts with a softmax")
    e.require(m.normalize_top_k, "ffn.normalize_top_k", "gpt-oss's softmax is over the chosen experts", "set it")
    e.require(m.routed_scaling_factor == 1.0, "ffn.routed_scaling_factor", "no routed scaling", "set it to 1.0")
    e.require(m.n_group == 1, "ffn.n_group", "no group-limited routing", "set n_group: 1")
    e.require(m.router_bias, "ffn.router_bias", "its router has a bias", "set router_bias: true")
    e.require(not m.aux_free_bias, "ffn.aux_free_bias", "no correction bias", "set aux_free_bias: false")
    e.require(m.shared_experts == 0, "ffn.shared_experts", "no shared experts", "set shared_experts: 0")
    x = m.expert
    e.require(
        x.type == "swiglu_clamped" and x.bias,
        "ffn.expert",
        "its experts are clamped SwiGLU with biases",
        "expert: {type: swiglu_clamped, bias: true}",
    )


def match(e: Exporting) -> str:
    qwen3.check_layers_alike(e, "gpt_oss")  # alike but for one window on the sliding layers
    _check_attention(e)
    _check_moe(e, e.cfg.layer(0).ffn)
    return "gpt_oss"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    specs = cfg.layer_specs()
    s = specs[0]
    a, m = s.attention, s.ffn
    windows = [x.attention.window for x in specs if x.attention.type == "sliding_window"]
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
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        "layer_types": [SLIDING if x.attention.type == "sliding_window" else FULL for x in specs],
        # transformers builds the sliding mask even without sliding layers, and refuses a null window then
        "sliding_window": windows[0] if windows else cfg.max_position_embeddings,
        "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.aux_loss_weight,
        "output_router_logits": False,
        "swiglu_limit": m.expert.limit,
        "swiglu_alpha": m.expert.alpha,
        **rope_to_hf_scaled(s.position),
    }


FAMILY = Family(
    name="gpt_oss",
    model_types={"gpt_oss": "GptOssForCausalLM"},
    signature={
        "position": ("rope",),
        "norm": ("rmsnorm",),
        "ffn": ("moe_gpt_oss",),
        "block": ("pre_norm",),
        "attention": ("mha", "gqa", "mqa", "sliding_window"),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    ignore=(r"rotary_emb\.inv_freq$",),
    prefix="model.",
    options=("sinks",),
)
