"""Attention plugins that do not fit the attention interface (the registry must refuse them)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests.plugins.my_attention import MyAttention


class NoHeadDim(MyAttention):
    """Lacks the ``head_dim`` attribute."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        del self.head_dim


class NoPastKeyValue(MyAttention):
    """Its forward cannot take a KV cache."""

    def forward(self, hidden: Tensor, inputs, use_cache: bool = False):  # no past_key_value
        return super().forward(hidden, inputs, None, use_cache)


class NoCache(MyAttention):
    """Cannot make a KV cache."""

    make_cache = None


class UninitialisedGate(MyAttention):
    """Adds a parameter no initialisation rule covers (no reset_parameters / init_weights)."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.extra = _Gate(self.num_heads)


class _Gate(nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(heads))  # [H]; on the meta device this value is never kept


class ReturnsList(MyAttention):
    """Its forward returns a list instead of (output, cache)."""

    def forward(self, hidden, inputs, past_key_value=None, use_cache=False):
        return [hidden]


class FailsInForward(MyAttention):
    """Its forward raises something other than a composer error."""

    def forward(self, hidden, inputs, past_key_value=None, use_cache=False):
        raise ZeroDivisionError("division by zero inside the plugin")


class FailsInInit(MyAttention):
    """Its constructor raises a ValueError."""

    def __init__(self, cfg, ctx):
        raise ValueError("the plugin's own check failed")
