"""The interfaces every component family implements (``typing.Protocol``).

A component is an ``nn.Module`` built as ``Component(cfg, ctx)``: ``cfg`` is an instance of
its config dataclass (its YAML options, declared as the class attribute ``Config``) and
``ctx`` the :class:`BuildContext` with the model-wide sizes it may need. Third-party
components follow the same contract; the registry checks it when the model is built.

Shapes: B batch, T new tokens, S key/value length, H query heads, Hkv key/value heads,
D head dim, C hidden size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class ComponentConfig:
    """Base of every component config: ``type`` names the registered component."""

    type: str = ""


@dataclass
class BuildContext:
    """Model-wide facts a component may need when it is constructed."""

    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    num_layers: int
    layer_idx: int = -1  # -1 for model-level components (embeddings, head)
    dropout: float = 0.0
    num_heads: int = 0  # of this layer's attention (for position encodings)
    head_dim: int = 0
    position: Optional[nn.Module] = None  # this layer's position encoding (for attention)
    embedding: Optional[nn.Embedding] = None  # the input embedding (for tied heads)
    # factories for this layer's sub-components (blocks decide how many they need)
    make_attention: Optional[Callable[[], nn.Module]] = None
    make_ffn: Optional[Callable[[], nn.Module]] = None
    make_norm: Optional[Callable[[], nn.Module]] = None
    build: Optional[Callable[[str, ComponentConfig, BuildContext], nn.Module]] = None


@dataclass
class AttentionInputs:
    """Per-forward facts shared by every layer: positions, padding, memoised masks.

    position_ids: [B, T] absolute positions of the new tokens (pads excluded from the count); [1, T]
                  when every row has the same positions (no padding): broadcast over the batch
    key_valid:    [B, S] bool, False at padding keys (None when there is no padding)
    past_length:  tokens already in the KV cache before this call (dynamic caches)
    cache_position: [T] slots of the new tokens as a tensor (static caches; then ``key_valid`` is
                  [B, T], the new tokens' validity, and ``past_length`` is unused)
    """

    position_ids: Tensor
    key_valid: Optional[Tensor] = None
    past_length: int = 0
    cache_position: Optional[Tensor] = None
    memo: dict = field(default_factory=dict)

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """Compute ``make()`` once per forward for ``key`` (masks, rotary tables)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


def run_with_own_memo(module: Callable, hidden: Tensor, inputs: AttentionInputs, *args: Any) -> Any:
    """``module(hidden, inputs', *args)`` where inputs' has a fresh memo: for checkpointed (recomputed)
    regions, which must not write into state outside them (torch.compile traces them as one op). Built
    field by field: torch 2.11's compiler cannot trace ``dataclasses.replace`` inside a checkpointed region."""
    own = AttentionInputs(
        position_ids=inputs.position_ids,
        key_valid=inputs.key_valid,
        past_length=inputs.past_length,
        cache_position=inputs.cache_position,
        memo={},
    )
    return module(hidden, own, *args)


@runtime_checkable
class Attention(Protocol):
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def forward(
        self,
        hidden: Tensor,  # [B, T, C]
        inputs: AttentionInputs,
        past_key_value: Any = None,  # this layer's KVCache, or None
        use_cache: bool = False,
    ) -> tuple[Tensor, Any]:  # ([B, T, C], the updated KVCache or None)
        ...

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device: Any) -> Any: ...


@runtime_checkable
class FeedForward(Protocol):
    def forward(self, x: Tensor) -> Any:  # [B, T, C] -> [B, T, C], or (out, aux_loss) for MoE
        ...


@runtime_checkable
class Norm(Protocol):
    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C]
        ...


@runtime_checkable
class PositionEncoding(Protocol):
    def embed(self, position_ids: Tensor) -> Optional[Tensor]:
        """[B, T] (or [1, T]) -> [B, T, C] (or [1, T, C]) added to token embeddings, or None."""
        ...

    def rotate(self, q: Tensor, k: Tensor, inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
        """Rotate q [B, H, T, D] and k [B, Hkv, T, D] by position (identity if not rotary)."""
        ...

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Optional[Tensor]:
        """Additive attention bias [H, Tq, Tk] from query / key positions, or None."""
        ...


@runtime_checkable
class Head(Protocol):
    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """[B, T, C] -> logits ([B, T, V] for language modelling, [B, K] for classification)."""
        ...

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor: ...


@runtime_checkable
class Block(Protocol):
    def forward(
        self,
        hidden: Tensor,  # [B, T, C]
        inputs: AttentionInputs,
        past_key_value: Any = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Any, Optional[Tensor]]:  # (hidden, present KVCache, aux loss or None)
        ...
