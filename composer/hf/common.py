"""What every Hugging Face family shares: the mapping-table rules, tensor conversions (both ways),
reading a Hugging Face config.json (4.x and 5.x spellings), and rope / attention translation.

A family module (gpt2.py, llama.py, gpt_neox.py) declares a :class:`Family`: its ONE table of
:class:`Rule` s (our parameter name <-> Hugging Face name(s), ``{i}`` standing for the layer), its
config translation both ways, and which compositions it can take on export.

Shapes: C hidden, H query heads, Hkv key/value heads, D head dim, I intermediate, V vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..conversion import convert
from ..errors import CheckpointError, ConfigError, MissingParameter, Problem
from ..schema import ModelConfig, config_to_dict
from ..weights import json_loads


# ----------------------------------------------------------------------------- the mapping table
@dataclass(frozen=True)
class Rule:
    """One of our tensors and the Hugging Face tensor(s) it is made of.

    how: copy       same tensor
         transpose  GPT-2 Conv1D weights are stored [in, out]; ours are [out, in]
         qkv        ours = cat(q, k, v) along rows: [(H + 2 Hkv) D, C]
         gate_up    ours = cat(gate, up) along rows: [2 I, C]
         neox_qkv   theirs interleaves heads [h0 q,k,v | h1 q,k,v | ...]; ours is [q | k | v]
         rows       ours = theirs stacked along rows, in order, in equal blocks (stacked experts); a
                    Hugging Face name with ``{j}`` repeats for each routed expert j (expert-major)
         gdn_in     Gated DeltaNet's in_proj = cat(q, k [Hk Dk each], v, z [H Dv each], b, a [H each]), or
                    its conv1d = cat(q, k, v) (three parts)
         other      a family's own kind, registered in ``CONVERTERS`` (qwen3_next.py's interleaved GDN rows)
    vocab: rows are vocabulary entries (padding rows of a padded vocabulary are dropped on export)
    only:  the rule maps only the layers whose block is this type (hybrids whose layer kinds wire their
           norms differently, OLMo-Hybrid); "" every layer
    """

    ours: str
    theirs: tuple[str, ...]
    how: str = "copy"
    vocab: bool = False
    only: str = ""

    def at(self, i: int, experts: int = 0) -> Rule:
        theirs = tuple(t.replace("{i}", str(i)) for t in self.theirs)
        if any("{j}" in t for t in theirs):  # one name per routed expert, each expert's names in order
            theirs = tuple(t.replace("{j}", str(j)) for j in range(experts) for t in theirs)
        return Rule(self.ours.replace("{i}", str(i)), theirs, self.how, self.vocab, self.only)


def copy(ours: str, theirs: str, vocab: bool = False) -> Rule:
    return Rule(ours, (theirs,), "copy", vocab)


def transpose(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,), "transpose")


def fused(how: str, ours: str, *theirs: str) -> Rule:
    return Rule(ours, theirs, how)


WB = ("weight", "bias")


def attention_rules(theirs: str, qk_norm: bool = False, ours: str = "layers.{i}.attn") -> tuple[Rule, ...]:
    """Softmax attention as most families store it under ``theirs`` (e.g. ``model.layers.{i}.self_attn``):
    q_proj / k_proj / v_proj (one fused ``qkv`` here) and o_proj, weights and biases (a rule whose tensor a
    model lacks is skipped), and with ``qk_norm`` the q_norm / k_norm weights."""
    qkv = (fused("qkv", f"{ours}.qkv.{w}", *(f"{theirs}.{p}_proj.{w}" for p in "qkv")) for w in WB)
    rules = (*qkv, *(copy(f"{ours}.out.{w}", f"{theirs}.o_proj.{w}") for w in WB))
    norms = tuple(copy(f"{ours}.{n}.weight", f"{theirs}.{n}.weight") for n in ("q_norm", "k_norm"))
    return rules + (norms if qk_norm else ())


def swiglu_rules(theirs: str, ours: str = "layers.{i}.ffn") -> tuple[Rule, ...]:
    """A gated feed-forward stored as gate_proj / up_proj / down_proj under ``theirs`` (e.g.
    ``model.layers.{i}.mlp``): gate and up fused (``gate_up``) here, weights and biases."""
    gate_up = (fused("gate_up", f"{ours}.gate_up.{w}", f"{theirs}.gate_proj.{w}", f"{theirs}.up_proj.{w}") for w in WB)
    return (*gate_up, *(copy(f"{ours}.down.{w}", f"{theirs}.down_proj.{w}") for w in WB))


CONVERTERS: dict[str, tuple[Callable, Callable]] = {}  # a family's own rule kinds: how -> (to_ours, to_theirs)


def to_ours(rule: Rule, parts: list[Tensor], attn: Optional[nn.Module]) -> Tensor:
    """Hugging Face tensor(s) -> our tensor."""
    if rule.how == "copy":
        return parts[0]
    if rule.how == "transpose":
        return parts[0].t().contiguous()
    if rule.how in ("qkv", "gate_up", "rows", "gdn_in"):
        return torch.cat(parts, dim=0)
    if rule.how == "neox_qkv":  # [H, 3, D, ...] -> [3, H, D, ...]
        t = parts[0]
        return t.reshape(attn.num_heads, 3, attn.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    if rule.how in CONVERTERS:
        return CONVERTERS[rule.how][0](parts, attn)
    raise ValueError(f"unknown rule kind {rule.how!r}")


def to_theirs(rule: Rule, t: Tensor, attn: Optional[nn.Module]) -> list[Tensor]:
    """Our tensor -> Hugging Face tensor(s) (works on meta tensors: expected shapes for free)."""
    if rule.how == "copy":
        return [t]
    if rule.how == "transpose":
        return [t.t().contiguous()]
    if rule.how == "qkv":  # with an output gate, each query head's G gate rows follow its D rows (Qwen3-Next)
        h, hkv, d, g = attn.num_heads, attn.num_kv_heads, attn.head_dim, getattr(attn, "gate", 0)
        return list(t.split([h * (d + g), hkv * d, hkv * d], dim=0))
    if rule.how == "gate_up":
        return list(t.chunk(2, dim=0))
    if rule.how == "rows":
        return list(t.chunk(len(rule.theirs), dim=0))
    if rule.how == "gdn_in":  # in_proj (six parts) or the short convolution over q, k, v (three)
        hk, dk, h, dv = attn.num_kv_heads, attn.head_dim, attn.num_heads, attn.value_head_dim
        return list(t.split([hk * dk, hk * dk, h * dv, h * dv, h, h][: len(rule.theirs)], dim=0))
    if rule.how == "neox_qkv":  # [3, H, D, ...] -> [H, 3, D, ...]
        return [t.reshape(3, attn.num_heads, attn.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]
    if rule.how in CONVERTERS:
        return CONVERTERS[rule.how][1](t, attn)
    raise ValueError(f"unknown rule kind {rule.how!r}")


# ----------------------------------------------------------------------------- reading config.json
SIZE_KEYS = {  # Hugging Face size keys -> the size limit of the option they become (composer.conversion)
    "hidden_size": "hidden_size",
    "n_embd": "hidden_size",
    "vocab_size": "vocab_size",
    "num_hidden_layers": "num_layers",
    "n_layer": "num_layers",
    "num_attention_heads": "num_heads",
    "n_head": "num_heads",
    "max_position_embeddings": "max_position_embeddings",
    "n_positions": "max_position_embeddings",
    "intermediate_size": "intermediate_size",
}


class HFConfig:
    """A Hugging Face config.json with typed access: every value read goes through the same typed conversion
    as YAML options (``composer.conversion.convert``: a string is not a bool, 2.5 not an int, sizes are
    bounded, floats finite), and problems are collected by file and key."""

    def __init__(self, data: Mapping[str, Any], path: str):
        self.data, self.path = dict(data), path
        self.problems: list[Problem] = []

    @property
    def model_type(self) -> str:
        return str(self.data.get("model_type"))

    def _typed(self, key: str, value: Any, kind: Any, placeholder: Any, meta: dict) -> Any:
        if kind is None:
            return value
        found: list[Problem] = []
        out = convert(kind, value, f"{self.path}:{key}", found, **meta)
        self.problems += found
        return placeholder if found else out

    def get(self, key: str, default: Any = None, kind: Any = None, **meta: Any) -> Any:
        """``key``'s value (``default`` when absent or null), converted to ``kind`` (int, float, bool, str;
        None: as it is) under the option rules ``meta`` (min=, bound=, ...)."""
        value = self.data.get(key)
        return default if value is None else self._typed(key, value, kind, default, meta)

    def need(self, key: str, *aliases: str, kind: Any = int, **meta: Any) -> Any:
        """A required size (the first of ``key`` and its ``aliases`` present), converted to ``kind``: >= 1 and
        within the size limit of the model option it becomes."""
        meta.setdefault("min", 1)
        if key in SIZE_KEYS:
            meta.setdefault("bound", SIZE_KEYS[key])
        for k in (key, *aliases):
            if self.data.get(k) is not None:
                return self._typed(k, self.data[k], kind, 1, meta)
        self.problems.append(Problem(f"{self.path}:{key}", "is required", f"set {key} in config.json", missing=True))
        return 1

    def fail(self, key: str, message: str, fix: str = "") -> None:
        self.problems.append(Problem(f"{self.path}:{key}", message, fix))

    def check(self) -> None:
        if self.problems:
            raise ConfigError.of(self.problems, header=f"{self.path} cannot be imported")


def read_hf_config(folder: Path) -> HFConfig:
    path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder; pass a local Hugging Face model folder (config.json + *.safetensors)"
        )
    if not path.is_file():
        raise MissingParameter(
            [
                Problem(
                    str(path),
                    "not found",
                    "a Hugging Face model folder holds config.json beside its weights",
                    missing=True,
                )
            ]
        )
    try:
        data = json_loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        hint = (
            " (it is a composer checkpoint: load it with ComposedModel.from_pretrained)"
            if isinstance(data, dict) and "format_version" in data
            else ""
        )
        raise MissingParameter(
            [
                Problem(
                    f"{path}:model_type",
                    f"no model_type{hint}",
                    "a Hugging Face config.json names its model_type",
                    missing=True,
                )
            ]
        )
    return HFConfig(data, str(path))


# ----------------------------------------------------------------------------- shared translations
ACT_FROM_HF = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "relu2": "relu2",
}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu", "relu2": "relu2"}


def activation(c: HFConfig, key: str, default: str) -> str:
    name = c.get(key, default, str)
    if name not in ACT_FROM_HF:
        c.fail(key, f"activation {name!r} is not supported", f"supported: {', '.join(ACT_FROM_HF)}")
        return "gelu"
    return ACT_FROM_HF[name]


def attention_from_heads(heads: int, kv_heads: int, window: Optional[int] = None) -> dict[str, Any]:
    """Our attention type for H query heads, Hkv key/value heads and an optional sliding window."""
    if window is not None:
        return {"type": "sliding_window", "window": window, "num_kv_heads": kv_heads}
    if kv_heads == heads:
        return {"type": "mha"}
    if kv_heads == 1:
        return {"type": "mqa"}
    return {"type": "gqa", "num_kv_heads": kv_heads}


ROPE_TYPES = ("default", "linear", "llama3")


def rope_from_hf(
    c: HFConfig,
    theta_key: str = "rope_theta",
    fraction_key: str = "partial_rotary_factor",
    default_fraction: float = 1.0,
) -> dict[str, Any]:
    """Our rope config from 5.x ``rope_parameters`` or 4.x ``rope_theta`` / ``rope_scaling`` (and the
    family's legacy keys for theta and the rotary fraction)."""
    params, legacy = c.get("rope_parameters", {}), c.get("rope_scaling", {})
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        c.fail("rope_parameters", "expected a mapping", "write it as {rope_type: ..., rope_theta: ...}")
        params, legacy = {}, {}
    merged = {**legacy, **params}
    kind = merged.get("rope_type") or merged.get("type") or "default"
    theta = (
        c._typed("rope_theta", merged["rope_theta"], float, 10000.0, {})
        if "rope_theta" in merged
        else c.get(theta_key, 10000.0, float)
    )
    fraction = merged.get("partial_rotary_factor", c.get(fraction_key, default_fraction, float))
    fraction = c._typed("partial_rotary_factor", fraction, float, default_fraction, {})
    out: dict[str, Any] = {"type": "rope", "theta": theta, "rotary_fraction": fraction}
    key = "rope_parameters.rope_type" if "rope_parameters" in c.data else "rope_scaling.rope_type"
    if kind not in ROPE_TYPES:
        c.fail(key, f"rope type {kind!r} is not supported", f"supported: {', '.join(ROPE_TYPES)}")
    elif kind != "default":
        if merged.get("factor") is None:
            c.fail(key.replace("rope_type", "factor"), f"{kind} rope scaling needs a factor", "set factor")
        out.update(scaling=kind, scaling_factor=c._typed("factor", merged.get("factor") or 1.0, float, 1.0, {}))
    if kind == "llama3":
        out.update(
            low_freq_factor=c._typed("low_freq_factor", merged.get("low_freq_factor", 1.0), float, 1.0, {}),
            high_freq_factor=c._typed("high_freq_factor", merged.get("high_freq_factor", 4.0), float, 4.0, {}),
            original_max_position_embeddings=c._typed(
                "original_max_position_embeddings",
                merged.get("original_max_position_embeddings", 8192),
                int,
                8192,
                {"min": 1, "bound": "max_position_embeddings"},
            ),
        )
    return out


def rope_to_hf(rope: Any, fraction_key: Optional[str] = None) -> dict[str, Any]:
    """Both spellings: 4.x ``rope_theta`` / ``rope_scaling`` and 5.x ``rope_parameters``."""
    scaling = None
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.scaling != "none":
        scaling = {"rope_type": rope.scaling, "type": rope.scaling, "factor": rope.scaling_factor}
        if rope.scaling == "llama3":
            scaling.update(
                low_freq_factor=rope.low_freq_factor,
                high_freq_factor=rope.high_freq_factor,
                original_max_position_embeddings=rope.original_max_position_embeddings,
            )
        params = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_theta": rope.theta}
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_scaling": scaling, "rope_parameters": params}
    if fraction_key is not None:
        params["partial_rotary_factor"] = rope.rotary_fraction
        out[fraction_key] = rope.rotary_fraction
    return out


# ----------------------------------------------------------------------------- export checks
@dataclass
class Exporting:
    """A composition being matched against a family; problems name our config keys."""

    cfg: ModelConfig
    family: str
    problems: list[Problem] = field(default_factory=list)

    def no(self, path: str, message: str, fix: str = "") -> None:
        self.problems.append(Problem(f"model.{path}", message, fix or "change the model or export another way"))

    def require(self, ok: bool, path: str, message: str, fix: str = "") -> None:
        if not ok:
            self.no(path, f"{message} (Hugging Face {self.family})", fix)


def differing_slots(cfg: ModelConfig) -> dict[str, int]:
    """slot -> first layer whose component differs from layer 0's (per-layer overrides)."""
    specs = cfg.layer_specs()
    first = {s: config_to_dict(getattr(specs[0], s)) for s in ("block", "attention", "ffn", "norm", "position")}
    out: dict[str, int] = {}
    for spec in specs[1:]:
        for slot, value in first.items():
            if slot not in out and config_to_dict(getattr(spec, slot)) != value:
                out[slot] = spec.index
    return out


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family: its mapping table and its config translation both ways.

    rules:        the ONE parameter-name table, used for import and export
    to_composer:  HF config -> our model config dict (problems collected on the HFConfig)
    match:        our config -> the HF model_type it exports as (problems collected on Exporting)
    to_hf:        our config -> HF config.json entries
    ignore:       HF tensors that are not weights (buffers some old checkpoints saved)
    prefix:       the base-model prefix that checkpoints of the bare base model omit
    options:      the optional features this family can take (``composer.hf.attention_features`` and the
                  model-wide ones); its ``match`` checks how. A composition using another is refused.
    """

    name: str
    model_types: dict[str, str]  # model_type -> architecture class
    signature: dict[str, tuple[str, ...]]  # slot -> component types this family has
    rules: tuple[Rule, ...]
    to_composer: Callable[[HFConfig], dict[str, Any]]
    match: Callable[[Exporting], str]
    to_hf: Callable[[ModelConfig, str], dict[str, Any]]
    ignore: tuple[str, ...] = ()
    prefix: str = ""
    options: tuple[str, ...] = ()

    def table(self, num_layers: int, experts: int = 0, cfg: Optional[ModelConfig] = None) -> list[Rule]:
        """The rules for ``num_layers`` layers of ``experts`` routed experts (``routed_experts``); a rule
        ``only`` for one block type maps the layers of ``cfg`` with that block."""
        out: list[Rule] = []
        for rule in self.rules:
            if "{i}" not in rule.ours:
                out.append(rule)
                continue
            layers = range(num_layers)
            if rule.only:
                layers = [i for i in layers if cfg is not None and cfg.layer(i).block.type == rule.only]
            out.extend(rule.at(i, experts) for i in layers)
        return out

    def ignored(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.ignore)


def routed_experts(cfg: ModelConfig) -> int:
    """The routed experts of the model's mixture-of-experts layers (0: none): what ``{j}`` in a rule spans."""
    return max((getattr(s.ffn, "num_experts", 0) for s in cfg.layer_specs()), default=0)
