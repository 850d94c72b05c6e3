"""What the linear-time sequence mixers share: a short causal convolution, gated linear recurrences in
a chunk-parallel and a recurrent form, the fixed-size cache that carries their state, and the choice
of kernel.

Every mixer here (``mamba2``, ``gated_deltanet``, ``gla``) keeps a state S [K, V] per head that it
decays, writes and reads once per token:

    gated linear attention (GLA, Mamba-2's SSD):   S_t = diag(a_t) S_{t-1} + k_t v_t^T         o_t = S_t^T q_t
    gated delta rule (Gated DeltaNet):             S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T

with a_t = exp(g_t) (g_t <= 0: a log decay, per head or per key channel) and b_t the delta rule's write
strength. The RECURRENT form runs these equations one token at a time (decoding); the CHUNK form
(training, prefill) cuts the sequence into chunks of L tokens, computes each chunk's outputs in
parallel from the state at its start plus an L x L decayed "attention" inside it, and carries the state
from chunk to chunk: O(T L) work, linear in T (Yang et al. 2023, "Gated Linear Attention Transformers
with Hardware-Efficient Training"; Dao & Gu 2024, "Transformers are SSMs"; Yang et al. 2024, "Gated
Delta Networks"). Decays inside a chunk are differences of cumulative log decays, exponentiated only
where they are <= 0, so nothing overflows whatever the decay. The two forms are the same function
(tests/test_mixers.py checks it to float32 precision).

Padding: a left-padded row must give what its prompt alone gives. The mixers zero the padded tokens'
inputs before the convolution and set their decay to 1 (g = 0) and their write to 0, so the state
passes pads untouched.

Cache: :class:`RecurrentCache` holds the convolution's last K-1 inputs [B, D, K-1] and the state
[B, H, K, V] (float32), a fixed size whatever the length; it may be static (written in place) for a
compiled decode step.

Shapes: B batch, T tokens, L chunk, N chunks, H heads, K key (state) dim, V value dim, D conv channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.kernels import FLA_FIX, SCAN_FORMS, SCAN_KERNELS, Choice, ScanSpec, choose, fla_available, scan_facts
from composer.contract import LayerInputs, MixerBase, option


# ----------------------------------------------------------------------------- the kernel options
def form_option() -> Any:
    """Every mixer's ``form`` option: which of the two forms runs (auto: by the call's length)."""
    return option("auto", help="auto (recurrent for one token, else chunks) | chunk | recurrent", choices=SCAN_FORMS)


def kernel_option() -> Any:
    """Every mixer's ``kernel`` option: the preference the kernel chooser (components.kernels) reads."""
    return option("auto", help="auto (fla on CUDA when installed) | torch | fla", choices=SCAN_KERNELS)


def check_kernel(cfg: Any, check: Any) -> None:
    """``kernel: fla`` needs flash-linear-attention installed (named with the extra that brings it)."""
    if cfg.kernel == "fla" and not fla_available():
        check.fail("kernel", "fla needs flash-linear-attention installed", FLA_FIX)


# ----------------------------------------------------------------------------- short convolution
class ShortConv(nn.Module):
    """Causal depthwise convolution over time with SiLU: y_t = silu(sum_j w_j x_{t-K+1+j} + b).
    ``weight`` [D, 1, K] is nn.Conv1d's layout (so checkpoints' ``conv1d.weight`` load as they are)."""

    def __init__(self, channels: int, kernel_size: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))  # [D, 1, K]
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None  # [D]

    @property
    def tail(self) -> int:
        return self.weight.shape[-1] - 1  # inputs the cache keeps: K - 1

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[-1])  # nn.Conv1d's default (fan-in K)
        self.weight.uniform_(-bound, bound, generator=generator)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x [B, T, D], state [B, D, K-1] (the previous inputs; None: zeros) -> (y [B, T, D], new state)."""
        xt = x.transpose(1, 2)  # [B, D, T]
        k = self.tail
        xt = F.pad(xt, (k, 0)) if state is None else torch.cat([state.to(xt.dtype), xt], dim=-1)  # [B, D, K-1+T]
        y = F.conv1d(xt, self.weight, self.bias, groups=xt.shape[1])  # [B, D, T]
        return F.silu(y).transpose(1, 2), xt[:, :, xt.shape[-1] - k :]


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU gate, over groups of ``group_size`` channels (float32 statistics):

    norm_before_gate=False (Mamba-2):           w * rms(y * silu(z))
    norm_before_gate=True (Gated DeltaNet, GLA): w * rms(y) * silu(z)        (no gate when z is None)
    """

    def __init__(self, size: int, group_size: int, eps: float, norm_before_gate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))  # [size]
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: Tensor, z: Optional[Tensor] = None) -> Tensor:  # [..., size], [..., size]
        dtype = y.dtype
        y = y.float()
        gate = F.silu(z.float()) if z is not None else None
        if gate is not None and not self.norm_before_gate:
            y = y * gate
        groups = y.unflatten(-1, (-1, self.group_size))
        y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        y = self.weight * y.to(dtype)
        if gate is not None and self.norm_before_gate:
            y = y * gate
        return y.to(dtype)


# ----------------------------------------------------------------------------- gated linear attention
def _chunks(x: Tensor, chunk: int) -> Tensor:
    """[B, H, T, ...] zero-padded to N * L tokens -> [B, H, N, L, ...]."""
    pad = -x.shape[2] % chunk
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.unflatten(2, (-1, chunk))


def chunk_gated_linear(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, chunk: int, state: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, a chunk of L tokens at a time.

    q, k [B, H, T, K], v [B, H, T, V], g [B, H, T] (one decay per head) or [B, H, T, K] (per key
    channel), state [B, H, K, V] or None -> (o [B, H, T, V], final state [B, H, K, V]), float32."""
    t = q.shape[2]
    q, k, v, g = (_chunks(x.float(), chunk) for x in (q, k, v, g))  # [B, H, N, L, ...]
    cum = g.cumsum(3)  # log decay from the chunk start through each token
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # [L, L] j <= i
    if g.dim() == 5:  # per key channel: the decays differ per channel, [B, H, N, L, L, K]
        diff = (cum[..., :, None, :] - cum[..., None, :, :]).masked_fill(~causal[:, :, None], -math.inf)
        scores = (q[..., :, None, :] * k[..., None, :, :] * diff.exp()).sum(-1)  # [B, H, N, L, L]
        last = cum[..., -1:, :]  # [B, H, N, 1, K]
        q_in, k_out, carry = q * cum.exp(), k * (last - cum).exp(), last.transpose(-1, -2).exp()  # carry [.., K, 1]
    else:
        diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -math.inf)  # [B, H, N, L, L]
        scores = (q @ k.transpose(-1, -2)) * diff.exp()
        last = cum[..., -1:]  # [B, H, N, 1]
        q_in, k_out, carry = q * cum.exp()[..., None], k * (last - cum).exp()[..., None], last.exp()[..., None]
    inner = scores @ v  # [B, H, N, L, V] within each chunk
    s = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]) if state is None else state.float()
    out = []
    # the state from chunk to chunk; unbind, not x[:, :, n]: each indexing's backward would write a
    # gradient the size of the whole sequence (O(T^2 / L) in all)
    for inner_n, q_n, k_n, v_n, carry_n in zip(*(x.unbind(2) for x in (inner, q_in, k_out, v, carry)), strict=True):
        out.append(inner_n + q_n @ s)
        s = carry_n * s + k_n.transpose(-1, -2) @ v_n
    return torch.stack(out, 2).flatten(2, 3)[:, :, :t], s


def recurrent_gated_linear(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """The same recurrence one token at a time (chunk_gated_linear's arguments but the chunk)."""
    q, k, v, g = (x.float() for x in (q, k, v, g))
    s = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]) if state is None else state.float()
    out = []
    for q_i, k_i, v_i, g_i in zip(*(x.unbind(2) for x in (q, k, v, g)), strict=True):
        a = g_i.exp()  # [B, H] or [B, H, K]
        a = a[..., None, None] if a.dim() == 2 else a[..., None]
        s = a * s + k_i[..., :, None] * v_i[..., None, :]  # [B, H, K, V]
        out.append((q_i[..., :, None] * s).sum(-2))  # [B, H, V]
    return torch.stack(out, 2), s


# ----------------------------------------------------------------------------- gated delta rule
def chunk_gated_delta(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, chunk: int, state: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t, by chunks.

    Inside a chunk (start state S0, G_i the cumulative log decay) the values the delta rule writes,
    u_j = b_j (v_j - k_j^T exp(g_j) S_{j-1}), solve the unit lower-triangular system
    (I + A) U = bV - (b exp(G) K) S0 with A_jm = b_j exp(G_j - G_m) k_j.k_m (m < j): U = U0 - W S0.
    Then o_i = exp(G_i) q_i^T S0 + sum_{j<=i} exp(G_i - G_j) (q_i.k_j) u_j and
    S_L = exp(G_L) S0 + sum_j exp(G_L - G_j) k_j u_j^T (the WY / UT form of Yang et al. 2024).

    q, k [B, H, T, K], v [B, H, T, V], g, beta [B, H, T], state [B, H, K, V] or None -> (o, state)."""
    t, size = q.shape[2], chunk
    q, k, v = (_chunks(x.float(), chunk) for x in (q, k, v))  # [B, H, N, L, .]
    g, beta = (_chunks(x.float(), chunk) for x in (g, beta))  # [B, H, N, L]
    cum = g.cumsum(-1)
    ones = torch.ones(size, size, dtype=torch.bool, device=q.device)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~ones.tril(), -math.inf).exp()  # [.., L, L]
    kb = k * beta[..., None]
    system = ((kb @ k.transpose(-1, -2)) * decay).masked_fill(~ones.tril(-1), 0.0)  # A, strictly lower
    system = system + torch.eye(size, dtype=q.dtype, device=q.device)
    u0 = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * cum.exp()[..., None], upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay  # [B, H, N, L, L], j <= i
    last = cum[..., -1:]
    q_in, k_out, carry = q * cum.exp()[..., None], k * (last - cum).exp()[..., None], last.exp()[..., None]
    s = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]) if state is None else state.float()
    out = []
    parts = (x.unbind(2) for x in (u0, w, q_in, scores, k_out, carry))  # unbind: see chunk_gated_linear
    for u0_n, w_n, q_n, scores_n, k_n, carry_n in zip(*parts, strict=True):
        u = u0_n - w_n @ s  # [B, H, L, V]
        out.append(q_n @ s + scores_n @ u)
        s = carry_n * s + k_n.transpose(-1, -2) @ u
    return torch.stack(out, 2).flatten(2, 3)[:, :, :t], s


def recurrent_gated_delta(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """The gated delta rule one token at a time (chunk_gated_delta's arguments but the chunk)."""
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    s = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]) if state is None else state.float()
    out = []
    for q_i, k_i, v_i, g_i, beta_i in zip(*(x.unbind(2) for x in (q, k, v, g, beta)), strict=True):
        s = s * g_i.exp()[..., None, None]
        read = (s * k_i[..., :, None]).sum(-2)  # [B, H, V]: what the state predicts for k_t
        s = s + k_i[..., :, None] * ((v_i - read) * beta_i[..., None])[..., None, :]
        out.append((s * q_i[..., :, None]).sum(-2))
    return torch.stack(out, 2), s


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim (flash-linear-attention's and transformers' form)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------- the fla kernels
def fla_ops() -> Any:
    """flash-linear-attention's ops module (only imported when chosen)."""
    import fla.ops  # late: optional CUDA kernels (pip install flash-linear-attention), imported when chosen

    return fla.ops


# ----------------------------------------------------------------------------- the cache
class RecurrentCache:
    """One mixer layer's decoding state: the convolution's last K-1 inputs ``conv`` [B, D, K-1] (the
    model's dtype; None without a convolution) and the recurrent state ``state`` [B, H, K, V] (float32).
    Its size does not depend on the number of tokens (``capacity`` is not needed). ``length`` counts
    tokens written (padding included), as a KV cache does. A static cache (``make_static``) is updated
    in place, so a compiled decode step sees the same buffers each step."""

    def __init__(
        self,
        batch_size: int,
        conv_channels: int,
        conv_tail: int,
        state_shape: tuple[int, int, int],
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        self.conv = (
            torch.zeros(batch_size, conv_channels, conv_tail, dtype=dtype, device=device) if conv_channels else None
        )
        self.state = torch.zeros(batch_size, *state_shape, dtype=torch.float32, device=device)
        self.length = 0
        self.static = False

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def make_static(self) -> None:
        self.static = True
        for t in (self.conv, self.state):
            if t is not None:
                _mark_static(t)

    def reset(self) -> None:
        """Forget every token (a static cache is reused between generate calls)."""
        if self.conv is not None:
            self.conv.zero_()
        self.state.zero_()
        self.length = 0

    def select(self, index: Tensor) -> None:
        """Keep only the batch rows ``index`` (beam pruning, dropping finished prompts)."""
        self.conv = self.conv[index] if self.conv is not None else None
        self.state = self.state[index]

    def write(self, conv: Optional[Tensor], state: Tensor, tokens: int) -> None:
        """Store the new convolution tail and state after ``tokens`` tokens (in place when static)."""
        if self.static:
            if conv is not None:
                self.conv.copy_(conv)
            self.state.copy_(state)
            return
        self.conv = conv.to(self.conv.dtype).clone() if conv is not None else None  # not a view of the input
        self.state = state.float()
        self.length += tokens


def _mark_static(t: Tensor) -> None:
    import torch._dynamo  # late: 2 s to import, only static caches need it

    try:
        torch._dynamo.mark_static_address(t, guard=False)
    except TypeError:  # torch < 2.5: no guard option
        torch._dynamo.mark_static_address(t)


# ----------------------------------------------------------------------------- the shared mixer base
class RecurrentMixer(MixerBase):
    """What the three mixers share: no per-forward preparation, a fixed-size cache that may be static,
    the padding of the new tokens, reading and writing the cache. Mixers see no positions: a rotary
    encoding's tables arrive in ``LayerInputs.rotation`` and are not used. Each mixer defines
    ``state_shape() -> (H, K, V)``, the shape of its recurrent state per row."""

    state_shape: Callable[[], tuple[int, int, int]]  # defined by each mixer (annotated only)

    supports_static_cache = True  # the state is written in place; positions are not read
    form: str = "auto"
    kernel: str = "auto"
    chunk_size: int = 64

    def conv_channels(self) -> int:
        return self.conv1d.weight.shape[0] if getattr(self, "conv1d", None) is not None else 0

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device: Any) -> RecurrentCache:
        conv = getattr(self, "conv1d", None)
        tail = conv.tail if conv is not None else 0
        return RecurrentCache(batch_size, self.conv_channels(), tail, self.state_shape(), dtype, device)

    @staticmethod
    def new_valid(inputs: LayerInputs, t: int) -> Optional[Tensor]:
        """[B, T] bool, False at the new tokens that are padding (None: none are)."""
        return None if inputs.key_valid is None else inputs.key_valid[:, -t:]

    def choice(self, x: Tensor) -> Choice:
        """The kernel and form of this call on x [B, T, C], from the kernel chooser attention uses too."""
        return choose(ScanSpec(self.kernel, self.form), scan_facts(x, self.training))

    @staticmethod
    def read(cache: Optional[RecurrentCache]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return (cache.conv, cache.state) if cache is not None else (None, None)

    @staticmethod
    def store(cache: Optional[RecurrentCache], conv: Optional[Tensor], state: Tensor, tokens: int) -> None:
        if cache is not None:
            cache.write(conv, state, tokens)


def masked(x: Tensor, valid: Optional[Tensor]) -> Tensor:
    """x [B, T, ...] with the padded tokens (valid [B, T] False) set to zero."""
    if valid is None:
        return x
    return x * valid.view(*valid.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def scan_flops(heads: int, k: int, v: int, chunk: int, per_channel: bool = False) -> float:
    """Forward FLOPs per token of the chunk form: the L x L scores and their use (2 L K + 2 L V), the
    read of the chunk-start state and the state update (4 K V); per-channel decays form the scores
    elementwise (3 L K)."""
    scores = 3 * chunk * k if per_channel else 2 * chunk * k
    return float(heads * (scores + 2 * chunk * v + 4 * k * v))


def dt_bias_init(n: int, dt_min: float, dt_max: float, floor: float) -> Tensor:
    """softplus^-1 of time steps log-spaced in [dt_min, dt_max] (Mamba's range; a grid instead of
    random draws, so initialisation needs no generator)."""
    dt = torch.exp(torch.linspace(math.log(dt_min), math.log(dt_max), n)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))
