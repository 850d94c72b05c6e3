"""Attention plugins that do not fit the attention interface (the registry must refuse them)."""

from __future__ import annotations

from torch import Tensor

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
