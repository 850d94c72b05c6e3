"""Normalization layers: LayerNorm (optional bias) and RMSNorm.

Both normalize over the last dimension C and keep the input dtype; RMSNorm computes its
statistics in float32 (as Llama does) so bf16 inputs stay accurate.
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


@dataclass
class RMSNormConfig(ComponentConfig):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight (no centring, no bias)."""

    eps: float = option(1e-5, help="added to the mean square", min=0.0)


@NORM.register("layernorm", config=LayerNormConfig)
class LayerNorm(nn.Module):
    def __init__(self, cfg: LayerNormConfig, ctx: BuildContext):
        super().__init__()
        self.eps = cfg.eps
        self.weight = nn.Parameter(torch.ones(ctx.hidden_size))  # [C]
        self.bias = nn.Parameter(torch.zeros(ctx.hidden_size)) if cfg.bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C]
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def cost(self, call: CostCall) -> Cost:  # keeps its input (residual precision)
        return Cost(param_count(self), saved=call.residual_bytes * self.weight.shape[0])


@NORM.register("rmsnorm", config=RMSNormConfig)
class RMSNorm(nn.Module):
    def __init__(self, cfg: RMSNormConfig, ctx: BuildContext):
        super().__init__()
        self.eps = cfg.eps
        self.weight = nn.Parameter(torch.ones(ctx.hidden_size))  # [C]

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)

    def cost(self, call: CostCall) -> Cost:  # keeps float32 copies of its input and the normalised input
        return Cost(param_count(self), saved=2 * 4 * self.weight.shape[0])
