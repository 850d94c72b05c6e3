"""The sandwich block: a norm before and after each sub-layer (Gemma 2 and 3).

    sandwich:  x = x + post_attn_norm(attn(attn_norm(x)))
               x = x + post_ffn_norm(ffn(ffn_norm(x)))

The post-norm acts on the sub-layer's output, before the residual add, so the residual stream itself
is never normalised (unlike post_norm) and each branch adds a normalised update (Gemma Team, "Gemma 2:
Improving Open Language Models at a Practical Size", 2024; Ding et al., "CogView", 2021, call it
sandwich layer norm). The model builds the four norms the config names (``norm_names``) from the
layer's norm config and adds a final norm after the last block, as for pre_norm. ``dropout`` is the
residual dropout on each branch's output (after its post-norm).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import Tensor, nn

from components.block import BlockConfig, _Block
from composer.contract import BLOCK, BuildContext, Cost, CostCall, LayerInputs, cost_of


@dataclass
class SandwichConfig(BlockConfig):
    """Sandwich residual block: normalize, transform, normalize, add (Gemma 2, Gemma 3)."""

    def norm_names(self) -> tuple[str, ...]:
        return ("attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm")


@BLOCK.register("sandwich", config=SandwichConfig)
class SandwichBlock(_Block):
    ffn_optional: ClassVar[bool] = True  # skips an absent feed-forward (ffn none) and its two norms

    def __init__(
        self, cfg: SandwichConfig, ctx: BuildContext, attn: nn.Module, ffn: nn.Module, norms: Mapping[str, nn.Module]
    ):
        super().__init__(cfg, ctx, attn, ffn, norms)
        self.post_attn_norm = norms["post_attn_norm"]
        self.post_ffn_norm = None if self.skip_ffn else norms["post_ffn_norm"]

    def forward(
        self, hidden: Tensor, inputs: LayerInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any, Optional[Tensor]]:  # [B, T, C] -> [B, T, C]
        a, present = self._attention(self.attn_norm(hidden), inputs, past_key_value, use_cache)
        hidden = hidden + self.drop(self.post_attn_norm(a))
        if self.skip_ffn:  # ffn none: the layer is its mixer only
            return hidden, present, None
        f, aux = self._feed_forward(self.ffn_norm(hidden))
        return hidden + self.drop(self.post_ffn_norm(f)), present, aux

    def cost(self, call: CostCall) -> Cost:
        """The sub-modules' costs, as parts ``attention`` and ``ffn``, each with its two norms, plus the
        residual dropout masks (1 byte per element and branch)."""
        attention = cost_of(self.attn, call) + cost_of(self.attn_norm, call) + cost_of(self.post_attn_norm, call)
        ffn = Cost()
        if not self.skip_ffn:
            ffn = cost_of(self.ffn, call) + cost_of(self.ffn_norm, call) + cost_of(self.post_ffn_norm, call)
        masks = Cost(saved=(1 if self.skip_ffn else 2) * self.hidden_size if self.drop.p > 0 else 0)
        return (attention + ffn + masks).with_parts(attention=attention, ffn=ffn)
