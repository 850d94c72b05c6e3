"""Position encodings: learned absolute, rotary (RoPE, with linear / Llama 3 / YaRN scaling and
partial rotation), ALiBi, and none.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"), as transformers'
``_compute_yarn_parameters``: with r = rotary dims, L = original_max_position_embeddings, s = the
factor, each frequency f_i = theta^(-2i/r) blends its extrapolated (f_i) and interpolated (f_i / s)
values by a linear ramp over the dims whose number of rotations over L lies between beta_fast and
beta_slow; cos and sin are then multiplied by the attention temperature factor
0.1 ln(s) + 1 (or mscale / mscale_all_dim's ratio of that form, or attention_factor when given).

A position encoding acts at up to three places, and implements all three (identity where it
does not act; ``acts_on`` says where it does): ``embed`` adds a vector to the token embeddings
(learned), ``rotation`` gives this forward's rotary tables, which turn queries and keys by their
position (RoPE; the model computes them once per forward for every layer that shares the encoding),
``bias`` adds a distance penalty to attention scores (ALiBi). Only ``learned`` is model-wide; the
others may differ per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from composer.contract import (
    POSITION,
    BuildContext,
    ComponentConfig,
    Cost,
    CostCall,
    LayerInputs,
    PositionBase,
    option,
    param_count,
)


class _NoPosition(PositionBase):
    """Shared identity behaviour: no embedding, no rotation, no bias."""

    acts_on: ClassVar[frozenset[str]] = frozenset()

    def embed(self, position_ids: Tensor) -> Optional[Tensor]:
        return None

    def rotation(self, position_ids: Tensor) -> Optional[Rotary]:
        return None

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Optional[Tensor]:
        return None

    def rotate(self, q: Tensor, k: Tensor, inputs: LayerInputs) -> tuple[Tensor, Tensor]:
        """q, k turned by ``inputs.position_ids`` (a convenience: the model passes rotations itself)."""
        rotation = self.rotation(inputs.position_ids)
        return (q, k) if rotation is None else rotation.apply(q, k)

    def cost(self, call: CostCall, mixer: Optional[nn.Module] = None) -> Cost:
        """The model-wide part (``mixer`` None: parameters) or one layer's part (nothing saved here)."""
        return Cost(params=param_count(self)) if mixer is None else Cost()


@dataclass(frozen=True)
class Rotary:
    """One forward's rotary tables: cos, sin [B|1, 1, T, R] (float32) for the first R dims of each head."""

    cos: Tensor
    sin: Tensor
    rotary_dim: int

    def apply(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:  # q [B, H, T, D], k [B, Hkv, T, D]
        return self._turn(q), self._turn(k)

    def _turn(self, x: Tensor) -> Tensor:
        r = self.rotary_dim
        rot, keep = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
        rot = (rot.float() * self.cos + _rotate_half(rot.float()) * self.sin).type_as(x)
        return rot if keep is None else torch.cat((rot, keep), dim=-1)


# ----------------------------------------------------------------------------- none
@dataclass
class NoPositionConfig(ComponentConfig):
    """No position information (NoPE): order comes from the causal mask alone."""


@POSITION.register("none", config=NoPositionConfig)
class NoPosition(_NoPosition):
    def __init__(self, cfg: NoPositionConfig, ctx: BuildContext):
        super().__init__()


# ----------------------------------------------------------------------------- learned
@dataclass
class LearnedPositionConfig(ComponentConfig):
    """Learned absolute position embeddings added to the token embeddings (GPT-2, BERT)."""

    model_wide_only: ClassVar[bool] = True


@POSITION.register("learned", config=LearnedPositionConfig)
class LearnedPosition(_NoPosition):
    acts_on: ClassVar[frozenset[str]] = frozenset({"embed"})

    def __init__(self, cfg: LearnedPositionConfig, ctx: BuildContext):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ctx.max_position_embeddings, ctx.hidden_size))  # [P, C]

    def embed(self, position_ids: Tensor) -> Tensor:  # [B, T] -> [B, T, C]
        return self.weight[position_ids]


# ----------------------------------------------------------------------------- rope
@dataclass
class RopeConfig(ComponentConfig):
    """Rotary position embeddings: rotate query/key channel pairs by position-dependent angles."""

    theta: float = option(10000.0, help="base of the rotation frequencies", min=1.0)
    rotary_fraction: float = option(1.0, help="fraction of each head's dims rotated (GPT-NeoX: 0.25)")
    scaling: str = option(
        "none", help="context extension: none | linear | llama3 | yarn", choices=("none", "linear", "llama3", "yarn")
    )
    scaling_factor: float = option(1.0, help="positions are stretched by this factor", min=1.0, max=1e6)
    low_freq_factor: float = option(1.0, help="llama3 scaling: low-frequency boundary", min=0.0)
    high_freq_factor: float = option(4.0, help="llama3 scaling: high-frequency boundary", min=0.0)
    original_max_position_embeddings: int = option(
        8192, help="llama3 / yarn scaling: pre-training context", min=1, bound="max_position_embeddings"
    )
    beta_fast: float = option(32.0, help="yarn: rotations above which a dim extrapolates", min=0.0, max=1e6)
    beta_slow: float = option(1.0, help="yarn: rotations below which a dim interpolates", min=0.0, max=1e6)
    mscale: Optional[float] = option(None, help="yarn: temperature numerator's mscale (with mscale_all_dim)", max=1e3)
    mscale_all_dim: Optional[float] = option(None, help="yarn: temperature denominator's mscale", max=1e3)
    attention_factor: Optional[float] = option(
        None, help="yarn: cos/sin multiplier (null: from scaling_factor and mscale)", min=0.0, max=1e3
    )
    truncate: bool = option(True, help="yarn: round the ramp's ends to whole dims (transformers' default)")

    def resolve(self, model, check) -> None:
        head_dim = getattr(model.attention, "head_dim", None) or model.head_dim
        if not 0.0 < self.rotary_fraction <= 1.0:
            check.fail("rotary_fraction", f"{self.rotary_fraction} is outside (0, 1]", "use e.g. 1.0 or 0.25")
        elif int(head_dim * self.rotary_fraction) % 2:
            check.fail(
                "rotary_fraction",
                f"rotates {int(head_dim * self.rotary_fraction)} dims of head_dim {head_dim}, which is odd",
                "rope needs an even number of rotated dims: change hidden_size / num_heads or rotary_fraction",
            )
        if self.scaling == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            check.fail(
                "high_freq_factor",
                f"{self.high_freq_factor} <= low_freq_factor {self.low_freq_factor}",
                "llama3 scaling needs high_freq_factor > low_freq_factor (Llama 3.1: 4.0 and 1.0)",
            )
        if self.scaling == "yarn" and self.beta_fast <= self.beta_slow:
            check.fail(
                "beta_fast",
                f"{self.beta_fast} <= beta_slow {self.beta_slow}",
                "yarn needs beta_fast > beta_slow (the paper's: 32 and 1)",
            )

    def temperature(self) -> float:
        """The factor cos and sin are multiplied by (yarn's attention temperature; 1 otherwise)."""
        if self.scaling != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return mscale(self.scaling_factor, self.mscale) / mscale(self.scaling_factor, self.mscale_all_dim)
        return mscale(self.scaling_factor)

    def check_layer(self, layer) -> Optional[tuple[str, str]]:
        """(problem, fix) if ``layer``'s own attention (a per-layer override may change head_dim)
        would have rope rotate an odd number of dims; None if it fits."""
        head_dim = getattr(layer.attention, "head_dim", None) or 0
        rotated = int(head_dim * self.rotary_fraction)
        if rotated % 2:
            return (
                f"head_dim {head_dim} with rope rotary_fraction {self.rotary_fraction} rotates {rotated} dims, "
                "which is odd",
                "rope needs an even number of rotated dims: change num_heads / head_dim here "
                "or the rope's rotary_fraction",
            )
        return None


def _rotate_half(x: Tensor) -> Tensor:  # [..., D] -> [..., D]: (x1, x2) -> (-x2, x1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _yarn(inv: Tensor, cfg: RopeConfig, r: int) -> Tensor:
    """YaRN's blend of extrapolated (inv) and interpolated (inv / factor) frequencies [R/2]."""

    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in L
        old = cfg.original_max_position_embeddings
        return r * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = dim_of(cfg.beta_fast), dim_of(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = ((torch.arange(r // 2, dtype=inv.dtype, device=inv.device) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp  # 1: keep the frequency, 0: divide it by the factor
    return inv / cfg.scaling_factor * (1 - extrapolated) + inv * extrapolated


@POSITION.register("rope", config=RopeConfig)
class Rope(_NoPosition):
    acts_on: ClassVar[frozenset[str]] = frozenset({"rotate"})

    def __init__(self, cfg: RopeConfig, ctx: BuildContext):
        super().__init__()
        self.cfg = cfg
        self.rotary_dim = int(ctx.head_dim * cfg.rotary_fraction)  # R, even
        self.temperature = cfg.temperature()  # cos and sin are multiplied by it (yarn)
        self.register_buffer("inv_freq", torch.empty(self.rotary_dim // 2), persistent=False)  # [R/2]
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.inv_freq.device.type == "meta":  # filled when the model is materialised
            return
        cfg, r = self.cfg, self.rotary_dim
        inv = 1.0 / (cfg.theta ** (torch.arange(0, r, 2, dtype=torch.float64, device=self.inv_freq.device) / r))
        if cfg.scaling == "linear":
            inv = inv / cfg.scaling_factor
        elif cfg.scaling == "llama3":
            old = cfg.original_max_position_embeddings
            low_wavelen, high_wavelen = old / cfg.low_freq_factor, old / cfg.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / cfg.scaling_factor, inv)
            smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
            smoothed = (1 - smooth) * scaled / cfg.scaling_factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = torch.where(medium, smoothed, scaled)
        elif cfg.scaling == "yarn":
            inv = _yarn(inv, cfg, r)
        self.inv_freq.copy_(inv.float())

    def _apply(self, fn, recurse=True):
        """Casting the model (``model.to(torch.bfloat16)``) keeps the frequencies float32: rounded
        to bf16 they turn position 4000 by a third of a radian."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = torch.empty(self.inv_freq.shape, dtype=torch.float32, device=self.inv_freq.device)
            self.reset_buffers()
        return self

    def cos_sin(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """[B, T] positions -> cos, sin of shape [B, 1, T, R] (float32)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, R]
        if self.temperature != 1.0:
            return emb.cos() * self.temperature, emb.sin() * self.temperature
        return emb.cos(), emb.sin()

    def rotation(self, position_ids: Tensor) -> Rotary:
        return Rotary(*self.cos_sin(position_ids), self.rotary_dim)

    def cost(self, call: CostCall, mixer: Optional[nn.Module] = None) -> Cost:
        if mixer is None:
            return Cost()
        # float32 copies of q and k, and the rotated q and k, kept for backward
        heads = mixer.num_heads + mixer.num_kv_heads
        return Cost(saved=(4 + call.activation_bytes) * heads * mixer.head_dim)


# ----------------------------------------------------------------------------- alibi
@dataclass
class AlibiConfig(ComponentConfig):
    """ALiBi: no embeddings; each head penalises attention linearly in the query-key distance."""

    max_bias: float = option(8.0, help="slopes are 2^(-max_bias * h / H) for head h", min=0.0)


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> Tensor:
    """Per-head slopes [H] (Press et al.; the closest-power-of-two rule for other H)."""
    n = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-max_bias / n)
    slopes = [base ** (i + 1) for i in range(n)]
    if n < num_heads:
        extra = 2.0 ** (-max_bias / (2 * n))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - n)]
    return torch.tensor(slopes, dtype=torch.float32)


@POSITION.register("alibi", config=AlibiConfig)
class Alibi(_NoPosition):
    acts_on: ClassVar[frozenset[str]] = frozenset({"bias"})

    def __init__(self, cfg: AlibiConfig, ctx: BuildContext):
        super().__init__()
        self.num_heads, self.max_bias = ctx.num_heads, cfg.max_bias
        self.register_buffer("slopes", torch.empty(ctx.num_heads), persistent=False)  # [H]
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.slopes.device.type != "meta":
            self.slopes.copy_(alibi_slopes(self.num_heads, self.max_bias))

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:  # [Tq], [Tk] -> [H, Tq, Tk]
        distance = (q_pos[:, None] - k_pos[None, :]).abs().float()  # [Tq, Tk]
        return -self.slopes[:, None, None] * distance
