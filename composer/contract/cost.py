"""What a component costs, stated by the component itself: ``module.cost(call) -> Cost``.

``composer-plan`` builds one module per distinct layer on the meta device, asks each for its cost and
adds up what they answer; it knows no component by name. A component without a ``cost`` method is
reported as "not planned". The conventions (so the figures can be checked):

- FLOPs: a multiply-add counts 2. A matmul of a [*, n] input with an [n, m] weight costs 2 n m per
  token; attention scores cost 4 x context x H x D per token (no causal discount).
- ``saved``: the bytes autograd keeps for the backward pass, per token of the batch.
- ``cache``: the bytes a decoding cache or recurrent state grows by per token; ``cache_tokens`` caps the
  tokens kept (a window), ``state`` is fixed per sequence (a recurrent state, a convolution tail).
- ``transient``: short-lived bytes of the whole step at the start of the backward pass (a head's logits
  gradients), not per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import ComposerError


@dataclass(frozen=True)
class CostCall:
    """The call a cost is stated for: one training step's shapes and precision on a device."""

    seq_len: int  # T: tokens per sequence (the attention context before any window)
    batch_size: int = 1
    activation_bytes: int = 4  # matmul inputs / outputs: 2 under 16-bit autocast, 4 in float32
    residual_bytes: int = 4  # the residual stream and norm inputs (float32 under mixed precision)
    device: str = "cuda"  # the device type the step runs on
    fused_attention: bool = True  # SDPA runs a fused kernel (False: the math path stores probabilities)
    position_bias: bool = False  # this layer's position encoding adds a bias to the attention scores

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the matmuls."""
        return torch.float32 if self.activation_bytes == 4 else torch.bfloat16

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes) -> CostCall:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Cost:
    """Parameters, forward FLOPs per token, bytes saved for backward per token and cache bytes per token."""

    params: int = 0
    flops: float = 0.0
    saved: int = 0
    cache: int = 0
    cache_tokens: Optional[int] = None  # tokens a cache keeps per sequence (None: every token)
    state: int = 0  # fixed cache / state bytes per sequence
    transient: int = 0  # short-lived bytes of the whole step (not per token)
    parts: Mapping[str, Cost] = field(default_factory=dict)  # named parts (a block's attention and ffn)
    notes: tuple[str, ...] = ()
    active_params: Optional[int] = None  # parameters one token uses (an MoE's routed top_k); None: all

    @property
    def active(self) -> int:
        """Parameters one token uses (``params`` unless the component said fewer)."""
        return self.params if self.active_params is None else self.active_params

    def __add__(self, other: Cost) -> Cost:
        tokens = [t for t in (self.cache_tokens, other.cache_tokens) if t is not None]
        return Cost(
            params=self.params + other.params,
            flops=self.flops + other.flops,
            saved=self.saved + other.saved,
            cache=self.cache + other.cache,
            cache_tokens=max(tokens) if tokens else None,
            state=self.state + other.state,
            transient=self.transient + other.transient,
            parts={**self.parts, **other.parts},
            notes=self.notes + tuple(n for n in other.notes if n not in self.notes),
            active_params=None if self.active_params is other.active_params is None else self.active + other.active,
        )

    def cache_bytes(self, seq_len: int) -> int:
        """Cache bytes of one sequence of ``seq_len`` tokens."""
        kept = seq_len if self.cache_tokens is None else min(seq_len, self.cache_tokens)
        return self.cache * kept + self.state

    def with_parts(self, **parts: Cost) -> Cost:
        return dataclasses.replace(self, parts={**self.parts, **parts})


def total(costs: list[Cost]) -> Cost:
    out = Cost()
    for c in costs:
        out = out + c
    return out


def param_count(*modules: Optional[nn.Module]) -> int:
    """Parameters of ``modules`` (each counted once)."""
    seen: dict[int, int] = {}
    for m in modules:
        if m is not None:
            seen.update((id(p), p.numel()) for p in m.parameters())
    return sum(seen.values())


def linear_flops(*modules: Optional[nn.Module]) -> float:
    """2 x the weights of every ``nn.Linear`` in ``modules``: the matmul FLOPs of one token through them."""
    return float(
        sum(
            2 * m.in_features * m.out_features
            for mod in modules
            if mod is not None
            for m in mod.modules()
            if isinstance(m, nn.Linear)
        )
    )


class NotPlanned(ComposerError):
    """A component states no cost (it has no ``cost`` method): composer-plan reports it by name."""

    def __init__(self, module: nn.Module):
        self.component = f"{type(module).__module__}.{type(module).__qualname__}"
        super().__init__(f"not planned: {self.component} has no cost method")


def cost_of(module: nn.Module, call: CostCall, *args) -> Cost:
    """``module.cost(call, *args)``; NotPlanned when the module has no cost method."""
    method = getattr(module, "cost", None)
    if not callable(method):
        raise NotPlanned(module)
    return method(call, *args)
