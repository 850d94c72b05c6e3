"""Self-attention: multi-head (mha), grouped-query (gqa), multi-query (mqa), sliding window.

One module serves all four; they differ in how many key/value heads they keep and how far back a
query may look. Queries, keys and values come from one fused projection; which kernel attends
(SDPA, FlexAttention for windows, the explicit softmax a logit soft-cap needs) is decided in one
place, ``components.kernels.choose``, once per forward for every layer of the same kind
(``prepare``), which also builds that kind's mask and plans its cache slots.

The knobs of 2024-2026 models, each an option of every attention type:

    qk_norm: per_head      q, k = rms(q_h), rms(k_h) over each head's D         (Qwen3, Gemma 3; `true`)
    qk_norm: across_heads  q, k = rms(q), rms(k) over H D / Hkv D, then heads  (OLMo 2)
    output_gate            y = attend(q, k, v) * sigmoid(g), g from the query projection's extra slice:
                           one per head (headwise) or per channel (elementwise, Qwen3-Next)
    sinks                  softmax over [scores, sink_h]: a learned per-head logit takes attention mass
                           and gives back nothing (gpt-oss; Xiao et al. 2023, "attention sinks")
    query_pre_attn_scalar  scores scaled by query_pre_attn_scalar ** -0.5 instead of D ** -0.5 (Gemma)

Both norms act before the rotary embedding. The fused projection's rows are, with a gate, the
query and gate of each head side by side, then keys, then values: [h0: q D, g G | h1: q D, g G |
... | k Hkv D | v Hkv D] with G = D (elementwise) or 1 (headwise), which is Qwen3-Next's ``q_proj``
layout ([H, 2D] chunked into query and gate) followed by ``k_proj`` and ``v_proj``.

Shapes: B batch, T new tokens, S keys, C hidden, H query heads, Hkv key/value heads, D head dim,
G gate width per head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from components.kernels import (  # noqa: F401  (build_mask, sdpa_*: also imported from here)
    KERNELS,
    AttentionSpec,
    CallFacts,
    Choice,
    attend,
    build_mask,
    choose,
    facts_of,
    flex_attention,
    make_mask,
    sdpa_folding_groups,
    sdpa_reads_grouped_heads,
    training_facts,
)
from components.kv_cache import KVCache, SlotWrite
from components.linear_cross_entropy import compute_dtype
from components.norm import RMSNorm, RMSNormConfig
from composer.contract import (
    ATTENTION,
    BuildContext,
    ComponentConfig,
    Cost,
    CostCall,
    LayerInputs,
    MixerBase,
    check_probability,
    inherit,
    linear_flops,
    mark_residual,
    option,
    param_count,
)

QK_NORMS = (False, True, "per_head", "across_heads")
GATES = ("none", "headwise", "elementwise")


@dataclass
class AttentionConfig(ComponentConfig):
    """Multi-head self-attention: every query head has its own key/value head."""

    num_heads: Optional[int] = option(None, help="query heads (null: model.num_heads)", min=1, bound="num_heads")
    head_dim: Optional[int] = option(
        None, help="dims per head (null: hidden_size / num_heads)", min=1, bound="head_dim"
    )
    bias: bool = option(False, help="bias on the query/key/value projection")
    out_bias: Optional[bool] = option(None, help="bias on the output projection (null: same as bias)")
    qk_norm: Union[bool, str] = option(
        False,
        help="RMS-normalize queries and keys before rotary: per_head (true) | across_heads (OLMo 2) | false",
        choices=QK_NORMS,
    )
    qk_norm_eps: float = option(1e-5, help="qk_norm: added to the mean square", min=0.0, max=1.0)
    qk_norm_zero_centred: bool = option(False, help="qk_norm: scale by (1 + weight), as Gemma 3's RMSNorm")
    output_gate: str = option(
        "none", help="sigmoid gate on the output: none | headwise | elementwise (Qwen3-Next)", choices=GATES
    )
    sinks: bool = option(False, help="a learned per-head sink logit joins the softmax denominator (gpt-oss)")
    softmax_scale: Optional[float] = option(None, help="score scale (null: 1/sqrt(head_dim); at most 1e4)", max=1e4)
    query_pre_attn_scalar: Optional[float] = option(
        None, help="score scale query_pre_attn_scalar**-0.5 (Gemma; not with softmax_scale)", max=1e8
    )
    logit_softcap: Optional[float] = option(
        None, help="cap scores with c*tanh(s/c) (Gemma 2: 50; at most 1e4)", max=1e4
    )
    dropout: Optional[float] = option(None, help="attention-probability dropout (null: model.dropout)")
    causal: bool = option(True, help="attend only to earlier tokens (false for encoders)")

    def kv_heads(self) -> int:
        return self.num_heads

    def qk_norm_placement(self) -> Optional[str]:
        """None, "per_head" or "across_heads" (``qk_norm: true`` is per head)."""
        return None if self.qk_norm is False else "per_head" if self.qk_norm is True else self.qk_norm

    def score_scale(self) -> Optional[float]:
        """The score scale (None: 1/sqrt(head_dim), the kernels' default)."""
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar**-0.5
        return self.softmax_scale

    def gate_width(self) -> int:
        """G: gate values per head taken from the query projection (0: no gate)."""
        return {"none": 0, "headwise": 1, "elementwise": self.head_dim}[self.output_gate]

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
        if self.query_pre_attn_scalar is not None and self.query_pre_attn_scalar <= 0:
            check.fail("query_pre_attn_scalar", f"{self.query_pre_attn_scalar} must be positive", "e.g. 256 (Gemma)")
        if self.query_pre_attn_scalar is not None and self.softmax_scale is not None:
            check.fail(
                "query_pre_attn_scalar",
                f"set together with softmax_scale ({self.softmax_scale}): both set the score scale",
                "set one of softmax_scale and query_pre_attn_scalar (scale = query_pre_attn_scalar**-0.5)",
            )
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

    num_kv_heads: Optional[int] = option(
        None, help="key/value heads, dividing num_heads (null: num_heads / 2)", min=1, bound="num_heads"
    )

    def kv_heads(self) -> int:
        return self.num_kv_heads

    def summary(self) -> str:
        return f"{self.type}(kv={self.num_kv_heads})"

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
    window: Optional[int] = option(
        None, help="tokens each query can see, itself included (null: 4096, at most max_position_embeddings)", min=1
    )
    kernel: str = option(
        "auto", help="auto (FlexAttention block mask on CUDA, else SDPA + mask) | sdpa | flex", choices=KERNELS
    )

    def window_size(self) -> Optional[int]:
        return self.window

    def summary(self) -> str:
        return f"{self.type}(kv={self.num_kv_heads}, w={self.window})"

    def resolve(self, model, check) -> None:
        inherit(self, "num_kv_heads", self.num_heads or model.num_heads)
        inherit(self, "window", min(4096, model.max_position_embeddings))
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


@dataclass(frozen=True)
class AttendPlan:
    """What ``prepare`` computed for one call, shared by the layers of one kind: the kernel choice,
    the mask it takes, and where the new tokens go in the caches (None without a cache)."""

    choice: Choice
    mask: Any = None
    write: Optional[SlotWrite] = None


@ATTENTION.register("mha", config=AttentionConfig)
@ATTENTION.register("mqa", config=MQAConfig)
@ATTENTION.register("gqa", config=GQAConfig)
@ATTENTION.register("sliding_window", config=SlidingWindowConfig)
class SelfAttention(MixerBase):
    supports_static_cache = True  # handles KVCache.make_static() caches (LayerInputs.cache_position)

    def __init__(self, cfg: AttentionConfig, ctx: BuildContext):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads(), cfg.head_dim
        self.window, self.causal = cfg.window_size(), cfg.causal
        kernel = getattr(cfg, "kernel", "sdpa") if flex_attention is not None else "sdpa"
        self.scale, self.softcap, self.dropout, self.kernel = cfg.score_scale(), cfg.logit_softcap, cfg.dropout, kernel
        self.spec = AttentionSpec(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.causal,
            self.window,
            self.softcap,
            self.dropout,
            kernel,
            self.scale,
            cfg.sinks,
        )
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        self.gate = cfg.gate_width()  # G
        self.qkv = nn.Linear(ctx.hidden_size, h * (d + self.gate) + 2 * hkv * d, bias=cfg.bias)  # C -> H(D+G) + 2Hkv D
        self.out = mark_residual(nn.Linear(h * d, ctx.hidden_size, bias=cfg.out_bias))  # H D -> C
        self.qk_norm = cfg.qk_norm_placement()
        self.q_norm = self.k_norm = None
        if self.qk_norm is not None:  # over D per head, or over H D and Hkv D before the head split
            q_width, k_width = (d, d) if self.qk_norm == "per_head" else (h * d, hkv * d)
            norm = RMSNormConfig(eps=cfg.qk_norm_eps, zero_centred=cfg.qk_norm_zero_centred)
            self.q_norm = RMSNorm(norm, dataclasses.replace(ctx, hidden_size=q_width))
            self.k_norm = RMSNorm(norm, dataclasses.replace(ctx, hidden_size=k_width))
        self.sinks = nn.Parameter(torch.zeros(h)) if cfg.sinks else None  # [H] sink logits

    def reset_parameters(self) -> None:
        """The sink logits start at 0 (the model initialises the projections and norms itself)."""
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device) -> KVCache:
        return KVCache(batch_size, self.num_kv_heads, self.head_dim, capacity, self.window, dtype=dtype, device=device)

    def forward(
        self, hidden: Tensor, inputs: LayerInputs, past_key_value: Optional[KVCache] = None, use_cache: bool = False
    ) -> tuple[Tensor, Optional[KVCache]]:
        b, t, _ = hidden.shape
        h, hkv, d, g = self.num_heads, self.num_kv_heads, self.head_dim, self.gate
        q, k, v = self.qkv(hidden).split([h * (d + g), hkv * d, hkv * d], dim=-1)
        gate = None
        if g:  # [B, T, H (D + G)] -> query [B, T, H, D], gate [B, T, H, G]
            q, gate = q.view(b, t, h, d + g).split([d, g], dim=-1)
        if self.qk_norm == "across_heads":  # over all heads' channels at once
            q, k = self.q_norm(q.reshape(b, t, h * d)), self.k_norm(k)
        q = q.reshape(b, t, h, d).transpose(1, 2)  # [B, H, T, D]
        k = k.view(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        if inputs.rotation is not None:
            q, k = inputs.rotation.apply(q, k)
        plan = inputs.prepared or self.prepare(inputs, past_key_value, inputs.position, dtype=q.dtype)
        if past_key_value is not None:
            k, v = past_key_value.write(k, v, plan.write)  # [B, Hkv, S, D]
        dropout = self.spec.dropout if self.training else 0.0
        y = attend(plan.choice, self.spec, q, k, v, plan.mask, dropout, self.sinks).transpose(1, 2)  # [B, T, H, D]
        if gate is not None:
            y = y * torch.sigmoid(gate)  # [B, T, H, D] * [B, T, H, G]
        return self.out(y.reshape(b, t, h * d)), past_key_value if use_cache else None

    # ------------------------------------------------------------------ once per forward, per kind
    def prepare_key(self) -> Hashable:
        return self.spec

    def prepare(
        self, inputs: LayerInputs, cache: Any, position: Any, dtype: Optional[torch.dtype] = None
    ) -> AttendPlan:
        """The kernel choice, its mask and the cache slots of this call (the model calls it once for all
        layers with this ``spec``; a direct call of the module prepares for itself)."""
        q_pos = inputs.query_slots()  # [T]
        write = (
            cache.plan(q_pos.shape[0], inputs.key_valid, inputs.cache_position) if isinstance(cache, KVCache) else None
        )
        k_pos, k_valid = (write.k_pos, write.k_valid) if write is not None else (q_pos, inputs.key_valid)
        if write is not None and inputs.key_valid is None and not write.static:
            k_valid = None  # the caller says nothing is padded
        bias = position.bias(q_pos, k_pos) if position is not None else None  # [H, T, S] or None
        facts = self.call_facts(inputs, write, k_valid is not None, bias is not None, dtype)
        choice = choose(self.spec, facts)
        return AttendPlan(choice, make_mask(choice, self.spec, q_pos, k_pos, k_valid, bias), write)

    def call_facts(
        self,
        inputs: LayerInputs,
        write: Optional[SlotWrite],
        padded: bool,
        biased: bool,
        dtype: Optional[torch.dtype] = None,
    ) -> CallFacts:
        """The facts of this call that decide the kernel (components.kernels.choose)."""
        dtype = dtype or compute_dtype(self.qkv.weight, inputs.position_ids.device.type)
        return facts_of(inputs, write, padded, biased, self.causal, self.training, dtype)

    # ------------------------------------------------------------------ cost
    def planned_choice(self, call: CostCall) -> Choice:
        """The path of the training step ``call`` describes (unpadded batches, no cache), from the same
        chooser the forward pass asks."""
        return choose(self.spec, training_facts(call, self.causal))

    def cost(self, call: CostCall) -> Cost:
        """Parameters, FLOPs, bytes saved for backward and KV-cache bytes of one token (training step)."""
        h, hkv, d, a = self.num_heads, self.num_kv_heads, self.head_dim, call.activation_bytes
        c = self.qkv.in_features
        context = min(call.seq_len, self.window) if self.window else call.seq_len
        choice = self.planned_choice(call)
        # qkv input, q/k/v (qkv output), SDPA output, out-projection input (a reshaped copy)
        saved = a * (c + (h + 2 * hkv) * d + 2 * h * d)
        if self.q_norm is not None:  # float32 copies of q and k inside the RMSNorms
            saved += 8 * (h + hkv) * d
        if self.gate:  # the gate's sigmoid and the ungated output
            saved += 2 * a * h * d
        materialised = set(choice.materialises)
        if "scores" in materialised:  # tanh and softmax outputs (float32), the probabilities cast back
            saved += (8 + (a if a != 4 else 0)) * h * context
        elif "probs" in materialised:  # math SDPA keeps the probabilities [H, T, S]
            saved += a * h * context
        if "repeated_kv" in materialised:
            saved += a * 2 * h * d
        if "folded_queries" in materialised:
            saved += a * h * d
        flops = linear_flops(self.qkv, self.out) + 4 * context * h * d + (2 * h * d if self.gate else 0)
        notes = (f"{choice.path}: {choice.fallback}",) if choice.fallback else ()
        return Cost(param_count(self), flops, saved, cache=2 * hkv * d * a, cache_tokens=self.window, notes=notes)
