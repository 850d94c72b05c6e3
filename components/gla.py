"""Gated linear attention (Yang, Wang, Shen, Panda & Kim 2023, "Gated Linear Attention Transformers
with Hardware-Efficient Training"), laid out as flash-linear-attention's ``GatedLinearAttention``.

    q, k, v   = phi(q_proj x), phi(k_proj x), v_proj x      per head: q, k [Dk], v [Dv]; phi the feature map
    alpha_t   = exp(logsigmoid(gk_up(gk_down x)) / tau)     data-dependent decay per key channel (low rank)
    S_t       = diag(alpha_t) S_{t-1} + k_t v_t^T           state [Dk, Dv] per head
    o_t       = S_t^T q_t / sqrt(Dk)
    out       = o_proj(rmsnorm(o) * silu(g_proj x))        per-head RMSNorm and the output gate

tau (``gate_logit_normalizer``, 16) keeps the decays near 1 at initialisation so the state remembers
long; ``clamp_min`` bounds the log decay from below. An optional short convolution (``conv_size`` > 0)
runs over q, k, v before the feature map, as the layer's ``use_short_conv``. The recurrence runs
chunk-parallel (training, prefill) or one token at a time (decoding) through
``components.linear_recurrence``.

Weights (flash-linear-attention's names in brackets): q_proj [H Dk, C], k_proj [H Dk, C], v_proj
[H Dv, C], g_proj [H Dv, C] (with ``use_output_gate``), gk_down [R, C] (gk_proj.0), gk_up [H Dk, R] + bias
(gk_proj.1), conv1d.weight [2 H Dk + H Dv, 1, K] (q_conv1d, k_conv1d, v_conv1d stacked), norm.weight [Dv]
(g_norm_swish_gate.weight), o_proj [C, H Dv].

Shapes: B batch, T tokens, C hidden, H heads, Dk key dim, Dv value dim, R gate rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.linear_recurrence import (
    GatedRMSNorm,
    RecurrentCache,
    RecurrentMixer,
    ShortConv,
    check_kernel,
    chunk_gated_linear,
    fla_ops,
    form_option,
    kernel_option,
    masked,
    recurrent_gated_linear,
    scan_flops,
)
from composer.contract import (
    ATTENTION,
    BuildContext,
    ComponentConfig,
    Cost,
    CostCall,
    LayerInputs,
    inherit,
    linear_flops,
    mark_residual,
    option,
    param_count,
)

FEATURE_MAPS = {
    "none": lambda x: x,
    "relu": F.relu,
    "silu": F.silu,
    "elu_plus_one": lambda x: F.elu(x) + 1.0,  # Katharopoulos et al. 2020
}


@dataclass
class GLAConfig(ComponentConfig):
    """Gated linear attention: a linear-attention state with a data-dependent decay per key channel."""

    num_heads: Optional[int] = option(None, help="heads (null: model.num_heads)", min=1, bound="num_heads")
    expand_k: float = option(0.5, help="key width / hidden_size (H Dk)", min=0.0, max=64.0)
    expand_v: float = option(1.0, help="value width / hidden_size (H Dv)", min=0.0, max=64.0)
    gate_low_rank_dim: int = option(16, help="rank of the decay's projection", min=1, bound="hidden_size")
    gate_logit_normalizer: float = option(16.0, help="log decay = logsigmoid(.) / this", min=1e-3, max=1e4)
    clamp_min: Optional[float] = option(None, help="lower bound of the log decay (null: none)", max=0.0)
    feature_map: str = option(
        "none", help="map of q and k: none | relu | silu | elu_plus_one", choices=tuple(FEATURE_MAPS)
    )
    use_output_gate: bool = option(True, help="gate the normalised output with silu(g_proj x)")
    conv_size: int = option(0, help="short convolution over q, k, v (0: none; 4 is common)", min=0, max=64)
    norm_eps: float = option(1e-5, help="epsilon of the output RMSNorm", min=0.0)
    chunk_size: int = option(
        16, help="tokens per chunk of the chunk form (its per-channel decays are [L, L, Dk] per chunk)", min=1, max=1024
    )
    form: str = form_option()
    kernel: str = kernel_option()

    def summary(self) -> str:
        return f"gla(h={self.num_heads})"

    def resolve(self, model, check) -> None:
        inherit(self, "num_heads", model.num_heads)
        for name in ("expand_k", "expand_v"):
            width = getattr(self, name) * model.hidden_size
            if width != int(width) or int(width) % self.num_heads or width < self.num_heads:
                check.fail(
                    name,
                    f"{name} * hidden_size = {width:g} is not a positive multiple of num_heads={self.num_heads}",
                    f"pick {name} so that {name} * {model.hidden_size} divides into {self.num_heads} heads",
                )
        check_kernel(self, check)


@ATTENTION.register("gla", config=GLAConfig)
class GatedLinearAttention(RecurrentMixer):
    def __init__(self, cfg: GLAConfig, ctx: BuildContext):
        super().__init__()
        c, h = ctx.hidden_size, cfg.num_heads
        kd, vd = int(cfg.expand_k * c), int(cfg.expand_v * c)
        self.num_heads, self.num_kv_heads, self.head_dim, self.value_head_dim = h, h, kd // h, vd // h
        self.chunk_size, self.form, self.kernel = cfg.chunk_size, cfg.form, cfg.kernel
        self.normalizer, self.clamp_min, self.feature = cfg.gate_logit_normalizer, cfg.clamp_min, cfg.feature_map
        self.q_proj = nn.Linear(c, kd, bias=False)
        self.k_proj = nn.Linear(c, kd, bias=False)
        self.v_proj = nn.Linear(c, vd, bias=False)
        self.g_proj = nn.Linear(c, vd, bias=False) if cfg.use_output_gate else None
        self.gk_down = nn.Linear(c, cfg.gate_low_rank_dim, bias=False)
        self.gk_up = nn.Linear(cfg.gate_low_rank_dim, kd, bias=True)
        self.conv1d = ShortConv(2 * kd + vd, cfg.conv_size, bias=False) if cfg.conv_size else None
        self.norm = GatedRMSNorm(self.value_head_dim, self.value_head_dim, cfg.norm_eps, norm_before_gate=True)
        self.o_proj = mark_residual(nn.Linear(vd, c, bias=False))

    def state_shape(self) -> tuple[int, int, int]:
        return (self.num_heads, self.head_dim, self.value_head_dim)

    def forward(
        self,
        hidden: Tensor,
        inputs: LayerInputs,
        past_key_value: Optional[RecurrentCache] = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Optional[RecurrentCache]]:
        b, t, _ = hidden.shape
        h, dk, dv = self.num_heads, self.head_dim, self.value_head_dim
        valid = self.new_valid(inputs, t)
        conv_state, state = self.read(past_key_value)
        q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        conv_tail = None
        if self.conv1d is not None:
            qkv, conv_tail = self.conv1d(masked(torch.cat([q, k, v], dim=-1), valid), conv_state)
            q, k, v = qkv.split([h * dk, h * dk, h * dv], dim=-1)
        phi = FEATURE_MAPS[self.feature]
        q = phi(q.float()).view(b, t, h, dk).transpose(1, 2) * dk**-0.5  # [B, H, T, Dk]
        k = masked(phi(k.float()), valid).view(b, t, h, dk).transpose(1, 2)  # a pad writes nothing
        v = v.float().view(b, t, h, dv).transpose(1, 2)  # [B, H, T, Dv]
        g = F.logsigmoid(self.gk_up(self.gk_down(hidden)).float()) / self.normalizer  # [B, T, H Dk], <= 0
        if self.clamp_min is not None:
            g = g.clamp(min=self.clamp_min)
        g = masked(g, valid).view(b, t, h, dk).transpose(1, 2)  # a pad: decay 1
        y, state = self.scan(q, k, v, g, state, hidden)  # [B, H, T, Dv]
        gate = self.g_proj(hidden).view(b, t, h, dv) if self.g_proj is not None else None
        y = self.norm(y.transpose(1, 2).to(hidden.dtype), gate)  # [B, T, H, Dv]
        self.store(past_key_value, conv_tail, state, t)
        return self.o_proj(y.reshape(b, t, h * dv)), past_key_value if use_cache else None

    def scan(
        self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Optional[Tensor], x: Tensor
    ) -> tuple[Tensor, Tensor]:
        """q (scaled), k, g [B, H, T, Dk], v [B, H, T, Dv] -> (o [B, H, T, Dv], state [B, H, Dk, Dv])."""
        choice = self.choice(x)
        if choice.kernel == "fla":
            ops, (q, k, v, g) = fla_ops(), [u.transpose(1, 2).contiguous() for u in (q, k, v, g)]
            if choice.form == "chunk":
                y, state = ops.chunk_gla(q, k, v, g=g, scale=1.0, initial_state=state, output_final_state=True)
            else:
                y, state = ops.fused_recurrent_gla(
                    q, k, v, gk=g, scale=1.0, initial_state=state, output_final_state=True
                )
            return y.transpose(1, 2), state
        if choice.form == "chunk":
            return chunk_gated_linear(q, k, v, g, self.chunk_size, state)
        return recurrent_gated_linear(q, k, v, g, state)

    def cost(self, call: CostCall) -> Cost:
        """Parameters, FLOPs (linear in T; the per-channel decays form the chunk scores elementwise),
        saved bytes (the chunk's [L, L, Dk] decays dominate) and the fixed state."""
        a, h, dk, dv, L = call.activation_bytes, self.num_heads, self.head_dim, self.value_head_dim, self.chunk_size
        c = self.q_proj.in_features
        mods = (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.gk_down, self.gk_up, self.o_proj)
        conv = self.conv1d.weight.shape[0] if self.conv1d is not None else 0
        flops = linear_flops(*mods) + scan_flops(h, dk, dv, L, per_channel=True) + 10 * h * dv
        flops += 2 * conv * (self.conv1d.weight.shape[-1] if self.conv1d is not None else 0)
        # (measured against autograd's saved tensors, tests/test_mixers.py) the input, gk_down's output,
        # o_proj's input, the conv's padded input, output and SiLU; float32: the chunk's per-channel decays
        # and their products (2 [H, L, Dk]), the scores [H, L], v, the gate and the norm (7 [H, Dv]), q, k, g
        # and their decayed copies (6 [H, Dk]); one state per chunk
        rank = self.gk_down.out_features
        saved = a * (c + h * dv + rank + 3 * conv) + 4 * (2 * h * L * dk + h * L + 7 * h * dv + 6 * h * dk)
        saved += 4 * h * dk * dv // L
        state = 4 * h * dk * dv + (a * conv * self.conv1d.tail if self.conv1d is not None else 0)
        return Cost(param_count(self), flops, saved, cache=0, state=state)
