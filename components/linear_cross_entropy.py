"""Cross-entropy of a linear layer's output, computed chunk by chunk without ever holding all logits.

    loss = linear_cross_entropy(hidden, weight, bias, targets)   # = CE(hidden @ W.T + b, t), chunk by chunk

For large vocabularies the logits [N, V] (and their float32 copy, log-softmax and gradients) are the biggest
tensors of a training step. Here each chunk of ``chunk_size`` rows computes its logits, its part of the loss
and, at once, its part of the gradients of ``hidden``, ``weight`` and ``bias`` (the loss is the end of the
graph, so the gradient of the logits, softmax - one-hot, is known in the forward pass). The backward pass
only scales the stored gradients by the incoming one. Peak memory: one chunk of logits plus the gradients
(which the step needs anyway); compute: the same matrix products as the unchunked loss, no recomputation,
and fewer passes over [N, V] than ``F.cross_entropy`` and its backward: one buffer of [chunk, V] is reused
by every chunk and rewritten in place (logits -> log-softmax -> gradient), so a CPU does not page-fault a
fresh [N, V] tensor for each of those steps.

Matches ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)`` (mean over
the labelled rows; NaN when none is labelled), including an optional logit soft-cap and masked padding
columns, under autocast too (products in the autocast dtype, softmax in float32).

Written here because no maintained library does this on every device: torch has no fused linear
cross-entropy, and Liger-Kernel's is Triton, so CUDA only. This one is plain torch, so it runs wherever
torch does (tested on CPUs, eager and under ``torch.compile(fullgraph=True)``; the accelerator branch is
tested there too, its CUDA speed is a ``benchmarks/gpu.sh`` figure).

Shapes: N rows (tokens), C features, V output columns (vocabulary, padded).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from composer.contract import IGNORE_INDEX

IN_PLACE_SOFTMAX = {"cpu"}  # devices whose log-softmax writes over its input (a CPU saves the page faults)


def chunk_bytes(device_type: str) -> int:
    """Float32 logits per chunk when no chunk size is given: 128 MiB on a CPU, 1 GiB on an accelerator
    (fewer chunks there: each adds a [V, C] gradient sum and a dozen kernel launches)."""
    return 128 * 2**20 if device_type == "cpu" else 2**30


def auto_chunk_size(rows: int, columns: int, device_type: str) -> int:
    """Rows per chunk when none is given: at most ``chunk_bytes`` of float32 logits [chunk, V], the rows
    split into equal chunks (CPU, 1,024 tokens x 50,257: two chunks of 512; GPU, 16 x 1,024 tokens: four
    chunks of 4,096)."""
    most = max(1, chunk_bytes(device_type) // (4 * columns))
    chunks = max(1, -(-rows // most))
    return max(1, -(-rows // chunks))


def _autocast_devices() -> frozenset[str]:
    """Device types autocast knows, asked once at import: torch.amp.is_autocast_available is not traceable by
    torch.compile on torch 2.11 (a graph break), a set lookup is; torch.is_autocast_enabled fails on the others
    (meta, for one). An older torch that does not know a device type's name leaves it out."""
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    kinds = set()
    for kind in (
        "cpu",
        "cuda",
        "xpu",
        "mps",
        "hpu",
        "mtia",
        "xla",
        "ipu",
        "maia",
        torch._C._get_privateuse1_backend_name(),
    ):
        try:
            if available(kind):
                kinds.add(kind)
        except RuntimeError:  # "Expected one of cpu, cuda, ... device type"
            pass
    return frozenset(kinds)


AUTOCAST_DEVICES = _autocast_devices()


def compute_dtype(t: Tensor, device_type: Optional[str] = None) -> torch.dtype:
    """The dtype of products with ``t``: autocast's where it is on for ``device_type`` (default: the
    tensor's device), else the tensor's."""
    kind = device_type or t.device.type
    if kind in AUTOCAST_DEVICES and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _gradient_buffers(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], needs: tuple[bool, bool, bool]
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Float32 gradients of ``hidden`` [N, C], ``weight`` [V, C] and ``bias`` [V], those that are needed."""
    need_h, need_w, need_b = needs
    device, n, v = hidden.device, hidden.shape[0], weight.shape[0]
    new = torch.empty if n else torch.zeros  # the first chunk writes them (no chunk: zero gradients)
    grad_h = new(hidden.shape, dtype=torch.float32, device=device) if need_h else None  # [N, C]
    grad_w = new(weight.shape, dtype=torch.float32, device=device) if need_w else None  # [V, C]
    grad_b = torch.zeros(v, dtype=torch.float32, device=device) if bias is not None and need_b else None
    return grad_h, grad_w, grad_b


def _chunk_log_softmax(
    h: Tensor,
    w: Tensor,
    b: Optional[Tensor],
    z: Tensor,
    logits: Tensor,
    softcap: Optional[float],
    vocab: int,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log p [m, V] of chunk ``h`` [m, C]: the logits written into ``z`` (the products' dtype), their float32
    copy into ``logits`` (``z`` itself when that is float32), soft-capped, padding masked, then the log-softmax
    (over ``logits`` on a CPU). Also the capped tanh [m, V] the gradient needs (None without a soft-cap)."""
    v = z.shape[1]
    if b is None:
        torch.mm(h, w.t(), out=z)
    else:
        torch.addmm(b, h, w.t(), out=z)
    if logits is not z:
        logits.copy_(z)  # float32 softmax
    capped = None
    if softcap is not None:
        capped = logits.div_(softcap).tanh_().clone()
        logits.mul_(softcap)
    if vocab < v:
        logits[:, vocab:] = float("-inf")  # padding columns never win
    if z.device.type in IN_PLACE_SOFTMAX:  # log p [m, V] over the logits
        logits = torch.log_softmax(logits, dim=-1, out=logits)
    else:  # accelerators: a fresh block, which the caching allocator hands back at once
        logits = torch.log_softmax(logits, dim=-1)
    return logits, capped


def _chunk_logit_gradient(logp: Tensor, z: Tensor, safe: Tensor, picked: Tensor, capped: Optional[Tensor]) -> Tensor:
    """The gradient of the chunk's summed loss by its logits, softmax - one-hot [m, V], written over ``logp``
    and copied into ``z`` (the products' dtype) where that is another buffer; returns the float32 one."""
    grad = logp.exp_()  # softmax: the gradient of the summed loss ...
    grad.scatter_add_(1, safe, torch.full_like(picked, -1.0))  # ... minus the one-hot
    if capped is not None:
        grad.mul_(1 - capped.square())
    if grad is not z:
        z.copy_(grad)  # the products run in the forward's dtype
    return grad


def _chunk_hidden_gradient(gh: Tensor, z: Tensor, w: Tensor, weights: Tensor) -> None:
    """Write the chunk's rows ``gh`` [m, C] of the hidden gradient: (dL/dz) @ W, each row weighted."""
    if z.dtype == torch.float32:
        torch.mm(z, w, out=gh)
    else:
        gh.copy_(z @ w)
    gh.mul_(weights)


def _chunk_weight_gradient(grad_w: Tensor, z: Tensor, h: Tensor, weights: Tensor, first: bool) -> None:
    """Add the chunk's part (dL/dz).T @ (weighted h) [V, C] to ``grad_w`` (the ``first`` chunk writes it)."""
    hw = h * weights.to(z.dtype)  # [m, C]
    if z.dtype != torch.float32:  # 16-bit products, float32 sum
        part = z.t() @ hw  # [V, C]
        if first:
            grad_w.copy_(part)
        else:
            grad_w.add_(part)
    elif first:
        torch.mm(z.t(), hw, out=grad_w)
    else:
        grad_w.addmm_(z.t(), hw)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        targets: Tensor,
        chunk_size: int,
        softcap: Optional[float],
        vocab: int,
    ) -> Tensor:
        n, v = hidden.shape[0], weight.shape[0]
        device = hidden.device
        dtype = compute_dtype(hidden)
        with torch.autocast(device.type, enabled=False):  # dtypes are explicit below
            h_all, w = hidden.to(dtype), weight.to(dtype)  # [N, C], [V, C]: cast once, not per chunk
            b = None if bias is None else bias.to(dtype)
            labelled_all = targets != IGNORE_INDEX  # [N]
            count = labelled_all.sum()
            scale = 1.0 / count.clamp(min=1)  # the mean over labelled rows, folded into the gradients
            grad_h, grad_w, grad_b = _gradient_buffers(hidden, weight, b, ctx.needs_input_grad[:3])
            total = torch.zeros((), dtype=torch.float32, device=device)
            rows = min(chunk_size, n)
            z_buf = torch.empty(rows, v, dtype=dtype, device=device)  # [chunk, V]: logits, then the gradient
            f_buf = z_buf if dtype == torch.float32 else torch.empty(rows, v, dtype=torch.float32, device=device)
            for start in range(0, n, chunk_size):
                h = h_all[start : start + chunk_size]  # [m, C]
                m = h.shape[0]
                labelled = labelled_all[start : start + chunk_size, None]  # [m, 1]
                safe = torch.where(labelled, targets[start : start + chunk_size, None], 0)  # [m, 1]
                z = z_buf[:m]  # [m, V]
                logp, capped = _chunk_log_softmax(h, w, b, z, f_buf[:m], softcap, vocab)  # [m, V]
                picked = logp.gather(1, safe)  # [m, 1]
                total = total - torch.where(labelled, picked, 0.0).sum()
                grad = _chunk_logit_gradient(logp, z, safe, picked, capped)  # [m, V], float32; z holds it too
                weights = labelled * scale  # [m, 1]: unlabelled rows contribute nothing
                if grad_h is not None:
                    _chunk_hidden_gradient(grad_h[start : start + chunk_size], z, w, weights)
                if grad_w is not None:
                    _chunk_weight_gradient(grad_w, z, h, weights, start == 0)
                if grad_b is not None:
                    grad_b += (grad * weights).sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / count  # NaN when no row is labelled (as F.cross_entropy)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh, dw, db = ctx.dtypes
        return (
            None if grad_h is None else (grad_h * grad_out).to(dh),
            None if grad_w is None else (grad_w * grad_out).to(dw),
            None if grad_b is None else (grad_b * grad_out).to(db),
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    vocab: Optional[int] = None,
) -> Tensor:
    """Mean cross-entropy of ``F.linear(hidden, weight, bias)`` [N, V] against ``targets`` [N] (IGNORE_INDEX
    skipped), ``chunk_size`` rows at a time (None: ``auto_chunk_size``). ``softcap``: logits become
    softcap * tanh(logits / softcap); ``vocab``: columns from this index on are padding (masked).
    hidden [N, C], weight [V, C], bias [V]."""
    vocab = weight.shape[0] if vocab is None else vocab
    if chunk_size is None:
        chunk_size = auto_chunk_size(hidden.shape[0], weight.shape[0], hidden.device.type)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, softcap, vocab)
