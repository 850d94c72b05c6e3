"""One plugin of every family, written from composer.contract alone (test_contract checks that this
file imports nothing else of the project). Each states its cost, so composer-plan plans it.

Shapes: B batch, T new tokens, S keys, C hidden, H heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from composer.contract import (
    IGNORE_INDEX,
    BlockBase,
    BlockConfigBase,
    BuildContext,
    ComponentConfig,
    Cost,
    CostCall,
    HeadBase,
    LayerInputs,
    MixerBase,
    PositionBase,
    cost_of,
    linear_flops,
    mark_residual,
    option,
    param_count,
)


# ----------------------------------------------------------------------------- norm
@dataclass
class ScaleNormConfig(ComponentConfig):
    """ScaleNorm: one learned scale on the unit-normalised vector."""

    eps: float = option(1e-5, help="floor of the norm", min=0.0)


class ScaleNorm(nn.Module):
    def __init__(self, cfg: ScaleNormConfig, ctx: BuildContext):
        super().__init__()
        self.eps, self.size = cfg.eps, ctx.hidden_size
        self.g = nn.Parameter(torch.empty(()))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.g, math.sqrt(self.size))

    def forward(self, x: Tensor) -> Tensor:  # [..., C]
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp(min=self.eps)

    def cost(self, call: CostCall) -> Cost:
        return Cost(param_count(self), saved=call.residual_bytes * self.size)


# ----------------------------------------------------------------------------- feed-forward
@dataclass
class SquaredReluConfig(ComponentConfig):
    """Feed-forward with a squared-ReLU activation (Primer)."""

    expansion: int = option(4, help="hidden width / hidden_size", min=1)


class SquaredRelu(nn.Module):
    def __init__(self, cfg: SquaredReluConfig, ctx: BuildContext):
        super().__init__()
        self.up = nn.Linear(ctx.hidden_size, cfg.expansion * ctx.hidden_size)
        self.down = mark_residual(nn.Linear(cfg.expansion * ctx.hidden_size, ctx.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.relu(self.up(x)).square())

    def cost(self, call: CostCall) -> Cost:
        return Cost(param_count(self), linear_flops(self), call.activation_bytes * 3 * self.up.out_features)


# ----------------------------------------------------------------------------- position
@dataclass
class SinusoidConfig(ComponentConfig):
    """Fixed sinusoidal position embeddings (Vaswani et al.), added to the token embeddings."""


class Sinusoid(PositionBase):
    acts_on = frozenset({"embed"})

    def __init__(self, cfg: SinusoidConfig, ctx: BuildContext):
        super().__init__()
        self.size = ctx.hidden_size

    def embed(self, position_ids: Tensor) -> Tensor:  # [B|1, T] -> [B|1, T, C]
        i = torch.arange(0, self.size, 2, device=position_ids.device, dtype=torch.float32)
        angle = position_ids[..., None].float() / (10000 ** (i / self.size))
        return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)

    def rotation(self, position_ids: Tensor) -> None:
        return None

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> None:
        return None

    def cost(self, call: CostCall, mixer: Optional[nn.Module] = None) -> Cost:
        return Cost()


# ----------------------------------------------------------------------------- sequence mixer
class AppendCache:
    """The toy attention's own cache: keys and values appended per call."""

    def __init__(self) -> None:
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reset(self) -> None:
        self.k = self.v = None

    def select(self, index: Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]


@dataclass
class CausalLinearMixConfig(ComponentConfig):
    """Causal softmax attention with one learned temperature per head."""

    num_heads: int = option(2, help="heads", min=1)


class CausalLinearMix(MixerBase):
    def __init__(self, cfg: CausalLinearMixConfig, ctx: BuildContext):
        super().__init__()
        self.num_heads = self.num_kv_heads = cfg.num_heads
        self.head_dim = ctx.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(ctx.hidden_size, 3 * ctx.hidden_size, bias=False)
        self.out = mark_residual(nn.Linear(ctx.hidden_size, ctx.hidden_size, bias=False))
        self.temperature = nn.Parameter(torch.empty(cfg.num_heads))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.temperature)

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device: Any) -> AppendCache:
        return AppendCache()

    def forward(
        self, hidden: Tensor, inputs: LayerInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any]:
        b, t, c = hidden.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(hidden).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, D]
        if inputs.rotation is not None:
            q, k = inputs.rotation.apply(q, k)
        if past_key_value is not None:
            k, v = past_key_value.append(k, v)  # [B, H, S, D]
        s = k.shape[2]
        scores = (q @ k.transpose(-2, -1)) * self.temperature[:, None, None] / math.sqrt(d)  # [B, H, T, S]
        allowed = (
            torch.arange(s, device=hidden.device)[None, :] <= torch.arange(s - t, s, device=hidden.device)[:, None]
        )
        if inputs.key_valid is not None:
            allowed = allowed & inputs.key_valid[:, None, None, -s:]
        y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # [B, H, T, D]
        return self.out(y.transpose(1, 2).reshape(b, t, c)), past_key_value if use_cache else None

    def cost(self, call: CostCall) -> Cost:
        c, t, a = self.qkv.in_features, call.seq_len, call.activation_bytes
        saved = a * (c + 3 * c + 2 * c) + 4 * self.num_heads * t  # projections, probabilities
        return Cost(param_count(self), linear_flops(self) + 4 * t * c, saved, cache=2 * c * a)


# ----------------------------------------------------------------------------- head
@dataclass
class ScaledLMHeadConfig(ComponentConfig):
    """Next-token logits divided by a learned temperature; tied to the embedding when asked."""


class ScaledLMHead(HeadBase):
    def __init__(self, cfg: ScaledLMHeadConfig, ctx: BuildContext):
        super().__init__()
        self.proj = nn.Linear(ctx.hidden_size, ctx.embedding_rows, bias=False)
        self.log_temperature = nn.Parameter(torch.empty(()))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.log_temperature)

    def tie(self, embedding: nn.Embedding) -> bool:
        self.proj.weight = embedding.weight
        return True

    def tied_to(self, embedding: nn.Embedding) -> bool:
        return self.proj.weight is embedding.weight

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:  # -> [B, T, V]
        return self.proj(hidden) / self.log_temperature.exp()

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts labels[t + 1]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def cost(self, call: CostCall) -> Cost:
        v = self.proj.out_features
        return Cost(
            param_count(self),
            linear_flops(self),
            call.activation_bytes * self.proj.in_features + 4 * v,
            transient=8 * v * call.tokens,
        )


# ----------------------------------------------------------------------------- block
@dataclass
class ScaledResidualConfig(BlockConfigBase):
    """Pre-norm block whose branches are scaled by learned scalars (ReZero-like, starting at 1)."""


class ScaledResidual(BlockBase):
    def __init__(
        self, cfg: ScaledResidualConfig, ctx: BuildContext, attn: nn.Module, ffn: nn.Module, norms: dict[str, nn.Module]
    ):
        super().__init__()
        self.attn, self.ffn = attn, ffn
        self.attn_norm, self.ffn_norm = norms["attn_norm"], norms["ffn_norm"]
        self.alpha = nn.Parameter(torch.empty(2))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.alpha)

    def forward(
        self, hidden: Tensor, inputs: LayerInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any, Optional[Tensor]]:
        a, present = self.attn(self.attn_norm(hidden), inputs, past_key_value, use_cache)
        hidden = hidden + self.alpha[0] * a
        return hidden + self.alpha[1] * self.ffn(self.ffn_norm(hidden)), present, None

    def cost(self, call: CostCall) -> Cost:
        parts = [cost_of(m, call) for m in (self.attn, self.attn_norm, self.ffn, self.ffn_norm)]
        attention, ffn = parts[0] + parts[1], parts[2] + parts[3]
        return (attention + ffn + Cost(params=2)).with_parts(attention=attention, ffn=ffn)


PLUGINS = {  # family -> (name, class, config)
    "norm": ("contract_scale_norm", ScaleNorm, ScaleNormConfig),
    "ffn": ("contract_squared_relu", SquaredRelu, SquaredReluConfig),
    "position": ("contract_sinusoid", Sinusoid, SinusoidConfig),
    "attention": ("contract_mix", CausalLinearMix, CausalLinearMixConfig),
    "head": ("contract_lm", ScaledLMHead, ScaledLMHeadConfig),
    "block": ("contract_block", ScaledResidual, ScaledResidualConfig),
}
