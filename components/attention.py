"""Self-attention: multi-head (mha), grouped-query (gqa), multi-query (mqa), sliding window.

One module serves all four; they differ in how many key/value heads they keep and how far
back a query may look. Queries, keys and values come from one fused projection; the
attention itself is ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPUs; grouped key/value heads without copies wherever a fused kernel reads them, see
``sdpa_reads_grouped_heads``). Only a logit soft-cap, which SDPA cannot express, takes the
explicit softmax path. Sliding windows
over a whole sequence use FlexAttention with a block mask on CUDA (``kernel: auto``): blocks
outside the window are skipped instead of masked, so the cost grows with T x W, not T x T.

Shapes: B batch, T new tokens, S keys, C hidden, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.kv_cache import KVCache
from components.norm import RMSNorm, RMSNormConfig
from components.protocols import AttentionInputs, BuildContext, ComponentConfig
from composer.registry import ATTENTION
from composer.schema import check_probability, inherit, option

# enable_gqa (torch >= 2.5) lets SDPA read grouped key/value heads without copying them
SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
FLASH_MAX_HEAD_DIM = 256


def sdpa_reads_grouped_heads(device_type: str, dtype: torch.dtype, masked: bool, head_dim: int) -> bool:
    """Whether SDPA takes grouped key/value heads as they are (``enable_gqa``) and still runs a fused
    kernel. CPU: its flash kernel does, in every dtype, with or without a mask. CUDA: only the flash
    kernel does (float16/bfloat16, no mask, head dim <= 256); anywhere else SDPA would fall back, without
    a word, to the math kernel (a [B, H, T, S] score matrix, several times slower). There the caller
    folds each group's query heads into one head's rows when it has a mask (decoding, padding, windows
    without FlexAttention: K/V read once, by the memory-efficient kernel) and repeats K/V otherwise
    (float32 or head dim > 256 without a mask: the causal kernel needs query rows in order).
    Other devices: the same as CUDA's fallbacks (no claim about their kernels)."""
    if not SDPA_HAS_GQA:
        return False
    if device_type == "cpu":
        return True
    return (
        device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and not masked
        and head_dim <= FLASH_MAX_HEAD_DIM
    )


def sdpa_folding_groups(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float = 0.0, scale: Optional[float] = None
) -> Tensor:
    """SDPA over grouped K/V heads without copying them and without ``enable_gqa``: each group's query
    heads become one head's rows. q [B, H, T, D], k/v [B, Hkv, S, D], mask [B|1, 1|H, T, S] (bool or
    additive; required: the rows of a causal kernel would be out of order) -> [B, H, T, D]."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    groups = h // hkv
    folded = q.reshape(b, hkv, groups * t, d)  # query head j reads K/V head j // groups
    if mask.shape[1] == 1:  # [B|1, 1, T, S] -> [B|1, 1, G T, S]: row g T + i is query i's row
        mask = mask.repeat(1, 1, groups, 1)
    else:  # a per-head bias [B|1, H, T, S] -> [B|1, Hkv, G T, S]
        mask = mask.reshape(mask.shape[0], hkv, groups * t, mask.shape[-1])
    y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return y.reshape(b, h, t, d)


try:  # FlexAttention (torch >= 2.5)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None
KERNELS = ("auto", "sdpa", "flex")


@dataclass
class AttentionConfig(ComponentConfig):
    """Multi-head self-attention: every query head has its own key/value head."""

    num_heads: Optional[int] = option(None, help="query heads (null: model.num_heads)", min=1)
    head_dim: Optional[int] = option(None, help="dims per head (null: hidden_size / num_heads)", min=1)
    bias: bool = option(False, help="bias on the query/key/value projection")
    out_bias: Optional[bool] = option(None, help="bias on the output projection (null: same as bias)")
    qk_norm: bool = option(False, help="RMS-normalize queries and keys per head before attending")
    softmax_scale: Optional[float] = option(None, help="score scale (null: 1/sqrt(head_dim))")
    logit_softcap: Optional[float] = option(None, help="cap scores with c*tanh(s/c) (Gemma 2: 50)")
    dropout: Optional[float] = option(None, help="attention-probability dropout (null: model.dropout)")
    causal: bool = option(True, help="attend only to earlier tokens (false for encoders)")

    def kv_heads(self) -> int:
        return self.num_heads

    def window_size(self) -> Optional[int]:
        return None

    def resolve(self, model, check) -> None:
        inherit(self, "num_heads", model.num_heads)
        if self.head_dim is None:
            if model.hidden_size % self.num_heads == 0:
                inherit(self, "head_dim", model.hidden_size // self.num_heads)
            elif self.num_heads != model.num_heads:  # the model-level rule reports the other case
                check.fail(
                    "num_heads",
                    f"hidden_size {model.hidden_size} is not divisible by {self.num_heads}",
                    "pick a divisor of hidden_size or set head_dim",
                )
        inherit(self, "out_bias", self.bias)
        inherit(self, "dropout", model.dropout)
        check_probability(self, "dropout", check)
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            check.fail("softmax_scale", f"{self.softmax_scale} must be positive", "use null for 1/sqrt(head_dim)")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            check.fail("logit_softcap", f"{self.logit_softcap} must be positive", "use null for no cap, or e.g. 50.0")


@dataclass
class MQAConfig(AttentionConfig):
    """Multi-query attention: all query heads share one key/value head."""

    def kv_heads(self) -> int:
        return 1


@dataclass
class GQAConfig(AttentionConfig):
    """Grouped-query attention: groups of query heads share a key/value head."""

    num_kv_heads: Optional[int] = option(None, help="key/value heads, dividing num_heads (null: num_heads / 2)", min=1)

    def kv_heads(self) -> int:
        return self.num_kv_heads

    def resolve(self, model, check) -> None:
        super().resolve(model, check)
        if self.num_kv_heads is None:
            if self.num_heads % 2 and self.num_heads > 1:
                check.missing(
                    "num_kv_heads",
                    f"no default for an odd num_heads ({self.num_heads})",
                    "set num_kv_heads to a divisor of num_heads",
                )
                return
            inherit(self, "num_kv_heads", max(1, self.num_heads // 2))
        if self.num_heads % self.num_kv_heads:
            divisors = [d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]
            check.fail(
                "num_kv_heads",
                f"{self.num_kv_heads} does not divide num_heads={self.num_heads}",
                f"use one of {divisors}",
            )


@dataclass(kw_only=True)
class SlidingWindowConfig(GQAConfig):
    """Causal local attention: each query sees only the last `window` tokens (Mistral)."""

    num_kv_heads: Optional[int] = option(None, help="key/value heads, dividing num_heads (null: num_heads)", min=1)
    window: int = option(help="tokens each query can see, itself included", min=1)
    kernel: str = option(
        "auto", help="auto (FlexAttention block mask on CUDA, else SDPA + mask) | sdpa | flex", choices=KERNELS
    )

    def window_size(self) -> Optional[int]:
        return self.window

    def resolve(self, model, check) -> None:
        inherit(self, "num_kv_heads", self.num_heads or model.num_heads)
        super().resolve(model, check)
        if self.kernel == "flex" and flex_attention is None:
            check.fail(
                "kernel",
                "flex needs torch >= 2.5 (torch.nn.attention.flex_attention)",
                "use kernel: auto or sdpa, or upgrade torch",
            )
        if self.window is not None and self.window > model.max_position_embeddings:
            check.fail(
                "window",
                f"{self.window} exceeds max_position_embeddings={model.max_position_embeddings}",
                f"use a window between 1 and {model.max_position_embeddings}",
            )


def build_mask(
    q_pos: Tensor, k_pos: Tensor, key_valid: Optional[Tensor], causal: bool, window: Optional[int]
) -> Tensor:
    """Boolean mask [B or 1, 1, Tq, Tk], True where query i may attend to key j.

    q_pos [Tq] and k_pos [Tk] are cache slots (k_pos -1: empty slot); key_valid [B, Tk] marks
    real tokens. A padding query may always see itself, so no row is empty (SDPA would NaN).
    """
    dist = q_pos[:, None] - k_pos[None, :]  # [Tq, Tk]
    allowed = k_pos[None, :] >= 0
    if causal:
        allowed = allowed & (dist >= 0)
    if window is not None:
        allowed = allowed & (dist.abs() < window)
    allowed = allowed[None]  # [1, Tq, Tk]
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, :]) | (dist == 0)[None]
    return allowed[:, None]  # [B|1, 1, Tq, Tk]


@ATTENTION.register("mha", config=AttentionConfig)
@ATTENTION.register("mqa", config=MQAConfig)
@ATTENTION.register("gqa", config=GQAConfig)
@ATTENTION.register("sliding_window", config=SlidingWindowConfig)
class SelfAttention(nn.Module):
    supports_static_cache = True  # handles KVCache.make_static() caches (AttentionInputs.cache_position)

    def __init__(self, cfg: AttentionConfig, ctx: BuildContext):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads(), cfg.head_dim
        self.window, self.causal = cfg.window_size(), cfg.causal
        self.kernel = getattr(cfg, "kernel", "sdpa") if flex_attention is not None else "sdpa"
        self.scale, self.softcap, self.dropout = cfg.softmax_scale, cfg.logit_softcap, cfg.dropout
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        self.qkv = nn.Linear(ctx.hidden_size, (h + 2 * hkv) * d, bias=cfg.bias)  # C -> (H + 2Hkv) D
        self.out = nn.Linear(h * d, ctx.hidden_size, bias=cfg.out_bias)  # H D -> C
        self.out.residual_projection = True  # init scaled by 1/sqrt(2 * layers)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            head_ctx = BuildContext(d, ctx.vocab_size, ctx.max_position_embeddings, ctx.num_layers)
            self.q_norm = RMSNorm(RMSNormConfig(), head_ctx)
            self.k_norm = RMSNorm(RMSNormConfig(), head_ctx)
        # Shared with other layers and owned by the model: kept out of this module's state.
        self.__dict__["position"] = ctx.position

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device) -> KVCache:
        return KVCache(batch_size, self.num_kv_heads, self.head_dim, capacity, self.window, dtype=dtype, device=device)

    def forward(
        self, hidden: Tensor, inputs: AttentionInputs, past_key_value: Optional[KVCache] = None, use_cache: bool = False
    ) -> tuple[Tensor, Optional[KVCache]]:
        b, t, _ = hidden.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(hidden).split([h * d, hkv * d, hkv * d], dim=-1)
        q = q.view(b, t, h, d).transpose(1, 2)  # [B, H, T, D]
        k = k.view(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.position is not None:
            q, k = self.position.rotate(q, k, inputs)

        if past_key_value is not None and getattr(past_key_value, "static", False):
            return self._static(q, k, v, inputs, past_key_value, use_cache, b, t)
        q_pos = inputs.cached(
            ("q_slots", t), lambda: torch.arange(inputs.past_length, inputs.past_length + t, device=hidden.device)
        )  # [T]
        if past_key_value is not None:
            new_valid = None if inputs.key_valid is None else inputs.key_valid[:, -t:]
            k, v, k_pos, k_valid = past_key_value.update(k, v, new_valid)  # [B, Hkv, S, D], [S], [B, S]
            if inputs.key_valid is None:
                k_valid = None  # the caller says nothing is padded
        else:
            k_pos, k_valid = q_pos, inputs.key_valid

        bias = None if self.position is None else self.position.bias(q_pos, k_pos)  # [H, T, S] or None
        plain = k_valid is None and bias is None
        # no mask needed: a full causal square, or one new token that may see the whole cache
        square = plain and past_key_value is None and self.window is None
        decode = (
            plain
            and past_key_value is not None
            and t == 1
            and not past_key_value.rolling
            and (self.window is None or self.window >= k.shape[2])
        )
        if plain and past_key_value is None and self._use_flex(q):  # a window over the whole sequence
            y = self._flex(q, k, v, inputs, t)  # [B, H, T, D]
            return self.out(y.transpose(1, 2).reshape(b, t, h * d)), past_key_value if use_cache else None
        mask = None
        if not (square or decode):
            rolling = past_key_value is not None and past_key_value.rolling
            key = ("mask", self.causal, self.window, t, k.shape[2], rolling, past_key_value is None)
            mask = inputs.cached(key, lambda: build_mask(q_pos, k_pos, k_valid, self.causal, self.window))
            if bias is not None:
                mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))  # [B|1, H, T, S]
        is_causal = square and self.causal
        y = self._attend(q, k, v, mask, is_causal=is_causal)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(b, t, h * d)
        return self.out(y), past_key_value if use_cache else None

    def _use_flex(self, q: Tensor) -> bool:
        """FlexAttention for this window: on CUDA (auto / flex); ``flex`` also on other devices where torch
        runs it correctly (eager, no gradients). Never with a soft-cap or attention dropout."""
        if self.window is None or self.kernel == "sdpa" or self.softcap is not None:
            return False
        if self.training and self.dropout > 0:
            return False
        if q.is_cuda:
            return True
        return self.kernel == "flex" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, t: int) -> Tensor:
        window, causal = self.window, self.causal

        def allowed(b, h, q_idx, kv_idx):  # the same rule as build_mask
            dist = q_idx - kv_idx
            near = (dist < window) & (dist > -window)
            return near & (dist >= 0) if causal else near

        key = ("flex", causal, window, t, q.device)
        block = inputs.cached(key, lambda: create_block_mask(allowed, None, None, t, t, device=q.device))
        attend = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        return attend(q, k, v, block_mask=block, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)

    def _static(
        self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, cache: KVCache, use_cache: bool, b: int, t: int
    ) -> tuple[Tensor, Optional[KVCache]]:
        """Attend over a static cache's whole buffer: the mask comes from its slot positions."""
        q_pos = inputs.cache_position  # [T]
        k, v, k_pos, k_valid = cache.update(k, v, inputs.key_valid, q_pos)  # [B, Hkv, S, D], [S], [B, S]
        key = ("static_mask", self.causal, self.window, t, k.shape[2], cache.rolling)
        mask = inputs.cached(key, lambda: build_mask(q_pos, k_pos, k_valid, self.causal, self.window))
        bias = None if self.position is None else self.position.bias(q_pos, k_pos)  # [H, T, S] or None
        if bias is not None:
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))  # [B, H, T, S]
        y = self._attend(q, k, v, mask, is_causal=False)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.out(y), cache if use_cache else None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool) -> Tensor:
        p = self.dropout if self.training else 0.0
        groups = self.num_heads // self.num_kv_heads
        if self.softcap is not None:  # explicit softmax: SDPA has no score modifier
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            scale = self.scale if self.scale is not None else self.head_dim**-0.5
            scores = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, T, S]
            scores = self.softcap * torch.tanh(scores / self.softcap)
            if is_causal:
                t, s = scores.shape[-2:]
                mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            probs = F.dropout(scores.softmax(-1), p, self.training).type_as(v)
            return probs @ v
        kwargs = {}
        if groups > 1:
            if sdpa_reads_grouped_heads(q.device.type, q.dtype, mask is not None, self.head_dim):
                kwargs["enable_gqa"] = True
            elif mask is not None:  # no K/V copy: see sdpa_folding_groups
                return sdpa_folding_groups(q, k, v, mask, dropout_p=p, scale=self.scale)
            else:  # [B, Hkv, S, D] -> [B, H, S, D]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal, scale=self.scale, **kwargs
        )


_FLEX = []


def _compiled_flex():
    """flex_attention under torch.compile (its fused kernel); compiled once per process."""
    if not _FLEX:
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]
