"""Choosing the next token: sampling settings and the logits processors (repetition penalty,
temperature, top-k, top-p), as in transformers' generate.

Shapes: B batch, V vocabulary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .contract import is_int, is_number
from .errors import ModelError


# ----------------------------------------------------------------------------- settings
@dataclass
class SamplingSettings:
    """How the next token is chosen from the logits (see :func:`generate` for each option)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None

    def check(self) -> None:
        """ModelError naming the argument and the fix for any value out of range."""
        if self.do_sample and not (is_number(self.temperature) and self.temperature > 0):
            raise ModelError(
                f"generate(temperature={self.temperature!r}): temperature must be > 0 when sampling; "
                "use e.g. 0.7, or do_sample=False for greedy decoding"
            )
        if self.top_k is not None and not (is_int(self.top_k) and self.top_k >= 1):
            raise ModelError(
                f"generate(top_k={self.top_k!r}): top_k must be an integer >= 1; "
                "use e.g. 50, or None to keep every token"
            )
        if self.top_p is not None and not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ModelError(
                f"generate(top_p={self.top_p!r}): top_p must be in (0, 1]; "
                "use e.g. 0.9, or None (1.0) to keep every token"
            )
        if self.repetition_penalty is not None and not (
            is_number(self.repetition_penalty) and self.repetition_penalty > 0
        ):
            raise ModelError(
                f"generate(repetition_penalty={self.repetition_penalty!r}): the penalty must be > 0; "
                "use e.g. 1.2 (1.0 or None: no penalty)"
            )
        ignored = [n for n in ("top_k", "top_p") if getattr(self, n) is not None]
        if not self.do_sample and (ignored or self.temperature != 1.0):
            names = ", ".join(ignored + (["temperature"] if self.temperature != 1.0 else []))
            warnings.warn(
                f"generate: {names} only apply when sampling and are ignored by greedy decoding; "
                "pass do_sample=True to sample",
                UserWarning,
                stacklevel=4,
            )


# ----------------------------------------------------------------------------- logits processing
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (as in transformers): a logit of an already-seen token is divided by
    ``penalty`` if positive, multiplied if negative. logits [B, V] float, seen [B, V] bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th kept), the rest -inf. [B, V]."""
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches ``p`` (the
    token that crosses p included, at least one kept), the rest -inf. [B, V]."""
    if p >= 1.0:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)  # [B, V]
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, before >= p)
    return logits.masked_fill(drop, float("-inf"))


def choose_tokens(
    logits: Tensor, s: SamplingSettings, seen: Optional[Tensor] = None, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Next tokens [B] from the last position's logits [B, V]: repetition penalty, then (when
    sampling) temperature, top-k and top-p, then a draw; greedy takes the argmax."""
    if s.repetition_penalty is not None and s.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits.float(), seen, s.repetition_penalty)
    if not s.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if s.temperature != 1.0:  # shifted first: the best logit becomes 0, so a tiny temperature cannot overflow
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / s.temperature
    if s.top_k is not None:
        logits = top_k_filter(logits, s.top_k)
    if s.top_p is not None:
        logits = top_p_filter(logits, s.top_p)
    probs = logits.softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
