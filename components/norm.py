"""Normalization layers: LayerNorm (optional weight and bias) and RMSNorm (optional weight, or a
zero-centred one).

    layernorm: (x - mean(x)) / sqrt(var(x) + eps) * w + b       (Ba et al. 2016; w, b optional)
    rmsnorm:   x / sqrt(mean(x^2) + eps) * w                    (Zhang & Sennrich 2019; Llama)
    rmsnorm, zero_centred: x / sqrt(mean(x^2) + eps) * (1 + w)  (Gemma: w starts at 0)

Both normalize over the last dimension C and keep the input dtype; RMSNorm computes its
statistics in float32 (as Llama does) so bf16 inputs stay accurate. The two RMSNorm weights are
applied where their references apply them: Llama casts the normalised input back, then scales
(``w * x.to(dtype)``); Gemma scales in float32, then casts (``(x * (1 + w)).to(dtype)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from composer.contract import NORM, BuildContext, ComponentConfig, Cost, CostCall, option, param_count


@dataclass
class LayerNormConfig(ComponentConfig):
    """LayerNorm: (x - mean) / sqrt(var + eps) * weight + bias."""

    eps: float = option(1e-5, help="added to the variance", min=0.0)
    bias: bool = option(True, help="learn an additive bias")
    weight: bool = option(True, help="learn a per-channel scale (false: none, as OLMo's LayerNorm)")


@dataclass
class RMSNormConfig(ComponentConfig):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight (no centring, no bias)."""

    eps: float = option(1e-5, help="added to the mean square", min=0.0)
    weight: bool = option(True, help="learn a per-channel scale (false: none)")
    zero_centred: bool = option(
        False, help="scale by (1 + weight), weight starting at 0, in float32 before the cast back (Gemma)"
    )

    def resolve(self, model, check) -> None:
        if self.zero_centred and not self.weight:
            check.fail("zero_centred", "needs a weight (weight is false)", "set weight: true, or zero_centred: false")


@NORM.register("layernorm", config=LayerNormConfig)
class LayerNorm(nn.Module):
    def __init__(self, cfg: LayerNormConfig, ctx: BuildContext):
        super().__init__()
        self.eps, self.size = cfg.eps, ctx.hidden_size
        self.weight = nn.Parameter(torch.ones(ctx.hidden_size)) if cfg.weight else None  # [C]
        self.bias = nn.Parameter(torch.zeros(ctx.hidden_size)) if cfg.bias else None  # [C]

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C]
        return F.layer_norm(x, (self.size,), self.weight, self.bias, self.eps)

    def cost(self, call: CostCall) -> Cost:  # keeps its input (residual precision)
        return Cost(param_count(self), saved=call.residual_bytes * self.size)


@NORM.register("rmsnorm", config=RMSNormConfig)
class RMSNorm(nn.Module):
    def __init__(self, cfg: RMSNormConfig, ctx: BuildContext):
        super().__init__()
        self.eps, self.size, self.zero_centred = cfg.eps, ctx.hidden_size, cfg.zero_centred
        start = torch.zeros if cfg.zero_centred else torch.ones  # the scale starts at 1 either way
        self.weight = nn.Parameter(start(ctx.hidden_size)) if cfg.weight else None  # [C]

    def reset_parameters(self) -> None:
        if self.weight is not None:
            (nn.init.zeros_ if self.zero_centred else nn.init.ones_)(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return x32.type_as(x)
        if self.zero_centred:  # Gemma: (1 + w) in float32, then the cast
            return (x32 * (1.0 + self.weight.float())).type_as(x)
        return self.weight * x32.type_as(x)  # Llama: the cast, then w

    def cost(self, call: CostCall) -> Cost:  # keeps float32 copies of its input and the normalised input
        return Cost(param_count(self), saved=2 * 4 * self.size)
