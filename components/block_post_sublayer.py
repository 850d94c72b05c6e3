"""Post-sub-layer block (OLMo 2, Groeneveld et al. / OLMo Team 2024, "2 OLMo 2 Furious"): no norm before
a sub-layer; its output is normalised before it joins the residual.

    post_sublayer: x = x + norm1(attn(x));  x = x + norm2(ffn(x))          OLMo 2 (final norm)

Unlike ``post_norm`` (the residual stream itself is normalised), the residual here is never
normalised: only each branch's output is, so the stream keeps its scale across layers and the last
block's output goes through the model's final norm. ``attn_norm`` / ``ffn_norm`` are the two norms
(the names the model builds for every block), applied on the sub-layers' outputs; Hugging Face
calls them ``post_attention_layernorm`` and ``post_feedforward_layernorm``.

Shapes: B batch, T tokens, C hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import Tensor

from components.block import BlockConfig, _Block
from composer.contract import BLOCK, LayerInputs


@dataclass
class PostSublayerConfig(BlockConfig):
    """Post-sub-layer norms: transform, normalize the output, add (OLMo 2); no pre-norm."""


@BLOCK.register("post_sublayer", config=PostSublayerConfig)
class PostSublayerBlock(_Block):
    ffn_optional: ClassVar[bool] = True  # skips an absent feed-forward (ffn none)

    def forward(
        self, hidden: Tensor, inputs: LayerInputs, past_key_value: Any = None, use_cache: bool = False
    ) -> tuple[Tensor, Any, Optional[Tensor]]:  # [B, T, C] -> [B, T, C]
        a, present = self._attention(hidden, inputs, past_key_value, use_cache)
        hidden = hidden + self.drop(self.attn_norm(a))
        if self.skip_ffn:
            return hidden, present, None
        f, aux = self._feed_forward(hidden)
        return hidden + self.drop(self.ffn_norm(f)), present, aux
