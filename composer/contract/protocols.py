"""The interfaces every component family implements (``typing.Protocol``), and everything else the
model, the planner, generation and checkpointing rely on.

A component is an ``nn.Module`` built as ``Component(cfg, ctx)``: ``cfg`` is an instance of its config
dataclass (its YAML options, a :class:`ComponentConfig` subclass) and ``ctx`` the :class:`BuildContext`,
the model-wide sizes it may need. A block is built as ``Block(cfg, ctx, attn, ffn, norms)``: the model
builds the layer's sub-components and hands them over. The registry checks each built component against
its family's protocol (the REQUIRED members); the OPTIONAL members below have the defaults of the family's
base class (``MixerBase``, ``HeadBase``, ...), read through :func:`member` for components that do not
subclass it. Costs (``cost(call) -> Cost``, see ``composer.contract.cost``) are optional too: a component
without one is reported by ``composer-plan`` as "not planned".

Per forward pass the model computes the facts every layer shares once (positions, rotary tables, each
mixer kind's masks and cache slots) and hands each layer its :class:`LayerInputs`, an immutable object:
nothing a layer computes is written back, so recomputed (checkpointed) regions need no special care.

Shapes: B batch, T new tokens, S key/value length, H query heads, Hkv key/value heads, D head dim,
C hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


# ----------------------------------------------------------------------------- configs and sizes
@dataclass
class ComponentConfig:
    """Base of every component config: ``type`` names the registered component.

    Optional hooks (defaults here): ``resolve(model, check)`` fills inherited values and reports problems;
    ``check_layer(layer)`` returns ``(problem, fix)`` when this component does not fit one layer's other
    components (a position encoding vs. that layer's head dim); ``model_wide_only`` refuses per-layer
    overrides of the type."""

    type: str = ""
    model_wide_only: ClassVar[bool] = False

    def resolve(self, model: Any, check: Any) -> None:
        """Fill inherited values (``inherit``) and add problems to ``check`` (a ``Checker``)."""

    def check_layer(self, layer: Any) -> Optional[tuple[str, str]]:
        """(problem, fix) if this component does not fit ``layer`` (a ``LayerSpec``); None if it fits."""
        return None

    def summary(self) -> str:
        """A short description for tables (composer-plan's layer rows): the type, and key options."""
        return self.type


@dataclass
class BlockConfigBase(ComponentConfig):
    """Base of block configs: ``norm_names()`` are the norms the model builds for the block."""

    def norm_names(self) -> tuple[str, ...]:
        return ("attn_norm", "ffn_norm")


def block_norm_names(cfg: Any) -> tuple[str, ...]:
    """The norms the model builds for a block config (``norm_names()``; default attn_norm, ffn_norm)."""
    names = getattr(cfg, "norm_names", None)
    return tuple(names()) if callable(names) else BlockConfigBase.norm_names(cfg)


@dataclass(frozen=True)
class BuildContext:
    """Model-wide sizes a component may need when it is constructed (sizes only: sub-components are
    built by the model, shared state is passed per forward)."""

    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    num_layers: int
    layer_idx: int = -1  # -1 for model-level components (embeddings, head)
    dropout: float = 0.0
    num_heads: int = 0  # of this layer's attention (for position encodings)
    head_dim: int = 0
    padded_vocab_size: int = 0  # rows of the embedding (vocab_size padded to a multiple); 0: vocab_size

    @property
    def embedding_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size


# ----------------------------------------------------------------------------- per-forward state
@runtime_checkable
class Rotation(Protocol):
    """A position encoding's per-forward rotary tables: turns queries and keys by their positions."""

    def apply(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:  # q [B, H, T, D], k [B, Hkv, T, D]
        ...


@dataclass(frozen=True)
class LayerInputs:
    """What one layer gets each forward pass, computed once by the model (immutable).

    position_ids:   [B, T] absolute positions of the new tokens (pads excluded from the count); [1, T]
                    when every row has the same positions (no padding): broadcast over the batch
    key_valid:      [B, S] bool, False at padding keys (None when there is no padding); with a static
                    cache [B, T], the new tokens' validity
    past_length:    tokens already in a dynamic cache before this call
    cache_position: [T] slots of the new tokens as a tensor (static caches)
    rotation:       this layer's rotary tables (None: its position encoding does not rotate)
    position:       this layer's position encoding module (for a mixer preparing its own call)
    prepared:       what this layer's mixer prepared for the call (``MixerBase.prepare``), shared by the
                    layers whose mixers have the same ``prepare_key()``; None when it did not prepare
    """

    position_ids: Tensor
    key_valid: Optional[Tensor] = None
    past_length: int = 0
    cache_position: Optional[Tensor] = None
    rotation: Optional[Rotation] = None
    position: Any = None
    prepared: Any = None

    @property
    def new_tokens(self) -> int:
        return self.position_ids.shape[-1]

    def query_slots(self) -> Tensor:
        """[T] absolute positions (cache slots) of the new tokens."""
        if self.cache_position is not None:
            return self.cache_position
        t = self.new_tokens
        return torch.arange(self.past_length, self.past_length + t, device=self.position_ids.device)


# ----------------------------------------------------------------------------- families
@runtime_checkable
class SequenceMixer(Protocol):
    """The ``attention`` family: mixes information along the sequence."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    def forward(
        self,
        hidden: Tensor,  # [B, T, C]
        inputs: LayerInputs,
        past_key_value: Any = None,  # this layer's cache, or None
        use_cache: bool = False,
    ) -> tuple[Tensor, Any]:  # ([B, T, C], the updated cache or None)
        ...

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device: Any) -> Any: ...


Attention = SequenceMixer


@runtime_checkable
class LayerCache(Protocol):
    """What a mixer's ``make_cache`` returns, as the model and generation use it: ``length`` (tokens
    written so far), ``batch_size`` (its rows), ``reset()`` (forget every token) and ``select(index)``
    (keep these batch rows). A cache that also has ``make_static()`` / ``static`` may back a compiled
    decode step."""

    length: int

    @property
    def batch_size(self) -> int: ...

    def reset(self) -> None: ...

    def select(self, index: Tensor) -> None: ...


class MixerBase(nn.Module):
    """Optional members of a sequence mixer, with their defaults."""

    supports_static_cache: ClassVar[bool] = False  # handles static caches (LayerInputs.cache_position)
    causal: bool = True  # generation refuses a mixer that sees later tokens
    window: Optional[int] = None  # tokens each query sees (None: all)

    def prepare_key(self) -> Optional[Hashable]:
        """Layers whose mixers return equal keys share one ``prepare`` per forward (None: no prepare)."""
        return None

    def prepare(self, inputs: LayerInputs, cache: Any, position: Any) -> Any:
        """Per-forward work shared by the layers of this kind (masks, cache slots, the kernel choice),
        done once by the model with one layer's ``cache`` and the layers' position encoding; the result
        arrives as ``LayerInputs.prepared``."""
        return None


@runtime_checkable
class FeedForward(Protocol):
    def forward(self, x: Tensor) -> Any:  # [B, T, C] -> [B, T, C], or (out, aux_loss) for MoE
        ...


class FeedForwardBase(nn.Module):
    """Optional members of a feed-forward, with their defaults: ``absent`` says the layer has no
    feed-forward sub-layer (ffn ``none``, Mamba-2's layers): a block whose ``ffn_optional`` is set skips
    it and its norm, so it has no parameters and costs nothing."""

    absent: ClassVar[bool] = False


@runtime_checkable
class Norm(Protocol):
    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C]
        ...


@runtime_checkable
class PositionEncoding(Protocol):
    def embed(self, position_ids: Tensor) -> Optional[Tensor]:
        """[B, T] (or [1, T]) -> [B, T, C] (or [1, T, C]) added to token embeddings, or None."""
        ...

    def rotation(self, position_ids: Tensor) -> Optional[Rotation]:
        """This forward's rotary tables for positions [B, T] (or [1, T]), or None (no rotation)."""
        ...

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Optional[Tensor]:
        """Additive attention bias [H, Tq, Tk] from query / key positions, or None."""
        ...


class PositionBase(nn.Module):
    """Optional members of a position encoding: ``acts_on`` names where it acts (the model and the
    planner skip the others), a subset of {"embed", "rotate", "bias"}."""

    acts_on: ClassVar[frozenset[str]] = frozenset({"embed", "rotate", "bias"})


@runtime_checkable
class Head(Protocol):
    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """[B, T, C] -> logits ([B, T, V] for language modelling, [B, K] for classification)."""
        ...

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor: ...


class HeadBase(nn.Module):
    """Optional members of a head, with their defaults."""

    fused_loss: bool = False  # fused(hidden, labels) computes the loss without logits

    def label_space(self) -> Optional[tuple[bool, int]]:
        """(per_token, classes): labels are [B, T] token ids (True) or [B] class indices (False), each in
        [0, classes) or IGNORE_INDEX; the model checks them against this. None: the head checks its own."""
        return None

    def fused(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """The loss straight from the final hidden states (only called when ``fused_loss``)."""
        return self.loss(self(hidden, None), labels)

    def tie(self, embedding: nn.Embedding) -> bool:
        """Share a weight with the input embedding (``tie_embeddings``); False if this head cannot."""
        return False

    def tied_to(self, embedding: nn.Embedding) -> bool:
        """Whether a weight of this head is the embedding's."""
        return False

    @contextlib.contextmanager
    def decode_layout(self) -> Iterator[None]:
        """A context in which decoding steps may use a faster weight layout (no-op by default)."""
        yield


@runtime_checkable
class Block(Protocol):
    def forward(
        self,
        hidden: Tensor,  # [B, T, C]
        inputs: LayerInputs,
        past_key_value: Any = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Any, Optional[Tensor]]:  # (hidden, present cache, aux loss or None)
        ...


class BlockBase(nn.Module):
    """Optional members of a block: ``attn``, its sequence mixer (the model asks it for the layer's cache
    and per-forward work; a block without one gets no cache), ``final_norm`` (the model adds a norm after
    the last block), ``ffn_optional`` (it handles a layer without a feed-forward) and ``checkpoint``,
    which the model sets: 'attention' | 'ffn' recomputes that sub-layer in backward."""

    attn: Optional[nn.Module]  # annotated only: a class attribute would hide the registered sub-module
    final_norm: ClassVar[bool] = True
    ffn_optional: ClassVar[bool] = False  # runs a layer whose feed-forward is ``absent`` (skips it and its norm)
    checkpoint: str = "none"


@runtime_checkable
class Costed(Protocol):
    """A component that states its cost (optional for every family; see composer.contract.cost)."""

    def cost(self, call: Any) -> Any: ...


class Initialised(Protocol):
    """Optional initialisation hooks the model calls after materialising the weights: a module with
    ``init_weights(generator)`` initialises its own parameters; ``reset_parameters()`` is used for
    parameters no rule covers; ``reset_buffers()`` refills non-persistent buffers (rotary frequencies).
    An ``nn.Linear`` marked with :func:`mark_residual` is initialised with std / sqrt(2 * layers)."""

    def init_weights(self, generator: torch.Generator) -> None: ...

    def reset_buffers(self) -> None: ...


RESIDUAL_MARK = "residual_projection"


def mark_residual(linear: nn.Linear) -> nn.Linear:
    """Mark an output projection that writes into the residual stream (GPT-2's scaled initialisation)."""
    setattr(linear, RESIDUAL_MARK, True)
    return linear


_BASES: dict[str, type] = {
    "attention": MixerBase,
    "ffn": FeedForwardBase,
    "head": HeadBase,
    "block": BlockBase,
    "position": PositionBase,
}


def member(module: Any, family: str, name: str) -> Any:
    """``module.name``, or the documented default of ``family``'s base class when a component that
    does not subclass it leaves the optional member out."""
    value = getattr(module, name, _MISSING)
    if value is not _MISSING:
        return value
    base = _BASES[family]
    default = getattr(base, name, _MISSING)
    if default is _MISSING:  # declared by annotation only (a sub-module): absent means None
        if name in base.__annotations__:
            return None
        raise AttributeError(f"{name!r} is not a member of the {family} contract")
    return default.__get__(module) if callable(default) and not isinstance(default, type) else default


_MISSING = object()
