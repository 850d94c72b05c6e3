"""IBM Bamba (``model_type: bamba``, ``BambaForCausalLM``): Mamba-2 layers with a few softmax-attention
layers (``attn_layer_indices``), every layer pre-norm with a SwiGLU feed-forward:

    x = x + mixer(input_layernorm(x))        mixer: mamba2, or grouped-query attention on the listed layers
    x = x + swiglu(pre_ff_layernorm(x))

Here the model-wide mixer is ``mamba2`` and the attention layers are per-layer overrides (``layers:
[{select: [...], attention: {type: gqa, ...}}]``), so ``config.layer(i)`` shows each. Attention rotates
half of each head (transformers sets ``partial_rotary_factor`` 0.5 for Bamba whatever config.json says),
and has one bias switch for all four projections. ``z_loss_coefficient`` (a training-loss term) is not
imported. The Mamba-2 keys are ``mamba_*`` (mamba2.py translates them); the mixer's tensors are named
as in ``Mamba2Mixer`` under ``mamba``.
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig, config_to_dict
from .common import (
    Exporting,
    Family,
    HFConfig,
    attention_from_heads,
    attention_rules,
    copy,
    rope_from_hf,
    rope_to_hf,
    swiglu_rules,
)
from .mamba2 import check_mixer, limit_to_hf, mamba2_mixer, mixer_rules

L = "model.layers.{i}"
ROTARY_FRACTION = 0.5  # BambaConfig.__post_init__ hard-codes it
RULES = (
    copy("embed.weight", "model.embed_tokens.weight", vocab=True),
    copy("layers.{i}.attn_norm.weight", f"{L}.input_layernorm.weight"),
    *mixer_rules(f"{L}.mamba"),
    *attention_rules(f"{L}.self_attn"),
    copy("layers.{i}.ffn_norm.weight", f"{L}.pre_ff_layernorm.weight"),
    *swiglu_rules(f"{L}.feed_forward"),
    copy("final_norm.weight", "model.final_layernorm.weight"),
    copy("head.proj.weight", "lm_head.weight", vocab=True),
)
KEYS = {  # our mamba2 option -> BambaConfig's key
    "num_heads": "mamba_n_heads",
    "head_dim": "mamba_d_head",
    "expand": "mamba_expand",
    "state_size": "mamba_d_state",
    "n_groups": "mamba_n_groups",
    "conv_size": "mamba_d_conv",
    "conv_bias": "mamba_conv_bias",
    "use_bias": "mamba_proj_bias",
    "chunk_size": "mamba_chunk_size",
}


def attention_layers(c: HFConfig, num_layers: int) -> list[int]:
    given = c.get("attn_layer_indices", [])
    if not isinstance(given, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in given):
        c.fail("attn_layer_indices", f"expected layer indices in [0, {num_layers}), got {given!r}", "list them")
        return []
    return sorted(set(given))


def to_composer(c: HFConfig) -> dict[str, Any]:
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    layers = c.need("num_hidden_layers")
    kv_heads = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
    if hidden % heads:
        c.fail("num_attention_heads", f"{heads} does not divide hidden_size {hidden}", "Bamba's head_dim is C / H")
    eps = c.get("rms_norm_eps", 1e-5, float, min=0.0)
    bias = c.get("attention_bias", False, bool)
    attention = {
        **attention_from_heads(heads, kv_heads),
        "num_heads": heads,  # set: an override keeps the options of the model-wide mixer its type also has
        "head_dim": max(1, hidden // heads),
        "bias": bias,
        "out_bias": bias,
        "dropout": c.get("attention_dropout", 0.0, float),
    }
    position = rope_from_hf(c, default_fraction=ROTARY_FRACTION)
    position["rotary_fraction"] = ROTARY_FRACTION
    attn = attention_layers(c, layers)
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "max_position_embeddings": c.need("max_position_embeddings"),
        "dropout": 0.0,
        "block": {"type": "pre_norm"},
        "attention": mamba2_mixer(c, hidden, KEYS, eps),
        "ffn": {
            "type": "swiglu",
            "intermediate_size": c.need("intermediate_size"),
            "bias": c.get("mlp_bias", False, bool),
        },
        "norm": {"type": "rmsnorm", "eps": eps},
        "position": position,
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0, max=1.0),
        "layers": [{"select": attn, "attention": attention}] if attn else [],
        "name": "bamba",
    }


def _alike(e: Exporting, specs: list, what: str) -> None:
    """Every layer in ``specs`` has the same components (per kind: Bamba has one config per kind)."""
    if not specs:
        return
    first = {s: config_to_dict(getattr(specs[0], s)) for s in ("attention", "ffn", "norm", "position", "block")}
    for spec in specs[1:]:
        for slot, value in first.items():
            if config_to_dict(getattr(spec, slot)) != value:
                e.no("layers", f"layer {spec.index}'s {slot} differs from layer {specs[0].index}'s ({what} layers)")
                return


def match(e: Exporting) -> str:
    specs = e.cfg.layer_specs()
    mamba = [s for s in specs if s.attention.type == "mamba2"]
    attn = [s for s in specs if s.attention.type != "mamba2"]
    e.require(bool(mamba), "attention.type", "no mamba2 layer: export it as a Llama-family model instead")
    _alike(e, mamba, "mamba2")
    _alike(e, attn, "attention")
    for s in attn:
        a = s.attention
        e.require(a.type in ("mha", "gqa", "mqa"), "layers", f"layer {s.index}: {a.type} attention has no equivalent")
        e.require(a.bias == a.out_bias, "layers", f"layer {s.index}: one attention_bias covers qkv and out")
        break
    for s in specs[:1]:
        e.require(s.ffn.type == "swiglu", "ffn.type", "Bamba layers end with a SwiGLU feed-forward")
        e.require(
            s.position.rotary_fraction == ROTARY_FRACTION,
            "position.rotary_fraction",
            f"{s.position.rotary_fraction}: Bamba rotates half of each head",
            "use rotary_fraction: 0.5",
        )
        if mamba:
            check_mixer(e, mamba[0].attention, s.norm.eps, e.cfg.hidden_size)
    if mamba and attn:
        e.require(
            {config_to_dict(s.ffn) == config_to_dict(mamba[0].ffn) for s in attn} == {True},
            "layers",
            "the attention layers' feed-forward differs from the mamba2 layers'",
        )
    return "bamba"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    specs = cfg.layer_specs()
    mamba = next(s for s in specs if s.attention.type == "mamba2")
    attn = [s.index for s in specs if s.attention.type != "mamba2"]
    a = specs[attn[0]].attention if attn else None
    m, f = mamba.attention, mamba.ffn
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": f.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads if a else cfg.num_heads,
        "num_key_value_heads": a.kv_heads() if a else cfg.num_heads,
        "attention_bias": a.bias if a else False,
        "attention_dropout": a.dropout if a else 0.0,
        "mlp_bias": f.bias,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": mamba.norm.eps,
        "attn_layer_indices": attn,
        "mamba_n_heads": m.num_heads,
        "mamba_d_head": m.head_dim,
        "mamba_expand": m.num_heads * m.head_dim // cfg.hidden_size,
        "mamba_d_state": m.state_size,
        "mamba_n_groups": m.n_groups,
        "mamba_d_conv": m.conv_size,
        "mamba_conv_bias": m.conv_bias,
        "mamba_proj_bias": m.use_bias,
        "mamba_chunk_size": m.chunk_size,
        "z_loss_coefficient": 0.0,
        **rope_to_hf(mamba.position, "partial_rotary_factor"),
    }
    limit = limit_to_hf(m)
    if limit is not None:
        out["time_step_limit"] = limit
    return out


FAMILY = Family(
    name="bamba",
    model_types={"bamba": "BambaForCausalLM"},
    signature={
        "position": ("rope",),
        "norm": ("rmsnorm",),
        "ffn": ("swiglu",),
        "block": ("pre_norm",),
        "attention": ("mamba2", "mha", "gqa", "mqa"),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    ignore=(r"rotary_emb\.inv_freq$",),
    prefix="model.",
)
