"""Cross-entropy of a linear layer's output, computed chunk by chunk without ever holding all logits.

    loss = linear_cross_entropy(hidden, weight, bias, targets, chunk_size=4096)   # = CE(hidden @ W.T + b, t)

For large vocabularies the logits [N, V] (and their float32 copy, log-softmax and gradients) are the biggest
tensors of a training step. Here each chunk of ``chunk_size`` rows computes its logits, its part of the loss
and, at once, its part of the gradients of ``hidden``, ``weight`` and ``bias`` (the loss is the end of the
graph, so the gradient of the logits, softmax - one-hot, is known in the forward pass). The backward pass
only scales the stored gradients by the incoming one. Peak memory: one chunk of logits plus the gradients
(which the step needs anyway); compute: the same matrix products as the unchunked loss, no recomputation.

Matches ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)`` (mean over
the labelled rows; NaN when none is labelled), including an optional logit soft-cap and masked padding
columns, under autocast too (products in the autocast dtype, softmax in float32).

Shapes: N rows (tokens), C features, V output columns (vocabulary, padded).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk_size: int,
                softcap: Optional[float], vocab: int) -> Tensor:
        n = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None  # [N, C]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # [V, C]
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if bias is not None and need_b else None  # [V]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]  # [n, C]
            t = targets[start:start + chunk_size]  # [n]
            z = F.linear(h, weight, bias)  # [n, V] (the autocast dtype under autocast)
            logits = z.float()
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = softcap * capped
            if vocab < logits.shape[1]:  # padding columns never win
                logits = logits.masked_fill(torch.arange(logits.shape[1], device=z.device) >= vocab, float("-inf"))
            labelled = t != IGNORE_INDEX
            safe = torch.where(labelled, t, 0)
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total = total + torch.where(labelled, lse - picked, 0.0).sum()
            grad = torch.exp(logits - lse[:, None])  # softmax [n, V], the gradient of the summed loss ...
            grad.scatter_add_(1, safe[:, None], -torch.ones_like(lse[:, None]))  # ... minus the one-hot
            grad.mul_(labelled[:, None])
            if softcap is not None:
                grad.mul_(1 - capped.square())
            grad_z = grad.to(z.dtype)  # products in the dtype of the forward one (autocast casts the rest)
            if grad_h is not None:
                grad_h[start:start + chunk_size] = grad_z @ weight
            if grad_w is not None:
                grad_w += (grad_z.t() @ h).float()
            if grad_b is not None:
                grad_b += grad.sum(0)
        count = (targets != IGNORE_INDEX).sum()
        ctx.save_for_backward(grad_h, grad_w, grad_b, count)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b, count = ctx.saved_tensors
        scale = grad_out / count.clamp(min=1)  # no labelled row: zero gradients (as F.cross_entropy)
        dh, dw, db = ctx.dtypes
        return (None if grad_h is None else (grad_h * scale).to(dh),
                None if grad_w is None else (grad_w * scale).to(dw),
                None if grad_b is None else (grad_b * scale).to(db),
                None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                         chunk_size: int, softcap: Optional[float] = None, vocab: Optional[int] = None) -> Tensor:
    """Mean cross-entropy of ``F.linear(hidden, weight, bias)`` [N, V] against ``targets`` [N] (IGNORE_INDEX
    skipped), ``chunk_size`` rows at a time. ``softcap``: logits become softcap * tanh(logits / softcap);
    ``vocab``: columns from this index on are padding (masked). hidden [N, C], weight [V, C], bias [V]."""
    vocab = weight.shape[0] if vocab is None else vocab
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, softcap, vocab)
