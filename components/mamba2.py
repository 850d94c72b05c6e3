"""Mamba-2: the state-space duality (SSD) layer (Dao & Gu 2024, "Transformers are SSMs").

    z, xBC, dt = in_proj(u)                                 gate [E], conv input [E + 2 G N], step [H]
    x, B, C    = silu(conv1d(xBC))                          short causal depthwise convolution
    dt         = clamp(softplus(dt + dt_bias), dt_limit)    per head
    A          = -exp(A_log)                                one scalar decay per head
    h_t        = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T       state [N, P] per head (B, C shared by a group)
    y_t        = h_t^T C_t + D x_t
    out        = out_proj(rmsnorm(y * silu(z)))             gated RMSNorm over groups of E / G channels

The recurrence is gated linear attention with one decay per head (q = C, k = dt B, v = x, g = dt A),
run by ``components.linear_recurrence``: chunk-parallel for training and prefill, one token at a time
for decoding, both from the same weights.

Weights (names and shapes are those of transformers' ``Mamba2Mixer``, so its checkpoints map 1:1):
in_proj.weight [E + (E + 2 G N) + H, C] (rows: z, x, B, C, dt), in_proj.bias when ``use_bias``,
conv1d.weight [E + 2 G N, 1, K], conv1d.bias [E + 2 G N] when ``conv_bias``, dt_bias [H], A_log [H],
D [H], norm.weight [E], out_proj.weight [C, E] (+ bias when ``use_bias``).

Shapes: B batch, T tokens, C hidden, E = H P inner width, H heads, P head dim, G groups, N state size.
"""

from __future__ import annotations

import math
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
    dt_bias_init,
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


@dataclass
class Mamba2Config(ComponentConfig):
    """Mamba-2 (SSD): a selective state space with one decay per head, chunk-parallel and recurrent."""

    num_heads: Optional[int] = option(
        None, help="SSM heads (null: expand * hidden_size / head_dim)", min=1, bound="num_heads"
    )
    head_dim: Optional[int] = option(None, help="channels per head (P; null: 64)", min=1, bound="head_dim")
    expand: float = option(2.0, help="inner width / hidden_size when num_heads is null", min=0.0, max=64.0)
    state_size: int = option(128, help="state dims per head (N, d_state)", min=1, bound="head_dim")
    n_groups: int = option(1, help="groups of heads sharing B and C (divides num_heads)", min=1, bound="num_heads")
    conv_size: int = option(4, help="short convolution width (K)", min=1, max=64)
    conv_bias: bool = option(True, help="bias on the short convolution")
    use_bias: bool = option(False, help="bias on in_proj and out_proj")
    chunk_size: int = option(64, help="tokens per chunk of the chunk-parallel form", min=1, max=4096)
    dt_min: float = option(0.001, help="smallest initial time step", min=0.0)
    dt_max: float = option(0.1, help="largest initial time step", min=0.0)
    dt_init_floor: float = option(1e-4, help="initial time steps are at least this", min=0.0)
    dt_limit_min: float = option(0.0, help="time steps are clamped to at least this", min=0.0)
    dt_limit_max: Optional[float] = option(None, help="... and at most this (null: no limit)", min=0.0)
    norm_eps: float = option(1e-5, help="epsilon of the gated RMSNorm", min=0.0)
    form: str = form_option()
    kernel: str = kernel_option()

    def summary(self) -> str:
        return f"mamba2(h={self.num_heads}, n={self.state_size})"

    def resolve(self, model, check) -> None:
        inherit(self, "head_dim", 64)
        if self.num_heads is None:
            inner = self.expand * model.hidden_size
            if inner % self.head_dim or inner < self.head_dim:
                check.fail(
                    "expand",
                    f"expand * hidden_size = {inner:g} is not a multiple of head_dim={self.head_dim}",
                    "set num_heads, or an expand / head_dim that divide",
                )
                return
            inherit(self, "num_heads", int(inner) // self.head_dim)
        if self.num_heads % self.n_groups:
            check.fail("n_groups", f"{self.n_groups} does not divide num_heads={self.num_heads}", "use a divisor")
        if self.dt_min > self.dt_max or self.dt_min <= 0:
            check.fail("dt_min", f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}", "e.g. 0.001 and 0.1")
        if self.dt_limit_max is not None and self.dt_limit_max < self.dt_limit_min:
            check.fail("dt_limit_max", f"{self.dt_limit_max} < dt_limit_min={self.dt_limit_min}", "use null or more")
        check_kernel(self, check)


@ATTENTION.register("mamba2", config=Mamba2Config)
class Mamba2(RecurrentMixer):
    def __init__(self, cfg: Mamba2Config, ctx: BuildContext):
        super().__init__()
        h, p, g, n = cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size
        self.num_heads, self.num_kv_heads, self.head_dim, self.n_groups, self.state_size = h, g, p, g, n
        self.inner, self.chunk_size, self.form, self.kernel = h * p, cfg.chunk_size, cfg.form, cfg.kernel
        self.dt_range = (cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        self.dt_limit = (cfg.dt_limit_min, math.inf if cfg.dt_limit_max is None else cfg.dt_limit_max)
        conv = self.inner + 2 * g * n
        self.in_proj = nn.Linear(ctx.hidden_size, self.inner + conv + h, bias=cfg.use_bias)  # C -> z, xBC, dt
        self.conv1d = ShortConv(conv, cfg.conv_size, cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(h))  # [H]
        self.A_log = nn.Parameter(torch.empty(h))  # [H]
        self.D = nn.Parameter(torch.empty(h))  # [H]
        self.norm = GatedRMSNorm(self.inner, self.inner // g, cfg.norm_eps, norm_before_gate=False)
        self.out_proj = mark_residual(nn.Linear(self.inner, ctx.hidden_size, bias=cfg.use_bias))  # E -> C

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A = 1..H, D = 1, dt_bias = softplus^-1 of steps log-spaced in [dt_min, dt_max] (Mamba-2's)."""
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(dt_bias_init(self.num_heads, *self.dt_range))

    def state_shape(self) -> tuple[int, int, int]:
        return (self.num_heads, self.state_size, self.head_dim)

    def forward(
        self,
        hidden: Tensor,
        inputs: LayerInputs,
        past_key_value: Optional[RecurrentCache] = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Optional[RecurrentCache]]:
        b, t, _ = hidden.shape
        h, p, g, n = self.num_heads, self.head_dim, self.n_groups, self.state_size
        valid = self.new_valid(inputs, t)  # [B, T] or None
        conv_state, state = self.read(past_key_value)
        z, xbc, dt = self.in_proj(hidden).split([self.inner, self.inner + 2 * g * n, h], dim=-1)
        xbc, conv_tail = self.conv1d(masked(xbc, valid), conv_state)  # pads never enter the conv
        x, bb, cc = masked(xbc, valid).split([self.inner, g * n, g * n], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)  # [B, T, H]
        dt = masked(dt, valid)  # a pad: decay 1, no write
        a = -torch.exp(self.A_log.float())  # [H]
        x = x.float().view(b, t, h, p)
        bb = bb.float().view(b, t, g, n).repeat_interleave(h // g, dim=2)  # [B, T, H, N]
        cc = cc.float().view(b, t, g, n).repeat_interleave(h // g, dim=2)
        q, k, v = cc.transpose(1, 2), (bb * dt[..., None]).transpose(1, 2), x.transpose(1, 2)
        y, state = self.scan(q, k, v, (dt * a).transpose(1, 2), state, hidden)  # [B, H, T, P]
        y = y.transpose(1, 2) + x * self.D.float()[:, None]  # [B, T, H, P] with the D skip
        y = self.norm(y.reshape(b, t, self.inner), z)
        self.store(past_key_value, conv_tail, state, t)
        return self.out_proj(y.to(hidden.dtype)), past_key_value if use_cache else None

    def scan(
        self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Optional[Tensor], x: Tensor
    ) -> tuple[Tensor, Tensor]:
        """q = C, k = dt B [B, H, T, N], v = x [B, H, T, P], g = dt A [B, H, T] -> (y, state [B, H, N, P])."""
        choice = self.choice(x)
        if choice.kernel == "fla":  # simple GLA (a decay per head) is the SSD recurrence
            ops, (q, k, v, g) = fla_ops(), (u.transpose(1, 2).contiguous() for u in (q, k, v, g))  # [B, T, H, ...]
            run = ops.chunk_simple_gla if choice.form == "chunk" else ops.fused_recurrent_simple_gla
            y, state = run(q, k, v, g=g, scale=1.0, initial_state=state, output_final_state=True)
            return y.transpose(1, 2), state
        if choice.form == "chunk":
            return chunk_gated_linear(q, k, v, g, self.chunk_size, state)
        return recurrent_gated_linear(q, k, v, g, state)

    def cost(self, call: CostCall) -> Cost:
        """Parameters, FLOPs (linear in T: chunk-local scores plus the state), saved bytes and the state."""
        a, h, p, n, L = call.activation_bytes, self.num_heads, self.head_dim, self.state_size, self.chunk_size
        conv, c = self.conv1d.weight.shape[0], self.in_proj.in_features
        width = self.inner + conv + h
        flops = linear_flops(self.in_proj, self.out_proj) + 2 * conv * self.conv1d.weight.shape[-1]
        flops += scan_flops(h, n, p, L) + 10 * self.inner  # + D skip, gate, norm (elementwise)
        # (measured against autograd's saved tensors, tests/test_mixers.py) in_proj input and output, the
        # conv's padded input, output and SiLU; float32 C, B (repeated), the chunked q / k and their decayed
        # copies (5 [H, N]), the chunk's scores, decays and products (4 [H, L]), x, y, the D skip and the
        # norm (4 [E]), out_proj's input; one state per chunk
        saved = a * (c + width + 3 * conv + self.inner) + 4 * (5 * h * n + 4 * h * L + 4 * self.inner + 4 * h)
        saved += 4 * h * n * p // L
        state = 4 * h * n * p + a * conv * self.conv1d.tail
        return Cost(param_count(self), flops, saved, cache=0, state=state)
