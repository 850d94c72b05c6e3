"""Mamba-2 (``model_type: mamba2``, ``Mamba2ForCausalLM``): every layer is x = x + mixer(rmsnorm(x)), the
mixer being Mamba-2's SSD layer (``attention: mamba2``) and no feed-forward (``ffn: none``); no position
encoding; RMSNorm after the last layer (``norm_f``).

Names: the mixer's tensors are named as in transformers' ``Mamba2Mixer`` (in_proj, conv1d, dt_bias,
A_log, D, norm, out_proj), so each copies 1:1; the layer's ``norm`` is our block's ``attn_norm``. One
``layer_norm_epsilon`` serves the layer norms and the mixer's gated norm. ``residual_in_fp32`` only
changes low-precision runs (in float32 it is the same function); our residual stays in the model's
dtype. ``time_step_limit`` is written both ways as transformers 5 does (``{"__float__": "Infinity"}``)
and read in either spelling; ``time_step_rank`` is unused by Mamba-2's weights.

``mamba2_mixer`` translates the mixer's keys for any family whose layers are Mamba-2 (bamba.py).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..schema import ModelConfig
from .common import Exporting, Family, HFConfig, copy

L = "backbone.layers.{i}"
MIXER_TENSORS = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D")
MIXER_TENSORS += ("norm.weight", "out_proj.weight", "out_proj.bias")


def mixer_rules(theirs: str) -> tuple:
    """The Mamba-2 mixer's tensors of layer ``{i}``: ours ``layers.{i}.attn.<name>``, theirs ``<theirs>.<name>``."""
    return tuple(copy(f"layers.{{i}}.attn.{name}", f"{theirs}.{name}") for name in MIXER_TENSORS)


RULES = (
    copy("embed.weight", "backbone.embeddings.weight", vocab=True),
    copy("layers.{i}.attn_norm.weight", f"{L}.norm.weight"),
    *mixer_rules(f"{L}.mixer"),
    copy("final_norm.weight", "backbone.norm_f.weight"),
    copy("head.proj.weight", "lm_head.weight", vocab=True),
)
INF = {"__float__": "Infinity"}  # how transformers 5 writes float("inf") in config.json


def _finite_or_none(c: HFConfig, key: str, value: Any) -> Optional[float]:
    """A time-step limit: a number, inf in either spelling (None: no limit)."""
    if value == INF or (isinstance(value, str) and value.lower() in ("inf", "infinity")):
        return None
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return None
    return c._typed(key, value, float, 0.0, {"min": 0.0})


def time_step_limit(c: HFConfig) -> tuple[float, Optional[float]]:
    limit = c.get("time_step_limit", [0.0, None])
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
        c.fail("time_step_limit", f"expected [min, max], got {limit!r}", "write [0.0, Infinity] for no limit")
        return 0.0, None
    low = _finite_or_none(c, "time_step_limit[0]", limit[0]) or 0.0
    return low, None if limit[1] is None else _finite_or_none(c, "time_step_limit[1]", limit[1])


def mamba2_mixer(c: HFConfig, hidden: int, keys: dict[str, str], eps: float) -> dict[str, Any]:
    """Our ``mamba2`` mixer from a config whose Mamba-2 keys are ``keys`` (our option -> their key); the
    inner width (expand * hidden_size) must be num_heads * head_dim, as transformers checks."""
    heads = c.get(keys["num_heads"], 128, int, min=1, bound="num_heads")
    expand = c.get(keys["expand"], 2, float, min=0.0, max=64.0)
    inner = expand * hidden
    head_dim = c.get(keys["head_dim"], None, int, min=1, bound="head_dim")
    head_dim = head_dim if head_dim is not None else max(1, int(inner) // heads)
    if heads * head_dim != inner:
        c.fail(
            keys["num_heads"],
            f"{keys['num_heads']} * {keys['head_dim']} = {heads * head_dim} but {keys['expand']} * hidden_size = "
            f"{inner:g}",
            "make the inner width expand * hidden_size equal num_heads * head_dim",
        )
    groups = c.get(keys["n_groups"], 1, int, min=1, bound="num_heads")
    if heads % groups:
        c.fail(keys["n_groups"], f"{groups} does not divide {keys['num_heads']}={heads}", "use a divisor")
    if c.get("hidden_act", "silu", str) not in ("silu", "swish"):
        c.fail("hidden_act", f"{c.get('hidden_act')!r} is not supported", "Mamba-2's convolution uses silu")
    low, high = time_step_limit(c)
    out = {
        "type": "mamba2",
        "num_heads": heads,
        "head_dim": head_dim,
        "state_size": c.get(keys["state_size"], 128, int, min=1, bound="head_dim"),
        "n_groups": groups,
        "conv_size": c.get(keys["conv_size"], 4, int, min=1, max=64),
        "conv_bias": c.get(keys["conv_bias"], True, bool),
        "use_bias": c.get(keys["use_bias"], False, bool),
        "chunk_size": c.get(keys["chunk_size"], 256, int, min=1, max=4096),
        "dt_limit_min": low,
        "dt_limit_max": high,
        "norm_eps": eps,
    }
    for ours, theirs in (
        ("dt_min", "time_step_min"),
        ("dt_max", "time_step_max"),
        ("dt_init_floor", "time_step_floor"),
    ):
        if c.get(theirs) is not None:  # initialisation only (Bamba has none)
            out[ours] = c.get(theirs, None, float, min=0.0)
    return out


KEYS = {  # our mamba2 option -> Mamba2Config's key
    "num_heads": "num_heads",
    "head_dim": "head_dim",
    "expand": "expand",
    "state_size": "state_size",
    "n_groups": "n_groups",
    "conv_size": "conv_kernel",
    "conv_bias": "use_conv_bias",
    "use_bias": "use_bias",
    "chunk_size": "chunk_size",
}


def to_composer(c: HFConfig) -> dict[str, Any]:
    hidden = c.need("hidden_size")
    eps = c.get("layer_norm_epsilon", 1e-5, float, min=0.0)
    return {
        "vocab_size": c.need("vocab_size"),
        "hidden_size": hidden,
        "num_layers": c.need("num_hidden_layers"),
        "num_heads": 1,  # no attention: the model-wide default heads are unused
        "max_position_embeddings": 1 << 20,  # no position limit: a long window for generation's crop
        "dropout": 0.0,
        "block": {"type": "pre_norm"},
        "attention": mamba2_mixer(c, hidden, KEYS, eps),
        "ffn": {"type": "none"},
        "norm": {"type": "rmsnorm", "eps": eps},
        "position": {"type": "none"},
        "head": {"type": "lm"},
        "tie_embeddings": c.get("tie_word_embeddings", False, bool),
        "init_std": c.get("initializer_range", 0.1, float, min=0.0, max=1.0),
        "name": "mamba2",
    }


def check_mixer(e: Exporting, m: Any, eps: float, hidden: int, where: str = "attention") -> None:
    """A Mamba-2 mixer Hugging Face can hold: an integer expand, its gated norm's eps equal to the layers'."""
    e.require(
        m.num_heads * m.head_dim % hidden == 0,
        f"{where}.num_heads",
        f"inner width {m.num_heads * m.head_dim} is not a multiple of hidden_size {hidden} (expand is an integer)",
        "choose num_heads * head_dim = k * hidden_size",
    )
    e.require(
        m.norm_eps == eps,
        f"{where}.norm_eps",
        f"{m.norm_eps} differs from norm.eps={eps}; one layer_norm_epsilon serves both",
        f"set {where}.norm_eps: {eps}",
    )


def match(e: Exporting) -> str:
    specs = e.cfg.layer_specs()
    first = specs[0]
    for s in specs[1:]:
        if s.attention != first.attention or s.norm != first.norm:
            e.no("layers", f"layer {s.index} differs from layer 0; Mamba2 uses one mixer in every layer", "remove it")
            break
    check_mixer(e, first.attention, first.norm.eps, e.cfg.hidden_size)
    return "mamba2"


def limit_to_hf(m: Any) -> Optional[list]:
    """time_step_limit as transformers 5 writes it; None: the default (0, inf), left out."""
    if m.dt_limit_min == 0.0 and m.dt_limit_max is None:
        return None
    return [m.dt_limit_min, INF if m.dt_limit_max is None else m.dt_limit_max]


def to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    m, eps = cfg.layer(0).attention, cfg.layer(0).norm.eps
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_heads": m.num_heads,
        "head_dim": m.head_dim,
        "expand": m.num_heads * m.head_dim // cfg.hidden_size,
        "state_size": m.state_size,
        "n_groups": m.n_groups,
        "conv_kernel": m.conv_size,
        "use_conv_bias": m.conv_bias,
        "use_bias": m.use_bias,
        "chunk_size": m.chunk_size,
        "hidden_act": "silu",
        "layer_norm_epsilon": eps,
        "time_step_min": m.dt_min,
        "time_step_max": m.dt_max,
        "time_step_floor": m.dt_init_floor,
        "residual_in_fp32": True,
    }
    limit = limit_to_hf(m)
    if limit is not None:
        out["time_step_limit"] = limit
    return out


FAMILY = Family(
    name="mamba2",
    model_types={"mamba2": "Mamba2ForCausalLM"},
    signature={
        "position": ("none",),
        "norm": ("rmsnorm",),
        "ffn": ("none",),
        "block": ("pre_norm",),
        "attention": ("mamba2",),
    },
    rules=RULES,
    to_composer=to_composer,
    match=match,
    to_hf=to_hf,
    prefix="backbone.",
)
