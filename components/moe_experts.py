"""The routed experts of a mixture of experts, stacked, and computed without a Python loop over experts.

Every expert is the same kind of feed-forward network (the MoE's ``expert`` config), I its width:

    mlp:             y = down(act(up(x)))
    swiglu:          y = down(silu(gate(x)) * up(x))                         (Mixtral, Qwen3-MoE, DeepSeek-V3)
    geglu:           y = down(gelu(gate(x)) * up(x))
    swiglu_clamped:  g = min(gate(x), l), u = clamp(up(x), -l, l)
                     y = down((u + 1) * g * sigmoid(alpha * g))              (gpt-oss: l = 7, alpha = 1.702)

The E experts' weights are stacked (:class:`StackedLinear`): ``gate_up`` holds [E, 2I, C] ([gate | up]
rows per expert, the layout of transformers' MixtralExperts / Qwen3MoeExperts ``gate_up_proj``) and
``down`` [E, C, I] (their ``down_proj``), stored as [E * out, in] weights of an ``nn.Linear`` so that the
model's initialisation rules apply to them as to any projection (the down projection is a residual one).

Compute (``expert_compute``); every token goes to all k experts it is routed to (dropless):

    loop:    for each expert, gather its tokens and run it (the reference; E small products)
    grouped: the N*k slots sorted by expert, ONE grouped product per projection: torch._grouped_mm where
             the device, dtype and layout allow it (see :func:`grouped_mm_supported`), else ``padded``
    padded:  the sorted slots scattered into [E, max load, C] and one torch.bmm per projection (one host
             read of the largest load per forward)
    (compiled: ``grouped`` in bfloat16 where supported, else every expert on every token weighted by the
    routing weights, zero where not chosen: exact, one graph, E / k times the FLOPs)
    auto:    ``grouped`` where torch._grouped_mm runs; elsewhere ``padded``, except ``loop`` on CPUs
             below 32 experts (benchmarks/bench_moe.py: the padding costs more than the loop's overhead
             at 8 experts, less at 64; on accelerators the loop reads every expert's load on the host)

Shapes: N tokens, k experts per token, S = N * k routed slots, E experts, C hidden, I expert width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from composer.contract import (
    FFN,
    BuildContext,
    Cost,
    CostCall,
    linear_flops,
    mark_residual,
    option,
    param_count,
)

from .ffn import ACTIVATIONS, GatedConfig, GatedMLP

COMPUTE = ("auto", "grouped", "padded", "loop")
STACKABLE = ("mlp", "swiglu", "geglu", "swiglu_clamped")  # the expert kinds the stacked layout holds


# ----------------------------------------------------------------------------- the clamped SwiGLU
@dataclass
class ClampedSwiGLUConfig(GatedConfig):
    """Clamped SwiGLU: (clamp(up) + 1) * g * sigmoid(alpha g), g = min(gate, limit) (gpt-oss)."""

    bias: bool = option(True, help="biases on the projections")
    limit: float = option(7.0, help="clamp of the gate (above) and of up (both sides)", min=0.0)
    alpha: float = option(1.702, help="slope of the sigmoid gate", min=0.0)


def clamped_swiglu(gate: Tensor, up: Tensor, limit: float, alpha: float) -> Tensor:
    """gpt-oss's gated activation (GptOssExperts._apply_gate on de-interleaved gate / up)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@FFN.register("swiglu_clamped", config=ClampedSwiGLUConfig)
class ClampedSwiGLU(GatedMLP):
    """The dense clamped SwiGLU (gate and up fused [gate | up], as the other gated feed-forwards)."""

    def __init__(self, cfg: ClampedSwiGLUConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.limit, self.alpha = cfg.limit, cfg.alpha

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C]
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [B, T, I] each
        return self.dropout(self.down(clamped_swiglu(gate, up, self.limit, self.alpha)))


def expert_activation(cfg) -> Callable[[Tensor], Tensor]:
    """The expert's activation: [S, I] -> [S, I] (mlp) or [S, 2I] ([gate | up]) -> [S, I] (gated kinds)."""
    if cfg.type == "mlp":
        return ACTIVATIONS[cfg.activation]
    if cfg.type == "swiglu_clamped":
        limit, alpha = cfg.limit, cfg.alpha
        return lambda h: clamped_swiglu(*h.chunk(2, dim=-1), limit, alpha)
    act = F.silu if cfg.type == "swiglu" else (lambda g: F.gelu(g, approximate="tanh"))

    def gated(h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        return act(gate.contiguous()) * up  # a strided gate takes the activation's slow path (3x on CPUs)

    return gated


# ----------------------------------------------------------------------------- stacked weights
class StackedLinear(nn.Linear):
    """E linear maps ``in -> out`` in one [E * out, in] weight (and [E * out] bias); :meth:`stacked`
    views them as [E, out, in] / [E, out]. Called as an ``nn.Linear`` it would run every expert."""

    def __init__(self, experts: int, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, experts * out_features, bias=bias)
        self.experts, self.expert_out = experts, out_features

    def stacked(self, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
        w = self.weight.view(self.experts, self.expert_out, self.in_features).to(dtype)
        b = None if self.bias is None else self.bias.view(self.experts, self.expert_out).to(dtype)
        return w, b


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *sizes: int) -> bool:
    """Whether torch._grouped_mm multiplies rows of ``sizes`` (C, I) elements here: CPUs in float32 /
    bfloat16 / float16, CUDA in bfloat16 on compute capability 9.0 or newer; every row 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm") or device.type not in ("cpu", "cuda"):
        return False
    if device.type == "cpu":
        ok = dtype in (torch.float32, torch.bfloat16, torch.float16)
    else:
        ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return ok and all(n * dtype.itemsize % 16 == 0 for n in sizes)


@dataclass(frozen=True)
class Slots:
    """The routed slots sorted by expert, computed once per forward for every projection."""

    order: Tensor  # [S] slot (token-major: n * k + j) at each sorted position
    token: Tensor  # [S] the token of each sorted slot
    expert: Tensor  # [S] the expert of each sorted slot (non-decreasing)
    counts: Tensor  # [E] slots per expert (int64)
    offsets: Tensor  # [E] end of each expert's run (int32, for torch._grouped_mm)

    @classmethod
    def sort(cls, chosen: Tensor, counts: Tensor) -> Slots:  # chosen [N, k], counts [E]
        flat = chosen.reshape(-1)  # [S]
        order = flat.argsort(stable=True)
        return cls(order, order // chosen.shape[1], flat[order], counts, counts.cumsum(0).to(torch.int32))


def padded_linear(x: Tensor, w: Tensor, slots: Slots) -> Tensor:
    """x [S, in] (sorted) through w [E, out, in] by one bmm over [E, max load, in] (zero padding)."""
    cap = int(slots.counts.max())  # the one host read of this path
    starts = slots.offsets.long() - slots.counts  # [E]
    pos = torch.arange(x.shape[0], device=x.device) - starts[slots.expert]  # [S] row within its expert
    buf = x.new_zeros(w.shape[0], cap, x.shape[1]).index_put((slots.expert, pos), x)  # [E, cap, in]
    return torch.bmm(buf, w.transpose(1, 2))[slots.expert, pos]  # [S, out]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (the stacked products do not autocast by themselves)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ----------------------------------------------------------------------------- the experts
class GroupedExperts(nn.Module):
    """E experts of one kind, stacked: ``forward(x [N, C], chosen [N, k], weights [N, k], counts [E])``
    returns sum_j weights[n, j] * expert_{chosen[n, j]}(x[n]) [N, C]."""

    def __init__(self, cfg, num_experts: int, hidden_size: int, compute: str = "auto"):
        super().__init__()
        e, c, i = num_experts, hidden_size, cfg.intermediate_size
        self.kind, self.num_experts, self.intermediate_size, self.compute = cfg.type, e, i, compute
        self.gated = cfg.type != "mlp"
        name = "gate_up" if self.gated else "up"
        setattr(self, name, StackedLinear(e, c, 2 * i if self.gated else i, bias=cfg.bias))  # C -> [E, 2I | I]
        self.down = mark_residual(StackedLinear(e, i, c, bias=cfg.bias))  # I -> [E, C]
        self.act = expert_activation(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def first(self) -> StackedLinear:
        return self.gate_up if self.gated else self.up

    def forward(self, x: Tensor, chosen: Tensor, weights: Tensor, counts: Tensor) -> Tensor:
        kernel = self.kernel(x)
        if kernel == "loop":
            return self._loop(x, chosen, weights)
        if kernel == "dense":
            return self._dense(x, chosen, weights)
        dtype = compute_dtype(x)
        (w1, b1), (w2, b2) = self.first.stacked(dtype), self.down.stacked(dtype)
        slots = Slots.sort(chosen, counts)
        xs = x.to(dtype).index_select(0, slots.token)  # [S, C] slots in expert order
        w = weights.reshape(-1)[slots.order, None].to(dtype)  # [S, 1] each slot's routing weight
        h = self.act(self._linear(xs, w1, b1, slots, kernel)) * w  # [S, I] weighted before down (linear)
        y = self._linear(h, w2, None, slots, kernel)  # [S, C] = w * (h down)
        y = self.dropout(y if b2 is None else y + w * b2.index_select(0, slots.expert))
        if x.device.type == "cpu":  # one pass (index_add_ is sequential, so deterministic, on CPUs)
            return x.new_zeros(x.shape[0], y.shape[1], dtype=y.dtype).index_add_(0, slots.token, y)
        unsorted = y.new_zeros(y.shape).index_copy(0, slots.order, y)  # [S, C] token-major, no atomics
        return unsorted.view(*chosen.shape, -1).sum(dim=1)  # [N, C]

    def kernel(self, x: Tensor) -> str:
        """The path this call takes: loop, grouped (torch._grouped_mm), padded or (compiled) dense."""
        mode = self.compute
        dtype = compute_dtype(x)
        supported = grouped_mm_supported(x.device, dtype, self.down.expert_out, self.intermediate_size)
        if torch.compiler.is_compiling() and mode != "loop":  # no data-dependent shapes in one graph
            return "grouped" if supported and dtype == torch.bfloat16 else "dense"  # its fake kernel: bf16 only
        if mode == "auto":  # grouped wherever it runs (benchmarks/bench_moe.py)
            few = x.device.type == "cpu" and self.num_experts < 32  # CPUs: the loop wins at 8, padding at 64
            return "grouped" if supported else "loop" if few else "padded"
        if mode == "grouped" and not supported:
            return "padded"
        return mode

    @staticmethod
    def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], slots: Slots, kernel: str) -> Tensor:
        if kernel == "grouped":
            y = torch._grouped_mm(x, w.transpose(1, 2), offs=slots.offsets)  # [S, out]
        else:
            y = padded_linear(x, w, slots)
        return y if b is None else y + b.index_select(0, slots.expert)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` alone on x [M, C] -> [M, C] (tests compare the experts with it)."""
        return self._run(self._unstacked(), e, x)

    def _unstacked(self) -> list[list[Optional[Tensor]]]:
        """[w1, b1, w2, b2] per expert, split once (indexing the stack per expert would materialise a
        whole-stack gradient for every expert in backward: E^2 work)."""
        (w1, b1), (w2, b2) = self.first.stacked(self.first.weight.dtype), self.down.stacked(self.down.weight.dtype)
        parts = [t.unbind(0) if t is not None else [None] * self.num_experts for t in (w1, b1, w2, b2)]
        return [list(p) for p in zip(*parts, strict=True)]

    def _run(self, weights: list[list[Optional[Tensor]]], e: int, x: Tensor) -> Tensor:
        w1, b1, w2, b2 = weights[e]
        return self.dropout(F.linear(self.act(F.linear(x, w1, b1)), w2, b2))

    def _loop(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        experts = self._unstacked()
        for e in range(self.num_experts):
            token, slot = torch.where(chosen == e)  # the tokens routed to expert e
            if token.numel():
                y = self._run(experts, e, x[token]) * weights[token, slot, None].to(x.dtype)
                out.index_add_(0, token, y.to(out.dtype))
        return out

    def _dense(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """Every expert on every token, weighted by the routing weights (zero where not chosen): exact and
        free of data-dependent shapes, at E / k times the FLOPs (compiled graphs without torch._grouped_mm)."""
        dtype = compute_dtype(x)
        (w1, b1), (w2, b2) = self.first.stacked(dtype), self.down.stacked(dtype)
        x = x.to(dtype)
        h = torch.einsum("nc,eoc->eno", x, w1) + (0 if b1 is None else b1[:, None])  # [E, N, 2I | I]
        y = torch.einsum("eni,eci->enc", self.act(h), w2) + (0 if b2 is None else b2[:, None])  # [E, N, C]
        dense = weights.new_zeros(x.shape[0], self.num_experts).scatter(1, chosen, weights)  # [N, E]
        return torch.einsum("enc,ne->nc", self.dropout(y), dense.to(dtype))

    def cost(self, call: CostCall) -> tuple[Cost, Cost]:
        """(all experts, one expert): parameters, FLOPs per routed slot and the bytes a slot saves for
        backward (its gathered input, the projections' outputs and the activation's)."""
        one = linear_flops(self.first, self.down) / self.num_experts
        i, c = self.intermediate_size, self.down.expert_out
        saved = call.activation_bytes * (c + (4 * i if self.gated else 2 * i) + c)  # + the weighted output
        total = param_count(self)
        return Cost(total, 0.0), Cost(total // self.num_experts, one, saved)
