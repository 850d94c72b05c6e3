"""Transformer blocks: how attention, feed-forward and norms are wired around the residual.

    pre_norm:  x = x + attn(norm1(x));  x = x + ffn(norm2(x))          GPT-2, Llama (final norm)
    post_norm: x = norm1(x + attn(x));  x = norm2(x + ffn(x))          original Transformer, BERT
    parallel:  x = x + attn(norm1(x)) + ffn(norm2(x))                  GPT-J (one shared norm), NeoX

``dropout`` is the residual dropout applied to each branch's output. A block can recompute
its attention or its feed-forward in the backward pass (``checkpoint``), set by the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from components.protocols import AttentionInputs, BuildContext, ComponentConfig, run_with_own_memo
from composer.registry import BLOCK
from composer.schema import check_probability, inherit, option


@dataclass
class BlockConfig(ComponentConfig):
    """Pre-norm residual block: normalize, transform, add (GPT-2, Llama)."""

    dropout: Optional[float] = option(None, help="residual dropout (null: model.dropout)")

    def resolve(self, model, check) -> None:
        inherit(self, "dropout", model.dropout)
        check_probability(self, "dropout", check)


@dataclass
class PostNormConfig(BlockConfig):
    """Post-norm residual block: transform, add, normalize (original Transformer, BERT)."""


@dataclass
class ParallelConfig(BlockConfig):
    """Parallel residual: attention and feed-forward read the same input (GPT-J, GPT-NeoX)."""

    shared_norm: bool = option(False, help="one norm feeds both branches (GPT-J) instead of two (NeoX)")


class _Block(nn.Module):
    final_norm: ClassVar[bool] = True  # the model adds a norm after the last block
    checkpoint: str = "none"  # 'attention' | 'ffn': recompute that sub-layer in backward

    def __init__(self, cfg: BlockConfig, ctx: BuildContext):
        super().__init__()
        self.attn = ctx.make_attention()
        self.ffn = ctx.make_ffn()
        self.drop = nn.Dropout(cfg.dropout)

    def _attention(self, x: Tensor, inputs: AttentionInputs, past: Any, use_cache: bool) -> tuple[Tensor, Any]:
        if self.checkpoint == "attention" and self.training and torch.is_grad_enabled() and not use_cache:
            return checkpoint(run_with_own_memo, self.attn, x, inputs, past, use_cache, use_reentrant=False)
        return self.attn(x, inputs, past, use_cache)

    def _feed_forward(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if self.checkpoint == "ffn" and self.training and torch.is_grad_enabled():
            out = checkpoint(self.ffn, x, use_reentrant=False)
        else:
            out = self.ffn(x)
        return out if isinstance(out, tuple) else (out, None)  # MoE returns (out, aux_loss)


@BLOCK.register("pre_norm", config=BlockConfig)
class PreNormBlock(_Block):
    def __init__(self, cfg: BlockConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.attn_norm, self.ffn_norm = ctx.make_norm(), ctx.make_norm()

    def forward(
        self, hidden: Tensor, inputs: AttentionInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any, Optional[Tensor]]:  # [B, T, C] -> [B, T, C]
        a, present = self._attention(self.attn_norm(hidden), inputs, past_key_value, use_cache)
        hidden = hidden + self.drop(a)
        f, aux = self._feed_forward(self.ffn_norm(hidden))
        return hidden + self.drop(f), present, aux


@BLOCK.register("post_norm", config=PostNormConfig)
class PostNormBlock(_Block):
    final_norm: ClassVar[bool] = False

    def __init__(self, cfg: BlockConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.attn_norm, self.ffn_norm = ctx.make_norm(), ctx.make_norm()

    def forward(
        self, hidden: Tensor, inputs: AttentionInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any, Optional[Tensor]]:
        a, present = self._attention(hidden, inputs, past_key_value, use_cache)
        hidden = self.attn_norm(hidden + self.drop(a))
        f, aux = self._feed_forward(hidden)
        return self.ffn_norm(hidden + self.drop(f)), present, aux


@BLOCK.register("parallel", config=ParallelConfig)
class ParallelBlock(_Block):
    def __init__(self, cfg: ParallelConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.attn_norm = ctx.make_norm()
        self.ffn_norm = None if cfg.shared_norm else ctx.make_norm()

    def forward(
        self, hidden: Tensor, inputs: AttentionInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any, Optional[Tensor]]:
        normed = self.attn_norm(hidden)
        a, present = self._attention(normed, inputs, past_key_value, use_cache)
        f, aux = self._feed_forward(normed if self.ffn_norm is None else self.ffn_norm(hidden))
        return hidden + self.drop(a) + self.drop(f), present, aux
