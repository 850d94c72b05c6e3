"""No feed-forward: a layer that is only its sequence mixer, as in Mamba-2 (Dao & Gu 2024):

    x = x + mixer(norm(x))                       (pre_norm; no ffn_norm, no feed-forward)

The block skips this sub-layer and its norm (``absent``, see ``FeedForwardBase``): it has no
parameters and costs nothing. Its forward, never called by the blocks, is the zero branch
(x + 0 = x), so a block that did call it would still compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from composer.contract import FFN, ComponentConfig, Cost, CostCall, FeedForwardBase


@dataclass
class NoFeedForwardConfig(ComponentConfig):
    """No feed-forward sub-layer: the block skips it and its norm (Mamba-2 layers)."""


@FFN.register("none", config=NoFeedForwardConfig)
class NoFeedForward(FeedForwardBase):
    absent: ClassVar[bool] = True

    def __init__(self, cfg: NoFeedForwardConfig, ctx):
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C] of zeros
        return torch.zeros_like(x)

    def cost(self, call: CostCall) -> Cost:
        return Cost()
