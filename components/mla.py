"""Multi-head latent attention (MLA): DeepSeek-V2 (arXiv 2405.04434) and DeepSeek-V3 (arXiv 2412.19437).

Keys and values of every head are decompressed from ONE small latent per token, and one rotary key
is shared by all heads, so a decoding cache keeps L + R numbers per token instead of H (N + R + V):

    c_q  = RMSNorm(x W_qa)                       [Lq]   q_a_proj, q_a_layernorm   (q_lora_rank Lq)
    q_h  = c_q W_qb,h = [q_nope,h (N), q_rope,h (R)]     q_b_proj                  (or x W_q: q_proj)
    c    = RMSNorm(x W_kva[:L])                  [L]    kv_a_proj_with_mqa, kv_a_layernorm (kv_lora_rank L)
    k_R  = RoPE(x W_kva[L:])                     [R]    the decoupled rotary key, shared by the heads
    k_h  = [c W_uk,h (N), k_R],  v_h = c W_uv,h (V)     kv_b_proj = [W_uk,h; W_uv,h] per head
    y    = concat_h softmax(q_h k_h^T * scale) v_h W_o  o_proj

with q_rope,h = RoPE(q_rope,h), N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim and
scale = (N + R)^-0.5, times mscale^2 under YaRN rope scaling with ``mscale_all_dim`` (mscale =
0.1 mscale_all_dim ln(factor) + 1, as transformers' DeepSeek-V3 computes it; the cos/sin temperature
is the position encoding's own).

Two forms of the attention, equal in exact arithmetic, both run by the kernel chooser
(``components.kernels.choose`` / ``attend``, like every other attention):

- decompressed: k_h, v_h of every cached token are built from the latents (kv_b_proj), then H-head
  attention with query/key dims N + R and value dims V (the narrower zero-padded to the wider, as
  transformers does for flash attention: fused kernels take one head dim; the padding is dropped);
- absorbed: W_uk,h folds into the query (q_nope,h W_uk,h^T: [L]) and W_uv,h applies after the
  attention, so attention runs over the cached latents themselves as multi-query attention with
  one key head [c, k_R] of L + R dims whose first L dims are also the value (the output's last R
  dims are dropped): the cache is read as it is, nothing is decompressed.

Each call takes the cheaper of the two for its shapes (``form: auto``; ``prepare``, once per forward
for every MLA layer of the same geometry): decoding (few new tokens over a long cache) absorbs,
training and prefill decompress.

Rotary layout: DeepSeek lays the rope dims out in interleaved pairs (x0, x1), (x2, x3), ...
(``rope_interleave``, true for its checkpoints), while composer's rotary tables turn half-split pairs
(i, i + R/2). With ``rope_interleave`` the rope parts of q and k are de-interleaved (even dims, then
odd dims) and then turned by the layer's own position encoding (``LayerInputs.rotation``; YaRN and
every other rope scaling come with it): the same rotation in a permuted basis, applied alike to q
and k, so the scores are unchanged; it is exactly what transformers' apply_rotary_pos_emb_interleave
computes. The cache keeps the rotated key in that layout. The position encoding is built for
``head_dim`` = R (as transformers' DeepseekV3Config.head_dim), so its tables are R wide.

The cache (``components.mla_cache.LatentCache``) holds per token the normalised latent c and the
rotated k_R, [B, 1, S, L + R]: (L + R) x dtype bytes per token and layer (``cost``).

Shapes: B batch, T new tokens, S keys, C hidden, H heads, L kv_lora_rank, R rope dims, N no-rope
dims, V value dims.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.kernels import AttentionSpec, CallFacts, Choice, attend, choose, facts_of, make_mask, training_facts
from components.kv_cache import SlotWrite
from components.linear_cross_entropy import compute_dtype
from components.mla_cache import LatentCache
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

FORMS = ("auto", "decompressed", "absorbed")


def yarn_mscale(position: Any) -> float:
    """DeepSeek's softmax-scale factor under YaRN: (0.1 mscale_all_dim ln(factor) + 1)^2 when the
    position encoding is rope with yarn scaling, a factor above 1 and a non-zero mscale_all_dim
    (transformers' yarn_apply_mscale); 1 otherwise. ``position``: a position config."""
    if getattr(position, "type", None) != "rope" or getattr(position, "scaling", "none") != "yarn":
        return 1.0
    factor, m = getattr(position, "scaling_factor", 1.0), getattr(position, "mscale_all_dim", None)
    if not m or factor <= 1:
        return 1.0
    return (0.1 * m * math.log(factor) + 1.0) ** 2


@dataclass
class MLAConfig(ComponentConfig):
    """Multi-head latent attention (DeepSeek-V2/V3): the cache keeps a latent and a shared rotary key."""

    num_heads: Optional[int] = option(None, help="query heads (null: model.num_heads)", min=1, bound="num_heads")
    q_lora_rank: Optional[int] = option(
        None, help="rank of the query compression (null: a plain q_proj; DeepSeek-V3: 1536)", min=1, bound="hidden_size"
    )
    kv_lora_rank: int = option(
        512, help="rank of the key/value latent, what the cache stores (DeepSeek-V3: 512)", min=1, bound="hidden_size"
    )
    qk_nope_head_dim: int = option(128, help="query/key dims per head without rotation", min=1, bound="head_dim")
    qk_rope_head_dim: int = option(
        64, help="query dims per head and shared key dims the position encoding rotates", min=1, bound="head_dim"
    )
    v_head_dim: int = option(128, help="value dims per head", min=1, bound="head_dim")
    bias: bool = option(False, help="bias on q_a_proj, kv_a_proj_with_mqa and o_proj (DeepSeek's attention_bias)")
    norm_eps: float = option(1e-6, help="eps of the latent RMSNorms (q_a_layernorm, kv_a_layernorm)", min=0.0)
    rope_interleave: bool = option(True, help="rope dims in interleaved pairs (DeepSeek checkpoints); false: halves")
    softmax_scale: Optional[float] = option(
        None, help="score scale (null: (qk_nope + qk_rope)^-0.5, times YaRN's mscale^2; at most 1e4)", max=1e4
    )
    logit_softcap: Optional[float] = option(None, help="cap scores with c*tanh(s/c) (at most 1e4)", max=1e4)
    dropout: Optional[float] = option(None, help="attention-probability dropout (null: model.dropout)")
    causal: bool = option(True, help="attend only to earlier tokens (false for encoders)")
    form: str = option(
        "auto", help="auto (the cheaper per call: absorbed when decoding) | decompressed | absorbed", choices=FORMS
    )

    @property
    def head_dim(self) -> int:
        """The dims the layer's position encoding rotates (transformers' DeepseekV3Config.head_dim)."""
        return self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def summary(self) -> str:
        q = f", q={self.q_lora_rank}" if self.q_lora_rank else ""
        return f"{self.type}(kv={self.kv_lora_rank}{q}, rope={self.qk_rope_head_dim})"

    def resolve(self, model, check) -> None:
        inherit(self, "num_heads", model.num_heads)
        inherit(self, "dropout", model.dropout)
        check_probability(self, "dropout", check)
        for name, fix in (("softmax_scale", "use null for the derived scale"), ("logit_softcap", "use null")):
            value = getattr(self, name)
            if value is not None and value <= 0 and name not in self.__dict__.get("_inherited", ()):
                check.fail(name, f"{value} must be positive", fix)
        if getattr(model.position, "type", None) == "rope" and self.qk_rope_head_dim % 2:
            check.fail(
                "qk_rope_head_dim",
                f"{self.qk_rope_head_dim} is odd: rope turns pairs of dims",
                "use an even qk_rope_head_dim (DeepSeek: 64)",
            )
        # from the model's position encoding; a per-layer position override does not re-derive it (set it there)
        inherit(self, "softmax_scale", self.qk_head_dim**-0.5 * yarn_mscale(model.position))


@dataclass(frozen=True)
class LatentPlan:
    """What ``prepare`` computed for one call, shared by the MLA layers of one geometry: the form
    (decompressed | absorbed), the kernel choice and its spec, the mask and the cache write."""

    form: str
    spec: AttentionSpec
    choice: Choice
    mask: Any = None
    write: Optional[SlotWrite] = None


@ATTENTION.register("mla", config=MLAConfig)
class LatentAttention(MixerBase):
    supports_static_cache = True  # a LatentCache is a KVCache: tensor slots (LayerInputs.cache_position)

    def __init__(self, cfg: MLAConfig, ctx: BuildContext):
        super().__init__()
        c, h = ctx.hidden_size, cfg.num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, 1, cfg.qk_rope_head_dim  # what the rotation turns
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.interleaved, self.causal, self.form, self.dropout = cfg.rope_interleave, cfg.causal, cfg.form, cfg.dropout
        qk = self.nope + self.rope
        common = dict(causal=cfg.causal, softcap=cfg.logit_softcap, dropout=cfg.dropout, kernel="sdpa")
        # decompressed: H heads of D = max(N + R, V) dims (the narrower zero-padded); absorbed: one key
        # head [c, k_R] of L + R dims
        self.spec = AttentionSpec(h, h, max(qk, self.v_dim), scale=cfg.softmax_scale, **common)
        self.absorbed_spec = AttentionSpec(h, 1, cfg.kv_lora_rank + self.rope, scale=cfg.softmax_scale, **common)
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(c, h * qk, bias=False)  # C -> H (N + R)
        else:
            self.q_a_proj = nn.Linear(c, cfg.q_lora_rank, bias=cfg.bias)  # C -> Lq
            self.q_a_layernorm = RMSNorm(RMSNormConfig(eps=cfg.norm_eps), _sized(ctx, cfg.q_lora_rank))
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)  # Lq -> H (N + R)
        self.kv_a_proj_with_mqa = nn.Linear(c, cfg.kv_lora_rank + self.rope, bias=cfg.bias)  # C -> L + R
        self.kv_a_layernorm = RMSNorm(RMSNormConfig(eps=cfg.norm_eps), _sized(ctx, cfg.kv_lora_rank))
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (self.nope + self.v_dim), bias=False)  # L -> H (N + V)
        self.o_proj = mark_residual(nn.Linear(h * self.v_dim, c, bias=cfg.bias))  # H V -> C

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device) -> LatentCache:
        return LatentCache(batch_size, self.kv_lora_rank, self.rope, capacity, dtype=dtype, device=device)

    # ------------------------------------------------------------------ forward
    def forward(
        self, hidden: Tensor, inputs: LayerInputs, past_key_value: Optional[LatentCache] = None, use_cache: bool = False
    ) -> tuple[Tensor, Optional[LatentCache]]:
        b, t, _ = hidden.shape
        h, n, r, lat = self.num_heads, self.nope, self.rope, self.kv_lora_rank
        q = self.q_proj(hidden) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(b, t, h, n + r).transpose(1, 2)  # [B, H, T, N + R]
        q_nope, q_rope = q.split([n, r], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([lat, r], dim=-1)  # [B, T, L], [B, T, R]
        latent = self.kv_a_layernorm(latent)[:, None]  # [B, 1, T, L]
        q_rope, k_rope = self.rotate(q_rope, k_rope[:, None], inputs)  # [B, H, T, R], [B, 1, T, R]
        joint = torch.cat([latent, k_rope], dim=-1)  # [B, 1, T, L + R]
        plan = inputs.prepared or self.prepare(inputs, past_key_value, inputs.position, dtype=q.dtype)
        if past_key_value is not None:
            joint = past_key_value.write_latent(joint, plan.write)  # [B, 1, S, L + R]
        dropout = plan.spec.dropout if self.training else 0.0
        if plan.form == "absorbed":
            y = self._absorbed(plan, q_nope, q_rope, joint, dropout)
        else:
            y = self._decompressed(plan, q_nope, q_rope, joint, dropout)
        y = y.transpose(1, 2).reshape(b, t, h * self.v_dim)  # [B, T, H V]
        return self.o_proj(y), past_key_value if use_cache else None

    def rotate(self, q_rope: Tensor, k_rope: Tensor, inputs: LayerInputs) -> tuple[Tensor, Tensor]:
        """The rope parts turned by the layer's rotary tables (de-interleaved first, see the module
        docstring); unchanged without a rotation (learned, ALiBi or no position encoding)."""
        if inputs.rotation is None:
            return q_rope, k_rope
        if self.interleaved:  # (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...)
            q_rope = torch.cat([q_rope[..., 0::2], q_rope[..., 1::2]], dim=-1)
            k_rope = torch.cat([k_rope[..., 0::2], k_rope[..., 1::2]], dim=-1)
        return inputs.rotation.apply(q_rope, k_rope)

    def _decompressed(self, plan: LatentPlan, q_nope: Tensor, q_rope: Tensor, joint: Tensor, dropout: float) -> Tensor:
        """Every head's keys and values from the latents, then H-head attention -> [B, H, T, V]."""
        b, s, h, n = joint.shape[0], joint.shape[2], self.num_heads, self.nope
        latent, k_rope = joint.split([self.kv_lora_rank, self.rope], dim=-1)  # [B, 1, S, L], [B, 1, S, R]
        kv = self.kv_b_proj(latent[:, 0]).view(b, s, h, n + self.v_dim).transpose(1, 2)  # [B, H, S, N + V]
        k_nope, v = kv.split([n, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(b, h, s, self.rope)], dim=-1)  # [B, H, S, N + R]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B, H, T, N + R]
        width = plan.spec.head_dim  # D = max(N + R, V): one head dim, as fused kernels need
        if n + self.rope < width:  # zeros add nothing to the scores
            q, k = F.pad(q, (0, width - n - self.rope)), F.pad(k, (0, width - n - self.rope))
        if self.v_dim < width:  # zero values: the output's padding, dropped
            v = F.pad(v, (0, width - self.v_dim))
        return attend(plan.choice, plan.spec, q, k, v, plan.mask, dropout)[..., : self.v_dim]  # [B, H, T, V]

    def _absorbed(self, plan: LatentPlan, q_nope: Tensor, q_rope: Tensor, joint: Tensor, dropout: float) -> Tensor:
        """Attention over the latents (one key head [c, k_R], values c), W_uk before and W_uv after
        -> [B, H, T, V]."""
        h, n, lat = self.num_heads, self.nope, self.kv_lora_rank
        w = self.kv_b_proj.weight.to(q_nope.dtype).view(h, n + self.v_dim, lat)  # per head [W_uk; W_uv]: [dims, L]
        q_latent = torch.einsum("bhtn,hnl->bhtl", q_nope, w[:, :n])  # [B, H, T, L]
        q = torch.cat([q_latent, q_rope], dim=-1)  # [B, H, T, L + R]
        y = attend(plan.choice, plan.spec, q, joint, joint, plan.mask, dropout)[..., :lat]  # [B, H, T, L]
        return torch.einsum("bhtl,hvl->bhtv", y, w[:, n:])  # [B, H, T, V]

    # ------------------------------------------------------------------ once per forward, per kind
    def prepare_key(self) -> Hashable:
        return ("mla", self.spec, self.absorbed_spec, self.form, self.nope, self.rope, self.v_dim, self.kv_lora_rank)

    def prepare(
        self, inputs: LayerInputs, cache: Any, position: Any, dtype: Optional[torch.dtype] = None
    ) -> LatentPlan:
        """The form, kernel choice, mask and cache slots of this call (the model calls it once for
        all MLA layers of this geometry; a direct call of the module prepares for itself)."""
        q_pos = inputs.query_slots()  # [T]
        write = (
            cache.plan(q_pos.shape[0], inputs.key_valid, inputs.cache_position)
            if isinstance(cache, LatentCache)
            else None
        )
        k_pos, k_valid = (write.k_pos, write.k_valid) if write is not None else (q_pos, inputs.key_valid)
        if write is not None and inputs.key_valid is None and not write.static:
            k_valid = None  # the caller says nothing is padded
        bias = position.bias(q_pos, k_pos) if position is not None else None  # [H, T, S] or None
        form = self.form_for(q_pos.shape[0], k_pos.shape[0], write is not None)
        spec = self.absorbed_spec if form == "absorbed" else self.spec
        facts = self.call_facts(inputs, write, k_valid is not None, bias is not None, dtype)
        choice = choose(spec, facts)
        return LatentPlan(form, spec, choice, make_mask(choice, spec, q_pos, k_pos, k_valid, bias), write)

    def form_for(self, queries: int, keys: int, cached: bool) -> str:
        """The form of a call with ``queries`` new tokens over ``keys`` keys: the one asked for, or
        (auto) the one with fewer multiply-adds -- decompressing S latents costs S L H (N + V) on top
        of T S H (N + R + V) of attention; absorbing costs T H L (N + V) of projections and
        T S H 2 (L + R) of attention. Without a cache the call's own tokens are its keys: decompressed."""
        if self.form != "auto":
            return self.form
        if not cached:
            return "decompressed"
        h, n, r, v, lat = self.num_heads, self.nope, self.rope, self.v_dim, self.kv_lora_rank
        decompressed = keys * lat * h * (n + v) + queries * keys * h * (n + r + v)
        absorbed = queries * h * lat * (n + v) + queries * keys * h * 2 * (lat + r)
        return "absorbed" if absorbed < decompressed else "decompressed"

    def call_facts(
        self,
        inputs: LayerInputs,
        write: Optional[SlotWrite],
        padded: bool,
        biased: bool,
        dtype: Optional[torch.dtype] = None,
    ) -> CallFacts:
        """The facts of this call that decide the kernel (components.kernels.choose)."""
        dtype = dtype or compute_dtype(self.kv_b_proj.weight, inputs.position_ids.device.type)
        return facts_of(inputs, write, padded, biased, self.causal, self.training, dtype)

    # ------------------------------------------------------------------ cost
    def planned_choice(self, call: CostCall) -> Choice:
        """The path of the training step ``call`` describes (decompressed, unpadded, no cache), from the
        same chooser the forward pass asks."""
        return choose(self.spec, training_facts(call, self.causal))

    def cost(self, call: CostCall) -> Cost:
        """Parameters, FLOPs, bytes saved for backward (the decompressed training step) and cache bytes
        of one token: the latent and the rope key, (L + R) x the activation bytes."""
        h, n, r, v, lat, a = self.num_heads, self.nope, self.rope, self.v_dim, self.kv_lora_rank, call.activation_bytes
        c, qk, context = self.kv_a_proj_with_mqa.in_features, n + r, call.seq_len
        choice = self.planned_choice(call)
        d = self.spec.head_dim  # the padded head width the kernel sees
        # the input; the kv latent's projection output (the norm's input), the norm's rsqrt and float32
        # output; kv_b_proj's input (the normalised latent, a view of the joint [c, k_R]); the kernel's
        # q, k, v (padded to D), output and log-sum-exp; the out-projection's input (a copy)
        saved = a * c + 2 * a * (lat + r) + 4 * lat + 4 + 4 * a * h * d + 4 * h + a * h * v
        if self.q_lora_rank is not None:  # the query latent: its norm's input, rsqrt, output; q_b_proj's input
            saved += 2 * a * self.q_lora_rank + 4 * self.q_lora_rank + 4
        materialised = set(choice.materialises)
        if "scores" in materialised:  # tanh and softmax outputs (float32), the probabilities cast back
            saved += (8 + (a if a != 4 else 0)) * h * context
        elif "probs" in materialised:  # math SDPA keeps the probabilities [H, T, S]
            saved += a * h * context
        modules = (self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj_with_mqa, self.kv_b_proj, self.o_proj)
        flops = linear_flops(*modules) + 2 * context * h * (qk + v)
        full = h * (qk + v)  # what full per-head K and V would keep per token
        notes = (f"mla: the cache keeps {lat + r} values per token and layer (full per-head K and V: {full:,})",)
        if choice.fallback:
            notes += (f"{choice.path}: {choice.fallback}",)
        return Cost(param_count(self), flops, saved, cache=(lat + r) * a, notes=notes)


def _sized(ctx: BuildContext, size: int) -> BuildContext:
    """``ctx`` with hidden_size ``size`` (for the latent norms)."""
    return dataclasses.replace(ctx, hidden_size=size)
