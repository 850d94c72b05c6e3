"""Helpers for the core's tests: small model dicts per component, and reference maths written
from the papers' formulas (independent of the code under test).

Shapes: B batch, T tokens, C hidden, H heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from conftest import small_model_dict
from torch import Tensor

from composer.contract import LayerInputs
from composer.registry import FAMILIES

# Options a component cannot be built without (its config fields that have no default).
# test_components checks every registered component's required fields are listed here, so a
# new component with a required option fails loudly instead of being skipped.
REQUIRED_OPTIONS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 4},
    "classification": {"num_classes": 3},
}
# Smaller-than-default options that keep the CPU tests fast (never needed for correctness).
SMALL_OPTIONS: dict[str, dict[str, Any]] = {
    "moe": {"num_experts": 4, "top_k": 2, "expert": {"type": "mlp", "intermediate_size": 16}},
    "swiglu": {"multiple_of": 16},
    "geglu": {"multiple_of": 16},
}
# The model-level slot of each family in a model config.
SLOTS = ("attention", "ffn", "norm", "position", "head", "block")


def is_builtin(family: str, name: str) -> bool:
    return FAMILIES[family].get(name).cls.__module__.startswith("components.")


def registered() -> list[tuple[str, str]]:
    """Every (family, name) currently registered (built-ins, entry points, plugins)."""
    return [(family, name) for family in SLOTS for name in FAMILIES[family].names()]


def required_fields(family: str, name: str) -> list[str]:
    entry = FAMILIES[family].get(name)
    return [
        f.name
        for f in dataclasses.fields(entry.config)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def component(name: str, **options: Any) -> dict:
    """``{"type": name, ...}`` with the options the component needs to build small and fast."""
    return {"type": name, **REQUIRED_OPTIONS.get(name, {}), **SMALL_OPTIONS.get(name, {}), **options}


def attention(name: str, window: int = 4, **options: Any) -> dict:
    """``component(name)`` with ``window`` set where the attention type has one."""
    fields = {f.name for f in dataclasses.fields(FAMILIES["attention"].get(name).config)}
    return component(name, **({"window": window} if "window" in fields else {}), **options)


def model_with(family: str, name: str, options: dict | None = None, **model: Any) -> dict:
    """A small model dict whose ``family`` slot is component ``name``."""
    return small_model_dict(**{family: component(name, **(options or {}))}, **model)


def ids(batch: int, length: int, vocab: int = 64, seed: int = 0) -> Tensor:
    """Random token ids [B, T]."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def inputs_for(
    batch: int,
    length: int,
    position: Any = None,
    key_valid: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> LayerInputs:
    """One layer's inputs for a direct call of a block or an attention: positions from 0 (or
    ``position_ids``), the rotary tables of ``position`` (the layer's position encoding module, as the
    model would pass them), padding ``key_valid`` [B, T]."""
    position_ids = torch.arange(length).expand(batch, length) if position_ids is None else position_ids
    rotation = position.rotation(position_ids) if position is not None else None
    return LayerInputs(position_ids=position_ids, key_valid=key_valid, rotation=rotation, position=position)


# ----------------------------------------------------------------------------- reference maths
def alibi_slopes_reference(n: int) -> list[float]:
    """ALiBi slopes exactly as in Press et al.'s reference code (max_bias 8)."""

    def power_of_2(k: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes_reference(2 * closest)[0::2][: n - closest]


def rope_reference(x: Tensor, positions: Tensor, theta: float, rotary_dim: int) -> Tensor:
    """Rotate x [B, H, T, D] (first ``rotary_dim`` dims, half-split pairs (i, i + R/2)) by angle
    position * theta^(-2i/R), as complex multiplication."""
    half = rotary_dim // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)  # [R/2]
    angle = positions.double()[:, None, :, None] * freq  # [B, 1, T, R/2]
    z = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double()) * torch.polar(
        torch.ones_like(angle), angle
    )
    return torch.cat([z.real, z.imag, x[..., rotary_dim:].double()], dim=-1).to(x.dtype)


def rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference_attention(attn: Any, x: Tensor, position: Any, key_valid: Tensor | None = None) -> Tensor:
    """Self-attention of module ``attn`` (its weights) on x [B, T, C], with an explicit mask and
    softmax. ``position`` is the layer's resolved position config (rope / alibi / other)."""
    b, t, _ = x.shape
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    q = qkv[..., : h * d].reshape(b, t, h, d).transpose(1, 2)  # [B, H, T, D]
    k = qkv[..., h * d : (h + hkv) * d].reshape(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
    v = qkv[..., (h + hkv) * d :].reshape(b, t, hkv, d).transpose(1, 2)
    if attn.q_norm is not None:
        q = rms(q, attn.q_norm.weight, attn.q_norm.eps)
        k = rms(k, attn.k_norm.weight, attn.k_norm.eps)
    pos = torch.arange(t).expand(b, t)
    if position.type == "rope":
        rotary = int(d * position.rotary_fraction)
        q, k = rope_reference(q, pos, position.theta, rotary), rope_reference(k, pos, position.theta, rotary)
    group = torch.arange(h) // (h // hkv)  # query head -> its key/value head
    k, v = k[:, group], v[:, group]  # [B, H, T, D]
    scale = attn.scale if attn.scale is not None else 1 / math.sqrt(d)
    scores = q @ k.transpose(-1, -2) * scale  # [B, H, T, T]
    if attn.softcap is not None:
        scores = attn.softcap * torch.tanh(scores / attn.softcap)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    if position.type == "alibi":
        slopes = torch.tensor(alibi_slopes_reference(h))
        scores = scores - slopes[:, None, None] * (i - j).abs()
    allowed = torch.ones(t, t, dtype=torch.bool)
    if attn.causal:
        allowed &= j <= i
    if attn.window is not None:
        allowed &= (i - j).abs() < attn.window
    allowed = allowed.expand(b, 1, t, t)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, None, :]) | torch.eye(t, dtype=torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = scores.softmax(-1) @ v  # [B, H, T, D]
    y = y.transpose(1, 2).reshape(b, t, h * d) @ attn.out.weight.T
    return y + attn.out.bias if attn.out.bias is not None else y
