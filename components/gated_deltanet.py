"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta
Rule"), as Qwen3-Next and OLMo-Hybrid use it.

    q, k, v, z, b, a = in_proj(x)                       per head: q, k [Dk] (Hk heads), v, z [Dv] (H heads)
    q, k, v          = silu(conv1d(q, k, v))            short causal depthwise convolution
    q, k             = l2norm(q) / sqrt(Dk), l2norm(k)  each value head reads key head h // (H / Hk)
    beta             = sigmoid(b)    (x 2 with allow_neg_eigval: eigenvalues in (-1, 1))
    g                = -exp(A_log) softplus(a + dt_bias)          a log decay per head
    S_t              = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T       state [Dk, Dv]
    o_t              = S_t^T q_t
    out              = out_proj(rmsnorm(o) * silu(z))   per-head gated RMSNorm (norm before the gate)

The delta rule writes only what the state does not already predict for k_t (v_t - S^T k_t), at rate
beta_t; g_t forgets. ``components.linear_recurrence`` runs it chunk-parallel (the WY / UT transform) for
training and prefill and one token at a time for decoding.

Weights: in_proj.weight [2 Hk Dk + 2 H Dv + 2 H, C] with rows in the order q (Hk Dk), k (Hk Dk),
v (H Dv), z (H Dv), b (H), a (H), each grouped by head; conv1d.weight [2 Hk Dk + H Dv, 1, K] (channels
q, k, v); dt_bias [H]; A_log [H]; norm.weight [Dv]; out_proj.weight [C, H Dv]. transformers'
``Qwen3NextGatedDeltaNet`` keeps the same conv1d, dt_bias, A_log, norm and out_proj tensors; its
in_proj_qkvz [2 Hk Dk + 2 H Dv, C] interleaves rows per key head (for key head i: q_i, k_i, then the
v and z rows of its r = H / Hk value heads) and in_proj_ba [2 H, C] the b and a rows per key head
(b_i [r], a_i [r]); in_proj is those rows regrouped. OLMo-Hybrid's q/k/v/g/b/a_proj stack into
in_proj in that order (g_proj is z; its o_norm is norm, o_proj is out_proj; allow_neg_eigval, norm_eps
1e-5).

Shapes: B batch, T tokens, C hidden, H value heads, Hk key heads, Dk key dim, Dv value dim, K conv width.
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
    chunk_gated_delta,
    dt_bias_init,
    fla_ops,
    form_option,
    kernel_option,
    l2norm,
    masked,
    recurrent_gated_delta,
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
class GatedDeltaNetConfig(ComponentConfig):
    """Gated DeltaNet: a delta-rule state with a per-head decay (Qwen3-Next, OLMo-Hybrid)."""

    num_heads: Optional[int] = option(
        None, help="value (output) heads (null: model.num_heads)", min=1, bound="num_heads"
    )
    num_key_heads: Optional[int] = option(
        None, help="query/key heads, dividing num_heads (null: num_heads)", min=1, bound="num_heads"
    )
    head_dim: Optional[int] = option(
        None, help="query/key dims per head (null: hidden_size / num_heads)", min=1, bound="head_dim"
    )
    value_head_dim: Optional[int] = option(None, help="value dims per head (null: head_dim)", min=1, bound="head_dim")
    conv_size: int = option(4, help="short convolution width", min=1, max=64)
    chunk_size: int = option(64, help="tokens per chunk of the chunk-parallel form", min=1, max=1024)
    allow_neg_eigval: bool = option(False, help="beta in (0, 2) instead of (0, 1) (OLMo-Hybrid)")
    norm_eps: float = option(1e-6, help="epsilon of the gated output RMSNorm", min=0.0)
    dt_min: float = option(0.001, help="smallest initial time step (dt_bias)", min=0.0)
    dt_max: float = option(0.1, help="largest initial time step", min=0.0)
    a_init_max: float = option(16.0, help="initial A = exp(A_log) spread over [1, a_init_max]", min=1.0, max=1e4)
    form: str = form_option()
    kernel: str = kernel_option()

    def summary(self) -> str:
        return f"gated_deltanet(h={self.num_heads}, kh={self.num_key_heads})"

    def resolve(self, model, check) -> None:
        inherit(self, "num_heads", model.num_heads)
        inherit(self, "num_key_heads", self.num_heads)
        if self.head_dim is None:
            if model.hidden_size % self.num_heads:
                check.fail(
                    "num_heads",
                    f"hidden_size {model.hidden_size} is not divisible by {self.num_heads}",
                    "pick a divisor of hidden_size or set head_dim",
                )
                return
            inherit(self, "head_dim", model.hidden_size // self.num_heads)
        inherit(self, "value_head_dim", self.head_dim)
        if self.num_heads % self.num_key_heads:
            check.fail(
                "num_key_heads", f"{self.num_key_heads} does not divide num_heads={self.num_heads}", "use a divisor"
            )
        if not 0 < self.dt_min <= self.dt_max:
            check.fail("dt_min", f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}", "e.g. 0.001 and 0.1")
        check_kernel(self, check)


@ATTENTION.register("gated_deltanet", config=GatedDeltaNetConfig)
class GatedDeltaNet(RecurrentMixer):
    def __init__(self, cfg: GatedDeltaNetConfig, ctx: BuildContext):
        super().__init__()
        h, hk, dk, dv = cfg.num_heads, cfg.num_key_heads, cfg.head_dim, cfg.value_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim, self.value_head_dim = h, hk, dk, dv
        self.chunk_size, self.form, self.kernel, self.neg_eigval = (
            cfg.chunk_size,
            cfg.form,
            cfg.kernel,
            cfg.allow_neg_eigval,
        )
        self.init_range = (cfg.dt_min, cfg.dt_max, cfg.a_init_max)
        self.split = [2 * hk * dk + h * dv, h * dv, h, h]  # conv input (q, k, v), z, b, a
        self.in_proj = nn.Linear(ctx.hidden_size, sum(self.split), bias=False)
        self.conv1d = ShortConv(self.split[0], cfg.conv_size, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(h))  # [H]
        self.A_log = nn.Parameter(torch.empty(h))  # [H]
        self.norm = GatedRMSNorm(dv, dv, cfg.norm_eps, norm_before_gate=True)
        self.out_proj = mark_residual(nn.Linear(h * dv, ctx.hidden_size, bias=False))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A spread over [1, a_init_max] (Qwen3-Next draws it from U(0, 16)), dt_bias = softplus^-1 of
        time steps log-spaced in [dt_min, dt_max]; grids, so no generator is needed."""
        dt_min, dt_max, a_max = self.init_range
        self.A_log.copy_(torch.log(torch.linspace(1.0, a_max, self.num_heads)))
        self.dt_bias.copy_(dt_bias_init(self.num_heads, dt_min, dt_max, 1e-4))

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
        h, hk, dk, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.value_head_dim
        valid = self.new_valid(inputs, t)
        conv_state, state = self.read(past_key_value)
        qkv, z, beta, a = self.in_proj(hidden).split(self.split, dim=-1)
        qkv, conv_tail = self.conv1d(masked(qkv, valid), conv_state)
        q, k, v = qkv.split([hk * dk, hk * dk, h * dv], dim=-1)
        q = l2norm(q.float().view(b, t, hk, dk)) * dk**-0.5
        k = l2norm(k.float().view(b, t, hk, dk))
        q, k = (x.repeat_interleave(h // hk, dim=2).transpose(1, 2) for x in (q, k))  # [B, H, T, Dk]
        v = v.float().view(b, t, h, dv).transpose(1, 2)  # [B, H, T, Dv]
        beta = beta.float().sigmoid() * (2.0 if self.neg_eigval else 1.0)  # [B, T, H]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # [B, T, H], <= 0
        beta, g = masked(beta, valid).transpose(1, 2), masked(g, valid).transpose(1, 2)  # a pad: no decay, no write
        y, state = self.scan(q, k, v, g, beta, state, hidden)  # [B, H, T, Dv]
        y = self.norm(y.transpose(1, 2).to(hidden.dtype), z.view(b, t, h, dv))  # [B, T, H, Dv]
        self.store(past_key_value, conv_tail, state, t)
        return self.out_proj(y.reshape(b, t, h * dv)), past_key_value if use_cache else None

    def scan(
        self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Optional[Tensor], x: Tensor
    ) -> tuple[Tensor, Tensor]:
        """q (normalised and scaled), k [B, H, T, Dk], v [B, H, T, Dv], g, beta [B, H, T] -> (o, state)."""
        choice = self.choice(x)
        if choice.kernel == "fla":
            ops = fla_ops()
            q, k, v, g, beta = (u.transpose(1, 2).contiguous() for u in (q, k, v, g, beta))  # [B, T, H, ...]
            run = ops.chunk_gated_delta_rule if choice.form == "chunk" else ops.fused_recurrent_gated_delta_rule
            y, state = run(q, k, v, g=g, beta=beta, scale=1.0, initial_state=state, output_final_state=True)
            return y.transpose(1, 2), state
        if choice.form == "chunk":
            return chunk_gated_delta(q, k, v, g, beta, self.chunk_size, state)
        return recurrent_gated_delta(q, k, v, g, beta, state)

    def cost(self, call: CostCall) -> Cost:
        """Parameters, FLOPs (linear in T), saved bytes and the fixed state (conv tail + S per head)."""
        a, h, dk, dv, L = call.activation_bytes, self.num_heads, self.head_dim, self.value_head_dim, self.chunk_size
        conv, c, width = self.split[0], self.in_proj.in_features, sum(self.split)
        flops = linear_flops(self.in_proj, self.out_proj) + 2 * conv * self.conv1d.weight.shape[-1]
        # the delta rule's extra work per token: k k^T scores, two triangular solves (L (Dk + Dv)),
        # the correction W S (2 Dk Dv)
        flops += scan_flops(h, dk, dv, L) + h * (2 * L * dk + L * (dk + dv) + 2 * dk * dv) + 10 * h * dv
        # (measured against autograd's saved tensors, tests/test_mixers.py) in_proj input and output, the
        # conv's padded input, output and SiLU, out_proj's input; float32: the chunk's decays, system,
        # scores and products (5 [H, L]), q and k normalised, repeated, chunked, decayed (8 [H, Dk]), v, its
        # beta-scaled copy, U0, W S, u and the norm (7 [H, Dv]), beta and g; one state per chunk
        saved = a * (c + width + 3 * conv + h * dv) + 4 * (5 * h * L + 8 * h * dk + 7 * h * dv + 10 * h)
        saved += 4 * h * dk * dv // L
        state = 4 * h * dk * dv + a * conv * self.conv1d.tail
        return Cost(param_count(self), flops, saved, cache=0, state=state)
