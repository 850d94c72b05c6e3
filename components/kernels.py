"""The sequence mixers' kernels, and the one place that chooses among them.

    choice = choose(spec, facts)       # what the mixer runs, and what that path materialises
    y = attend(choice, spec, q, k, v, mask)

``spec`` says what a module is (an :class:`AttentionSpec` for softmax attention, a :class:`ScanSpec` for a
linear-recurrence mixer), ``facts`` what one call is (:class:`CallFacts`: device, dtype, gradients, mask,
cache, lengths); the same :func:`choose` answers both, so "which kernel, and why not the preferred one"
has one home and one vocabulary (``Choice.kernel``, ``Choice.fallback``).

Softmax attention has three kernels, each saying what it supports:

- ``flex``: FlexAttention with a block mask (torch >= 2.5), for a sliding window over a whole sequence:
  blocks outside the window are skipped, so the cost grows with T x W. On CUDA (compiled, its fused
  kernel) when ``kernel`` is auto or flex; elsewhere only when asked for (``kernel: flex``) and where
  torch runs it correctly (eager, no gradients). Not with a soft-cap, attention dropout while training,
  padding, a position bias or a cache.
- ``sdpa``: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels), everything else
  except a soft-cap. Grouped K/V heads are read as they are where a fused kernel does so
  (``enable_gqa``, see :func:`sdpa_reads_grouped_heads`); otherwise each group's query heads are folded
  into one head's rows (:func:`sdpa_folding_groups`: K/V read once, no copy) where the call has a mask or
  needs none (a decoding query sees every key: MLA's absorbed decode reads its one latent head so), and
  K/V are repeated only for SDPA's causal kernel, whose rows must stay in order.
- ``explicit``: scores, soft-cap and softmax written out (float32 scores, [B, H, T, S]): the only
  kernel that takes a logit soft-cap, and the one that takes attention sinks with gradients.

Attention sinks (a per-head logit s_h in the softmax's denominator, gpt-oss) keep a fused kernel where
one returns its log-sum-exp L = log sum_j exp(score_j): the fused output times
exp(L) / (exp(L) + exp(s_h)) = sigmoid(L - s_h) is the output with the sink (``Choice.lse``). On the CPU
that is the flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) without gradients: its
backward passes no gradient from L to q and k, so a training step takes the explicit softmax; on other
devices no such kernel is checked yet (explicit). The Choice's ``fallback`` says which case it is.

A linear-recurrence mixer (``mamba2``, ``gated_deltanet``, ``gla``) has two: ``torch`` (the chunked and
recurrent PyTorch forms, every device) and ``fla`` (flash-linear-attention's Triton kernels: CUDA, the
package installed, not while torch.compile traces); its ``Choice.form`` is ``chunk`` or ``recurrent``
(auto: recurrent for one new token).

The planner (``composer-plan``) asks the same :func:`choose` for the training step it plans, so the
memory it counts is the memory of the path the attention takes (a test sweeps the facts and checks the
two agree).

Shapes: B batch, T new tokens, S keys, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # FlexAttention (torch >= 2.5)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None

# enable_gqa (torch >= 2.5) lets SDPA read grouped key/value heads without copying them
SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
FLASH_MAX_HEAD_DIM = 256
KERNELS = ("auto", "sdpa", "flex")  # the attention's `kernel` option
SCAN_KERNELS = ("auto", "torch", "fla")  # a linear-recurrence mixer's `kernel` option
SCAN_FORMS = ("auto", "chunk", "recurrent")  # and its `form` option
MASK_KINDS = ("none", "causal", "padding", "bias")  # what the call's keys need (CallFacts.mask)
CACHE_KINDS = ("none", "dynamic", "rolling", "static")


@dataclass(frozen=True)
class AttentionSpec:
    """The static facts of an attention module (its config)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool = True
    window: Optional[int] = None
    softcap: Optional[float] = None
    dropout: float = 0.0
    kernel: str = "auto"  # auto | sdpa | flex (the user's preference)
    scale: Optional[float] = None
    sinks: bool = False  # a learned per-head sink logit joins the softmax denominator

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class ScanSpec:
    """The static facts of a linear-recurrence mixer: the user's kernel and form preferences."""

    kernel: str = "auto"  # auto | torch | fla
    form: str = "auto"  # auto | chunk | recurrent


@dataclass(frozen=True)
class CallFacts:
    """The facts of one call that decide the path.

    mask: none (full attention, no padding), causal (no padding), padding (some keys are padding) or
    bias (a position encoding adds a bias to the scores); cache: none, dynamic (grows), rolling (a
    window's ring buffer) or static (fixed buffers at tensor positions)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    grad: bool = False
    training: bool = False
    mask: str = "causal"
    cache: str = "none"
    queries: int = 1  # T
    keys: int = 1  # S
    compiling: bool = False
    fused: bool = True  # planner only: False models SDPA's math kernel (it stores the probabilities)


def facts_of(
    inputs: Any, write: Any, padded: bool, biased: bool, causal: bool, training: bool, dtype: torch.dtype
) -> CallFacts:
    """The facts of one forward call: ``inputs`` its LayerInputs, ``write`` where its tokens go in the cache
    (a SlotWrite; None without a cache), whether some keys are padding and whether a position bias joins
    the scores; ``causal`` and ``training`` are the attention's."""
    mask = "bias" if biased else "padding" if padded else "causal" if causal else "none"
    kind = "none" if write is None else "static" if write.static else "rolling" if write.rolling else "dynamic"
    keys = write.k_pos.shape[0] if write is not None else inputs.new_tokens
    device = inputs.position_ids.device.type
    return CallFacts(
        device,
        dtype,
        torch.is_grad_enabled(),
        training,
        mask,
        kind,
        inputs.new_tokens,
        keys,
        torch.compiler.is_compiling(),
    )


def training_facts(call: Any, causal: bool) -> CallFacts:
    """The facts of the training step a plan's ``call`` (a CostCall) describes: unpadded batches, no
    cache, gradients on; ``causal`` is the attention's."""
    mask = "bias" if call.position_bias else "causal" if causal else "none"
    t = call.seq_len
    return CallFacts(call.device, call.dtype, True, True, mask, "none", t, t, fused=call.fused_attention)


@dataclass(frozen=True)
class Choice:
    """What the attention runs: ``kernel`` (sdpa | flex | explicit), how grouped K/V heads are read
    (``grouping``: none | native | folded | repeated), the mask it takes (none | causal | boolean |
    additive | block), whether FlexAttention runs compiled, what the path materialises beyond q, k, v
    (``materialises``: scores, probs, repeated_kv, folded_queries) and why a preferred kernel was not
    taken (``fallback``); ``lse``: the kernel returns its log-sum-exp and the sinks rescale its output."""

    kernel: str
    grouping: str = "none"
    mask: str = "none"
    compiled: bool = False
    materialises: tuple[str, ...] = ()
    fallback: str = ""
    lse: bool = False
    form: str = ""  # a scan's: chunk | recurrent

    @property
    def path(self) -> str:
        """One name per path: explicit, sdpa, sdpa_gqa, sdpa_folded, sdpa_repeated, flex, flex_compiled, and a
        scan's torch_chunk, torch_recurrent, fla_chunk, fla_recurrent."""
        if self.form:
            return f"{self.kernel}_{self.form}"
        if self.kernel == "flex":
            return "flex_compiled" if self.compiled else "flex"
        if self.kernel == "sdpa" and self.grouping != "none":
            return {"native": "sdpa_gqa", "folded": "sdpa_folded", "repeated": "sdpa_repeated"}[self.grouping]
        return self.kernel


def sdpa_reads_grouped_heads(device_type: str, dtype: torch.dtype, masked: bool, head_dim: int) -> bool:
    """Whether SDPA takes grouped key/value heads as they are (``enable_gqa``) and still runs a fused
    kernel. CPU: its flash kernel does, in every dtype, with or without a mask. CUDA: only the flash
    kernel does (float16/bfloat16, no mask, head dim <= 256); anywhere else SDPA would fall back, without
    a word, to the math kernel (a [B, H, T, S] score matrix, several times slower). Other devices: no
    claim about their kernels (the CUDA fallbacks are taken)."""
    if not SDPA_HAS_GQA:
        return False
    if device_type == "cpu":
        return True
    return (
        device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and not masked
        and (head_dim <= FLASH_MAX_HEAD_DIM)
    )


def _flex_refusal(spec: AttentionSpec, f: CallFacts) -> str:
    """Why FlexAttention does not take this call ("" when it does)."""
    if spec.window is None:
        return "no window"
    if flex_attention is None or spec.kernel == "sdpa":
        return "kernel: sdpa" if spec.kernel == "sdpa" else "no FlexAttention in this torch"
    if spec.softcap is not None:
        return "a logit soft-cap"
    if spec.sinks:
        return "attention sinks"
    if f.training and spec.dropout > 0:
        return "attention dropout"
    if f.mask in ("padding", "bias") or f.cache != "none":
        return {"padding": "padding", "bias": "a position bias"}.get(f.mask, f"a {f.cache} cache")
    if f.device == "cuda":
        return ""
    if spec.kernel == "flex" and not f.grad and not f.compiling:
        return ""
    return f"not on {f.device} with gradients or compiling" if spec.kernel == "flex" else f"auto on {f.device}"


def _mask_needed(spec: AttentionSpec, f: CallFacts) -> str:
    """The mask an SDPA / explicit call takes: none, causal (SDPA's is_causal), boolean or additive."""
    if f.mask == "bias":
        return "additive"
    if f.mask == "padding" or f.cache == "static" or f.cache == "rolling":
        return "boolean"
    if f.cache == "none":
        if spec.window is not None:
            return "boolean"
        return "causal" if spec.causal and f.mask == "causal" else "none"
    # a dynamic cache: one new token may see the whole cache; a chunk needs its causal rows
    sees_all = f.queries == 1 and (spec.window is None or spec.window >= f.keys)
    return "none" if sees_all else "boolean"


def _sink_refusal(spec: AttentionSpec, f: CallFacts) -> str:
    """Why attention sinks cannot ride on a fused kernel's log-sum-exp here ("" when they can)."""
    if f.grad:
        return "attention sinks with gradients (the fused kernel's log-sum-exp passes none to q and k)"
    if f.device != "cpu":
        return f"attention sinks on {f.device} (no log-sum-exp kernel checked there)"
    if f.training and spec.dropout > 0:
        return "attention sinks with attention dropout"
    if not f.fused:
        return "attention sinks without a fused kernel"
    return ""


def choose(spec: AttentionSpec | ScanSpec, f: CallFacts) -> Choice:
    """The path for ``spec`` under ``f`` (the only place that decides it)."""
    if isinstance(spec, ScanSpec):
        return _choose_scan(spec, f)
    refusal = _flex_refusal(spec, f)
    if not refusal:
        return Choice(
            "flex", "native" if spec.groups > 1 else "none", "block", compiled=f.device == "cuda" and not f.compiling
        )
    fallback = f"flex: {refusal}" if spec.kernel == "flex" or (spec.window and f.device == "cuda") else ""
    mask = _mask_needed(spec, f)
    repeated = ("repeated_kv",) if spec.groups > 1 else ()
    grouping = "repeated" if spec.groups > 1 else "none"
    sink_refusal = _sink_refusal(spec, f) if spec.sinks else ""
    if spec.softcap is not None or sink_refusal:  # no fused kernel takes a score modifier
        why = "a logit soft-cap" if spec.softcap is not None else sink_refusal
        return Choice(
            "explicit",
            grouping,
            "boolean" if mask == "causal" else mask,
            materialises=("scores", "probs", *repeated),
            fallback=fallback or f"sdpa: {why}",
        )
    if spec.sinks:  # the CPU flash kernel with its log-sum-exp; it reads no grouped heads
        return Choice("sdpa", grouping, mask, materialises=repeated, fallback=fallback, lse=True)
    extra = () if f.fused else ("probs",)
    if spec.groups == 1:
        return Choice("sdpa", "none", mask, materialises=extra, fallback=fallback)
    masked = mask in ("boolean", "additive")
    if sdpa_reads_grouped_heads(f.device, f.dtype, masked, spec.head_dim):
        return Choice("sdpa", "native", mask, materialises=extra, fallback=fallback)
    if mask != "causal":  # folded rows need no order: a mask, or none (every query sees every key: decoding)
        return Choice("sdpa", "folded", mask, materialises=("folded_queries", *extra), fallback=fallback)
    return Choice("sdpa", "repeated", mask, materialises=("repeated_kv", *extra), fallback=fallback)


FLA_FIX = "pip install 'transformer-composer[fla]' (flash-linear-attention, CUDA), or kernel: auto / torch"


@functools.cache
def fla_available() -> bool:
    """Whether flash-linear-attention is installed (looked up once, without importing it)."""
    return importlib.util.find_spec("fla") is not None


def _scan_refusal(spec: ScanSpec, f: CallFacts) -> str:
    """Why the fla kernels do not take this call ("" when they do)."""
    if spec.kernel == "torch":
        return "kernel: torch"
    if f.device != "cuda":
        return f"fla kernels need CUDA (device: {f.device})"
    if f.compiling:
        return "torch.compile traces the PyTorch form (fla's Triton launches are not traced)"
    if not fla_available():
        return "flash-linear-attention is not installed"
    return ""


def _choose_scan(spec: ScanSpec, f: CallFacts) -> Choice:
    """A linear-recurrence mixer's kernel and form: fla where it runs (kernel auto or fla), torch elsewhere."""
    form = spec.form if spec.form != "auto" else "recurrent" if f.queries == 1 else "chunk"
    refusal = _scan_refusal(spec, f)
    if not refusal:
        return Choice("fla", form=form)
    return Choice("torch", form=form, fallback=f"fla: {refusal}" if spec.kernel != "torch" else "")


def scan_facts(x: Tensor, training: bool) -> CallFacts:
    """The facts of a linear-recurrence mixer's call on x [B, T, C]."""
    t = x.shape[1]
    compiling = torch.compiler.is_compiling()
    return CallFacts(x.device.type, x.dtype, torch.is_grad_enabled(), training, queries=t, keys=t, compiling=compiling)


# ----------------------------------------------------------------------------- masks
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


def make_mask(
    choice: Choice,
    spec: AttentionSpec,
    q_pos: Tensor,
    k_pos: Tensor,
    key_valid: Optional[Tensor],
    bias: Optional[Tensor],
) -> Any:
    """The mask ``choice`` takes: None, a boolean [B|1, 1, T, S], an additive float [B|1, H, T, S] (a
    position bias with the disallowed keys at -inf) or FlexAttention's block mask."""
    if choice.mask in ("none", "causal"):
        return None
    if choice.mask == "block":
        return _block_mask(spec, q_pos.shape[0], q_pos.device)
    mask = build_mask(q_pos, k_pos, key_valid, spec.causal, spec.window)
    if choice.mask == "additive":
        return bias.masked_fill(~mask, float("-inf"))  # [B|1, H, T, S] float32
    return mask


def _block_mask(spec: AttentionSpec, t: int, device: torch.device) -> Any:
    window, causal = spec.window, spec.causal

    def allowed(b, h, q_idx, kv_idx):  # the same rule as build_mask
        dist = q_idx - kv_idx
        near = (dist < window) & (dist > -window)
        return near & (dist >= 0) if causal else near

    return create_block_mask(allowed, None, None, t, t, device=device)


# ----------------------------------------------------------------------------- running a choice
def attend(
    choice: Choice,
    spec: AttentionSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Any,
    dropout: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, D] along ``choice``; ``dropout`` (0 when not
    training) is the attention-probability dropout; ``sinks`` [H] the sink logits (``spec.sinks``)."""
    if choice.kernel == "flex":
        run = _compiled_flex() if choice.compiled else flex_attention
        return run(q, k, v, block_mask=mask, scale=spec.scale, enable_gqa=spec.groups > 1)
    if choice.grouping == "repeated":  # [B, Hkv, S, D] -> [B, H, S, D]
        k, v = k.repeat_interleave(spec.groups, dim=1), v.repeat_interleave(spec.groups, dim=1)
    if choice.kernel == "explicit":
        return _explicit(spec, q, k, v, mask, dropout, sinks)
    if choice.lse:
        return _fused_with_sinks(choice, spec, q, k, v, mask, sinks)
    if choice.grouping == "folded":
        return sdpa_folding_groups(q, k, v, mask, dropout_p=dropout, scale=spec.scale)
    gqa = {"enable_gqa": True} if choice.grouping == "native" else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=choice.mask == "causal", scale=spec.scale, **gqa
    )


def _explicit(
    spec: AttentionSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    dropout: float,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Scores, soft-cap, sinks and softmax written out (SDPA has no score modifier)."""
    scale = spec.scale if spec.scale is not None else spec.head_dim**-0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, T, S]
    if spec.softcap is not None:
        scores = spec.softcap * torch.tanh(scores / spec.softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is not None:  # one more logit per head in the denominator, its probability dropped
        b, h, t, _ = scores.shape
        column = sinks.float().view(1, h, 1, 1).expand(b, h, t, 1)  # [B, H, T, 1]
        probs = torch.cat((scores, column), dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    probs = F.dropout(probs, dropout, dropout > 0).type_as(v)
    return probs @ v


def _fused_with_sinks(
    choice: Choice, spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], sinks: Tensor
) -> Tensor:
    """The CPU flash kernel's output y and log-sum-exp L [B, H, T], then y * sigmoid(L - sink): the share
    of attention the sink leaves to the keys (no gradients: see the module docstring)."""
    if mask is not None and mask.dtype == torch.bool:  # the kernel takes an additive mask of q's dtype
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    elif mask is not None:
        mask = mask.to(q.dtype)
    y, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, choice.mask == "causal", attn_mask=mask, scale=spec.scale
    )
    keep = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))  # [B, H, T]
    return (y.float() * keep[..., None]).type_as(q)


def sdpa_folding_groups(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float = 0.0, scale: Optional[float] = None
) -> Tensor:
    """SDPA over grouped K/V heads without copying them and without ``enable_gqa``: each group's query
    heads become one head's rows. q [B, H, T, D], k/v [B, Hkv, S, D], mask [B|1, 1|H, T, S] (bool or
    additive) or None where every query sees every key (never SDPA's causal kernel: the folded rows are out
    of its order) -> [B, H, T, D]."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    groups = h // hkv
    folded = q.reshape(b, hkv, groups * t, d)  # query head j reads K/V head j // groups
    if mask is None:
        pass
    elif mask.shape[1] == 1:  # [B|1, 1, T, S] -> [B|1, 1, G T, S]: row g T + i is query i's row
        mask = mask.repeat(1, 1, groups, 1)
    else:  # a per-head bias [B|1, H, T, S] -> [B|1, Hkv, G T, S]
        mask = mask.reshape(mask.shape[0], hkv, groups * t, mask.shape[-1])
    y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return y.reshape(b, h, t, d)


_FLEX: list = []


def _compiled_flex():
    """flex_attention under torch.compile (its fused kernel); compiled once per process."""
    if not _FLEX:
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]
