"""Transformer blocks: how attention, feed-forward and norms are wired around the residual.

    pre_norm:  x = x + attn(norm1(x));  x = x + ffn(norm2(x))          GPT-2, Llama (final norm)
    post_norm: x = norm1(x + attn(x));  x = norm2(x + ffn(x))          original Transformer, BERT
    parallel:  x = x + attn(norm1(x)) + ffn(norm2(x))                  GPT-J (one shared norm), NeoX

A block receives its built sub-modules (``Block(cfg, ctx, attn, ffn, norms)``, torchtune style): the
model builds the layer's attention, feed-forward and the norms the config names (``norm_names``).
``dropout`` is the residual dropout applied to each branch's output. A block can recompute its
attention or its feed-forward in the backward pass (``checkpoint``, set by the model). A layer whose
feed-forward is ``absent`` (ffn ``none``: Mamba-2) skips that sub-layer and its norm: x = x + attn(norm1(x)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from composer.contract import (
    BLOCK,
    BlockBase,
    BlockConfigBase,
    BuildContext,
    ConfigError,
    Cost,
    CostCall,
    LayerInputs,
    Problem,
    check_probability,
    cost_of,
    inherit,
    member,
    option,
)


@dataclass
class BlockConfig(BlockConfigBase):
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

    def norm_names(self) -> tuple[str, ...]:
        return ("attn_norm",) if self.shared_norm else ("attn_norm", "ffn_norm")


class _Block(BlockBase):
    def __init__(
        self, cfg: BlockConfig, ctx: BuildContext, attn: nn.Module, ffn: nn.Module, norms: Mapping[str, nn.Module]
    ):
        super().__init__()
        self.attn, self.ffn = attn, ffn
        self.attn_norm = norms["attn_norm"]
        self.skip_ffn = bool(member(ffn, "ffn", "absent"))  # no feed-forward sub-layer, and so no ffn_norm
        self.ffn_norm = None if self.skip_ffn else norms.get("ffn_norm")
        if self.skip_ffn and not type(self).ffn_optional:
            raise ConfigError(
                [Problem("model.ffn.type", f"{type(self).__name__} needs a feed-forward", "use block pre_norm")]
            )
        self.drop = nn.Dropout(cfg.dropout)
        self.hidden_size = ctx.hidden_size

    def _attention(self, x: Tensor, inputs: LayerInputs, past: Any, use_cache: bool) -> tuple[Tensor, Any]:
        if self.checkpoint == "attention" and self.training and torch.is_grad_enabled() and not use_cache:
            return checkpoint(self.attn, x, inputs, past, use_cache, use_reentrant=False)
        return self.attn(x, inputs, past, use_cache)

    def _feed_forward(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if self.checkpoint == "ffn" and self.training and torch.is_grad_enabled():
            out = checkpoint(self.ffn, x, use_reentrant=False)
        else:
            out = self.ffn(x)
        return out if isinstance(out, tuple) else (out, None)  # MoE returns (out, aux_loss)

    def cost(self, call: CostCall) -> Cost:
        """The sub-modules' costs, as parts ``attention`` (with its norm) and ``ffn`` (with its norm), plus
        the residual dropout masks (1 byte per element and branch)."""
        attention = cost_of(self.attn, call) + cost_of(self.attn_norm, call)
        ffn = Cost() if self.skip_ffn else cost_of(self.ffn, call)
        ffn = ffn + (cost_of(self.ffn_norm, call) if self.ffn_norm is not None else Cost())
        masks = Cost(saved=(1 if self.skip_ffn else 2) * self.hidden_size if self.drop.p > 0 else 0)
        return (attention + ffn + masks).with_parts(attention=attention, ffn=ffn)


@BLOCK.register("pre_norm", config=BlockConfig)
class PreNormBlock(_Block):
    ffn_optional: ClassVar[bool] = True  # skips an absent feed-forward

    def forward(
        self, hidden: Tensor, inputs: LayerInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any, Optional[Tensor]]:  # [B, T, C] -> [B, T, C]
        a, present = self._attention(self.attn_norm(hidden), inputs, past_key_value, use_cache)
        hidden = hidden + self.drop(a)
        if self.skip_ffn:
            return hidden, present, None
        f, aux = self._feed_forward(self.ffn_norm(hidden))
        return hidden + self.drop(f), present, aux


@BLOCK.register("post_norm", config=PostNormConfig)
class PostNormBlock(_Block):
    ffn_optional: ClassVar[bool] = True  # skips an absent feed-forward
    final_norm: ClassVar[bool] = False

    def forward(
        self, hidden: Tensor, inputs: LayerInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any, Optional[Tensor]]:
        a, present = self._attention(hidden, inputs, past_key_value, use_cache)
        hidden = self.attn_norm(hidden + self.drop(a))
        if self.skip_ffn:
            return hidden, present, None
        f, aux = self._feed_forward(hidden)
        return self.ffn_norm(hidden + self.drop(f)), present, aux


@BLOCK.register("parallel", config=ParallelConfig)
class ParallelBlock(_Block):
    ffn_optional: ClassVar[bool] = True  # skips an absent feed-forward

    def forward(
        self, hidden: Tensor, inputs: LayerInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any, Optional[Tensor]]:
        normed = self.attn_norm(hidden)
        a, present = self._attention(normed, inputs, past_key_value, use_cache)
        if self.skip_ffn:
            return hidden + self.drop(a), present, None
        f, aux = self._feed_forward(normed if self.ffn_norm is None else self.ffn_norm(hidden))
        return hidden + self.drop(a) + self.drop(f), present, aux
