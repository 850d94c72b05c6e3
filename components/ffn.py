"""Feed-forward networks: the classic MLP and the gated SwiGLU / GeGLU variants.

    mlp:     x -> down(act(up(x)))                      (GPT-2, BERT; I = 4C by default)
    swiglu:  x -> down(silu(gate(x)) * up(x))           (Llama, Mistral)
    geglu:   x -> down(gelu(gate(x)) * up(x))           (T5 v1.1, Gemma)

Gated variants fuse gate and up into one projection (C -> 2I) and default to
I = 8/3 C rounded up to ``multiple_of``, which keeps the parameter count of a 4C MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from composer.contract import (
    FFN,
    BuildContext,
    ComponentConfig,
    Cost,
    CostCall,
    check_probability,
    inherit,
    linear_flops,
    mark_residual,
    option,
    param_count,
)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "relu2": lambda x: F.relu(x).square(),
}


def _check_common(cfg, model, check) -> None:
    inherit(cfg, "dropout", model.dropout)
    check_probability(cfg, "dropout", check)
    expert = check.path.endswith("expert")  # a mixture's (shared) expert: narrow by design (fine-grained experts)
    if cfg.intermediate_size is not None and cfg.intermediate_size < model.hidden_size and not expert:
        check.warn(
            "intermediate_size",
            f"{cfg.intermediate_size} is smaller than hidden_size "
            f"{model.hidden_size} (unusual: a bottleneck feed-forward)",
        )


@dataclass
class MLPConfig(ComponentConfig):
    """Two-layer MLP with an activation in between."""

    intermediate_size: Optional[int] = option(
        None, help="hidden width (null: 4 * hidden_size)", min=1, bound="intermediate_size"
    )
    activation: str = option("gelu", help="gelu | gelu_tanh | relu | silu | relu2", choices=tuple(ACTIVATIONS))
    bias: bool = option(True, help="biases on both projections")
    dropout: Optional[float] = option(None, help="dropout on the output (null: model.dropout)")

    def resolve(self, model, check) -> None:
        inherit(self, "intermediate_size", 4 * model.hidden_size)
        _check_common(self, model, check)


@FFN.register("mlp", config=MLPConfig)
class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig, ctx: BuildContext):
        super().__init__()
        self.up = nn.Linear(ctx.hidden_size, cfg.intermediate_size, bias=cfg.bias)  # C -> I
        self.down = mark_residual(nn.Linear(cfg.intermediate_size, ctx.hidden_size, bias=cfg.bias))  # I -> C
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)
        self.intermediate_size = cfg.intermediate_size

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C]
        return self.dropout(self.down(self.act(self.up(x))))

    def cost(self, call: CostCall) -> Cost:  # keeps: up input, activation input, down input
        saved = call.activation_bytes * (self.up.in_features + 2 * self.intermediate_size)
        return Cost(param_count(self), linear_flops(self), saved)


@dataclass
class GatedConfig(ComponentConfig):
    """Gated linear unit: silu(gate) * up (SwiGLU)."""

    intermediate_size: Optional[int] = option(
        None, help="hidden width (null: 8/3 * hidden_size rounded up to multiple_of)", min=1, bound="intermediate_size"
    )
    multiple_of: int = option(256, help="rounding of the default intermediate_size", min=1, bound="intermediate_size")
    bias: bool = option(False, help="biases on the projections")
    dropout: Optional[float] = option(None, help="dropout on the output (null: model.dropout)")

    def resolve(self, model, check) -> None:
        default = int(8 * model.hidden_size / 3)
        inherit(self, "intermediate_size", -(-default // self.multiple_of) * self.multiple_of)
        _check_common(self, model, check)


@dataclass
class GeGLUConfig(GatedConfig):
    """Gated linear unit: gelu(gate) * up (GeGLU)."""


@FFN.register("swiglu", config=GatedConfig)
@FFN.register("geglu", config=GeGLUConfig)
class GatedMLP(nn.Module):
    def __init__(self, cfg: GatedConfig, ctx: BuildContext):
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up = nn.Linear(ctx.hidden_size, 2 * i, bias=cfg.bias)  # C -> [gate | up] 2I
        self.down = mark_residual(nn.Linear(i, ctx.hidden_size, bias=cfg.bias))  # I -> C
        self.act = F.silu if not isinstance(cfg, GeGLUConfig) else (lambda x: F.gelu(x, approximate="tanh"))
        self.dropout = nn.Dropout(cfg.dropout)
        self.intermediate_size = i

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C]
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [B, T, I] each
        return self.dropout(self.down(self.act(gate) * up))

    def cost(self, call: CostCall) -> Cost:  # keeps: gate_up input, gate / up, act(gate), the product
        saved = call.activation_bytes * (self.gate_up.in_features + 4 * self.intermediate_size)
        return Cost(param_count(self), linear_flops(self), saved)
