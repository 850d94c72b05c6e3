"""OLMo-Hybrid (``model_type: olmo_hybrid``, ``OlmoHybridForCausalLM``): Gated DeltaNet layers and OLMo 2
style attention layers (``layer_types``), two wirings:

    linear_attention:  x = x + gdn(input_layernorm(x));  x = x + swiglu(post_attention_layernorm(x))   pre_norm
    full_attention:    x = x + post_attention_layernorm(attn(x));  x = x + post_feedforward_layernorm(swiglu(x))
                                                                                           post_sublayer (OLMo 2)

Here the model-wide components are the attention layers' (``block: post_sublayer``, ``qk_norm:
across_heads``, rope on whole heads) and the linear layers are one per-layer override (``block:
pre_norm``, ``attention: gated_deltanet`` with ``allow_neg_eigval``, ``position: none``: transformers
gives them no rotary tables). Names are those of the checkpoint files (transformers renames them on load):
a linear layer's norms are ``attention_layer_norm`` and ``feedforward_layer_norm``, an attention layer's
``feedforward_layer_norm`` (after attention) and ``post_feedforward_layernorm``; as our two wirings name
their norms alike (``attn_norm``, ``ffn_norm``), those rules are ``only`` for their block type. The Gated
DeltaNet's q/k/v/g/b/a_proj stack into its ``in_proj`` (``gdn_in``) and q/k/v_conv1d into its ``conv1d``;
``o_norm`` is its ``norm`` (eps 1e-5, fixed in transformers), ``o_proj`` its ``out_proj``. A config without
a rope theta (OLMo-Hybrid's NoPE mode) imports with ``position: none``.

transformers 5.24 writes q/k/v_conv1d by cutting the fused convolution into three EQUAL parts, which is
wrong when Hk Dk != H Dv (its own loading concatenates them back, so it does not notice); such files are
refused here with the shapes named. Published checkpoints hold the true q, k, v parts.
"""

from __future__ import annotations

from typing import Any

from ..schema import ModelConfig, config_to_dict
from .common import Exporting, Family, HFConfig, Rule, attention_rules, copy, fused, swiglu_rules
from .qwen3 import attention_dict, check_plain_scores, check_qk_norms
from .rope_scaling import _merged, rope_from_hf_scaled, rope_to_hf_scaled

L = "model.layers.{i}"
GDN, ATTN = "pre_norm", "post_sublayer"  # the block of each layer kind
NORM_EPS = 1e-5  # OlmoHybridGatedDeltaNet's o_norm (FLA's FusedRMSNormGated default)
LINEAR, FULL = "linear_attention", "full_attention"


def _only(rule: Rule, block: str) -> Rule:
    return Rule(rule.ours, rule.theirs, rule.how, rule.vocab, block)


RULES = (
    copy("embed.weight", "model.embed_tokens.weight", vocab=True),
    # linear-attention layers
    _only(copy("layers.{i}.attn_norm.weight", f"{L}.attention_layer_norm.weight"), GDN),
    _only(copy("layers.{i}.ffn_norm.weight", f"{L}.feedforward_layer_norm.weight"), GDN),
    fused(
        "gdn_in",
        "layers.{i}.attn.in_proj.weight",
        *(f"{L}.linear_attn.{p}_proj.weight" for p in ("q", "k", "v", "g", "b", "a")),
    ),
    fused("gdn_in", "layers.{i}.attn.conv1d.weight", *(f"{L}.linear_attn.{p}_conv1d.weight" for p in "qkv")),
    copy("layers.{i}.attn.dt_bias", f"{L}.linear_attn.dt_bias"),
    copy("layers.{i}.attn.A_log", f"{L}.linear_attn.A_log"),
    copy("layers.{i}.attn.norm.weight", f"{L}.linear_attn.o_norm.weight"),
    copy("layers.{i}.attn.out_proj.weight", f"{L}.linear_attn.o_proj.weight"),
    # attention layers (OLMo 2's)
    _only(copy("layers.{i}.attn_norm.weight", f"{L}.feedforward_layer_norm.weight"), ATTN),
    _only(copy("layers.{i}.ffn_norm.weight", f"{L}.post_feedforward_layernorm.weight"), ATTN),
    *attention_rules(f"{L}.self_attn", qk_norm=True),  # q_norm [H D], k_norm [Hkv D]
    # both
    *swiglu_rules(f"{L}.mlp"),
    copy("final_norm.weight", "model.norm.weight"),
    copy("head.proj.weight", "lm_head.weight", vocab=True),
)


def _layer_types(c: HFConfig, layers: int) -> list[str]:
    given = c.get("layer_types")
    if given is None:  # transformers' default: attention every 4th layer (and at least the last)
        given = [FULL if i % 4 == 3 else LINEAR for i in range(layers)]
        given[-1] = FULL if FULL not in given else given[-1]
    if not isinstance(given, list) or len(given) != layers or not set(given) <= {LINEAR, FULL}:
        c.fail("layer_types", f"expected {layers} of {LINEAR!r} / {FULL!r}", "list one type per layer")
        return [FULL] * layers
    return given


def gated_deltanet(c: HFConfig, hidden: int, heads: int) -> dict[str, Any]:
    """Our gated_deltanet from OlmoHybridConfig's linear_* keys (their defaults as transformers derives them)."""
    key_heads = c.get("linear_num_key_heads", heads, int, min=1, bound="num_heads")
    value_heads = c.get("linear_num_value_heads", heads, int, min=1, bound="num_heads")
    key_dim = c.get("linear_key_head_dim", max(1, int(0.75 * hidden / key_heads)), int, min=1, bound="head_dim")
    return {
        "type": "gated_deltanet",
        "num_heads": value_heads,
        "num_key_heads": key_heads,
        "head_dim": key_dim,
        "value_head_dim": c.get("linear_value_head_dim", 2 * key_dim, int, min=1, bound="head_dim"),
        "conv_size": c.get("linear_conv_kernel_dim", 4, int, min=1, max=64),
        "allow_neg_eigval": c.get("linear_allow_neg_eigval", True, bool),
        "norm_eps": NORM_EPS,
        "dt_min": c.get("linear_dt_min", 0.001, float, min=0.0),
        "dt_max": c.get("linear_dt_max", 0.1, float, min=0.0),
    }


def to_composer(c: HFConfig) -> dict[str, Any]:
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    layers = c.need("num_hidden_layers")
    kv_heads = c.get("num_key_value_heads", heads, int, min=1, bound="num_heads")
    if c.get("hidden_act", "silu", str) not in ("silu", "swish"):
        c.fail("hidden_act", f"{c.get('hidden_act')!r} is not supported for olmo_hybrid", "SwiGLU here uses silu")
    if hidden % heads:
        c.fail("num_attention_heads", f"{heads} does not divide hidden_size {hidden}", "its head_dim is C / H")
    eps = c.get("rms_norm_eps", 1e-6, float, min=0.0)
    attention = attention_dict(c, heads, kv_heads, max(1, hidden // heads), c.get("attention_bias", False, bool))
    attention.update(num_heads=heads, qk_norm="across_heads", qk_norm_eps=eps)
    nope = _merged(c).get("rope_theta") is None and c.get("rope_theta") is None
    types = _layer_types(c, layers)
    linear = [i for i, t in enumerate(types) if t == LINEAR]
    gdn = {"block": {"type": GDN}, "attention": gated_deltanet(c, hidden, heads), "position": {"type": "none"}}
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "max_position_embeddings": c.need("max_position_embeddings"),
        "dropout": 0.0,
        "block": {"type": ATTN},
        "attention": attention,
        "ffn": {"type": "swiglu", "intermediate_size": c.need("intermediate_size"), "bias": False},
        "norm": {"type": "rmsnorm", "eps": eps},
        "position": {"type": "none"} if nope else rope_from_hf_scaled(c, "olmo_hybrid"),
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.02, float, min=0.0, max=1.0),
        "layers": [{"select": linear, **gdn}] if linear else [],
        "name": "olmo_hybrid",
    }


def _kinds(e: Exporting) -> tuple[list, list]:
    specs = e.cfg.layer_specs()
    return [s for s in specs if s.attention.type == "gated_deltanet"], [
        s for s in specs if s.attention.type != "gated_deltanet"
    ]


def _alike(e: Exporting, specs: list, what: str) -> None:
    first = {s: config_to_dict(getattr(specs[0], s)) for s in ("attention", "block", "ffn", "norm", "position")}
    for spec in specs[1:]:
        for slot, value in first.items():
            if config_to_dict(getattr(spec, slot)) != value:
                e.no("layers", f"layer {spec.index}'s {slot} differs from layer {specs[0].index}'s ({what} layers)")
                return


def _check_gdn(e: Exporting, s: Any) -> None:
    g = s.attention
    e.require(s.block.type == GDN, "layers", f"layer {s.index}: gated_deltanet layers are pre_norm", "block: pre_norm")
    e.require(g.norm_eps == NORM_EPS, "layers", f"layer {s.index}: the output norm's eps is {NORM_EPS} here")


def _check_attention(e: Exporting, s: Any) -> None:
    a = s.attention
    where = f"layer {s.index}"
    e.require(s.block.type == ATTN, "block.type", f"{where}: attention layers are post_sublayer (OLMo 2)")
    e.require(a.type in ("mha", "gqa", "mqa"), "attention.type", f"{where}: {a.type} has no equivalent")
    if a.type not in ("mha", "gqa", "mqa"):
        return
    check_qk_norms(e, a, s.norm.eps, "across_heads")  # OLMo 2's: by the weight, not (1 + weight)
    e.require(a.head_dim * a.num_heads == e.cfg.hidden_size, "attention.head_dim", "head_dim * num_heads == C")
    e.require(a.bias == a.out_bias, "attention.out_bias", "attention_bias is on all four projections or none")
    e.require(s.position.type == "rope", "position.type", "its attention layers use rope", "position: rope")
    if s.position.type == "rope":
        e.require(s.position.rotary_fraction == 1.0, "position.rotary_fraction", "it rotates whole heads")
    check_plain_scores(e, a, "olmo_hybrid")


def match(e: Exporting) -> str:
    gdn, attn = _kinds(e)
    e.require(bool(gdn) and bool(attn), "layers", "OLMo-Hybrid has both gated_deltanet and attention layers")
    for specs, what, check in ((gdn, "gated_deltanet", _check_gdn), (attn, "attention", _check_attention)):
        if specs:
            _alike(e, specs, what)
            check(e, specs[0])
    ffns = {str(config_to_dict(s.ffn)) for s in gdn + attn}
    e.require(len(ffns) == 1, "layers", "one feed-forward in every layer")
    f = (gdn + attn)[0].ffn
    e.require(f.type == "swiglu" and not f.bias, "ffn", "OLMo-Hybrid layers end with a bias-free SwiGLU")
    return "olmo_hybrid"


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    specs = cfg.layer_specs()
    g = next(s for s in specs if s.attention.type == "gated_deltanet").attention
    s = next(s for s in specs if s.attention.type != "gated_deltanet")
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
        "layer_types": [LINEAR if x.attention.type == "gated_deltanet" else FULL for x in specs],
        "linear_num_key_heads": g.num_key_heads,
        "linear_num_value_heads": g.num_heads,
        "linear_key_head_dim": g.head_dim,
        "linear_value_head_dim": g.value_head_dim,
        "linear_conv_kernel_dim": g.conv_size,
        "linear_allow_neg_eigval": g.allow_neg_eigval,
        "linear_dt_min": g.dt_min,
        "linear_dt_max": g.dt_max,
        **rope_to_hf_scaled(s.position),
    }


FAMILY = Family(
    name="olmo_hybrid",
    model_types={"olmo_hybrid": "OlmoHybridForCausalLM"},
    signature={
        "position": ("rope", "none"),
        "norm": ("rmsnorm",),
        "ffn": ("swiglu",),
        "block": ("post_sublayer", "pre_norm"),
        "attention": ("mha", "gqa", "mqa", "gated_deltanet"),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    ignore=(r"rotary_emb\.inv_freq$",),
    prefix="model.",
    options=("qk_norm",),
)
