"""The composed model: embeddings, a stack of registered blocks, a final norm and a head.

    cfg = load_config(["model=llama3_8b", "model.num_layers=4"])
    model = compose(cfg.model)                  # validated, built on meta, materialised, initialised
    out = model(input_ids)                      # out.logits [B, T, V]

Every layer is built from its own resolved components (``config.layer(i)``), so any component may
differ per layer: the model builds each layer's attention, feed-forward and norms and hands them to
the block. Weights are created on the meta device first and only materialised on the device asked
for (``device="meta"`` allocates nothing).

Per forward pass the model computes what layers share once (litgpt-style): positions, the rotary
tables of each distinct position encoding, and for each kind of sequence mixer (its
``prepare_key``) the kernel choice, mask and cache slots; each layer receives them as one immutable
``LayerInputs``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from components.kv_cache import Cache

from .checkpoint import PretrainedMixin
from .contract import LayerInputs, member
from .contract.protocols import RESIDUAL_MARK, BuildContext, block_norm_names
from .devices import check_fits, target_device, target_dtype
from .dry_run import dry_forward
from .errors import ConfigError, ModelError, Problem
from .generation import GenerationMixin
from .inputs import check_cache, check_forward_inputs, check_ids, check_labels, host_checks
from .registry import ATTENTION, BLOCK, FFN, HEAD, NORM, POSITION, interface_gaps
from .schema import ModelConfig, resolve_model_config

__all__ = ["ComposedModel", "ModelBuilder", "ModelOutput", "compose", "target_device"]
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class ModelOutput:
    """What a forward pass returns.

    logits:          [B, T, V] (language modelling) or [B, K] (classification); None when the call passed
                     ``return_logits=False`` with labels and gradients on and the lm head's fused loss
                     (``head.fused_loss``, the default) computed the loss straight from the hidden
                     states (as composer's training step does)
    loss:            cross-entropy (+ aux_loss) when labels were given, else None
    aux_loss:        the sum of the layers' auxiliary losses (MoE load balancing), else None
    past_key_values: the KV cache (a ``Cache``) when use_cache, else None
    """

    logits: Optional[Tensor]
    loss: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    past_key_values: Optional[Cache] = None


class ComposedModel(PretrainedMixin, GenerationMixin, nn.Module):
    """A transformer assembled from registered components according to a ModelConfig."""

    def __init__(self, config: ModelConfig, layers: Optional[Sequence[int]] = None):
        """``layers``: build only these layer indices (a skeleton for planning: one block per distinct
        layer; it cannot run). Default: every layer."""
        super().__init__()
        self.config = config
        last = config.num_layers - 1  # always built: its block decides the final norm
        self.layer_indices = list(range(config.num_layers)) if layers is None else sorted({*layers, last})
        self.skeleton = len(self.layer_indices) != config.num_layers
        c = config.hidden_size
        base = BuildContext(
            c,
            config.vocab_size,
            config.max_position_embeddings,
            config.num_layers,
            dropout=config.dropout,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            padded_vocab_size=config.padded_vocab_size,
        )
        self.embed = nn.Embedding(config.padded_vocab_size, c)  # [V, C]
        self.position = POSITION.build(config.position, base, "model.position")  # adds to embeddings if learned
        self.embed_norm = NORM.build(config.norm, base, "model.norm") if config.embedding_norm else None
        # embedding_scale sqrt (Gemma): times sqrt(C) rounded to the embeddings' dtype, per dtype
        root = c**0.5 if config.embedding_scale == "sqrt" else None
        self._embed_scale = {t: torch.tensor(root, dtype=t, device="cpu").item() for t in _FLOATS} if root else {}
        self.drop = nn.Dropout(config.dropout)
        self.layer_positions = nn.ModuleList()  # per-layer position encodings other than the model's
        self._position_of: list[int] = []  # layer -> index into positions() (0: the model's)
        self._layer_position_keys: list[tuple[Any, tuple[int, int]]] = []
        self.layers = nn.ModuleList(self.build_layer(i, base) for i in self.layer_indices)
        last_has_norm = member(self.layers[-1], "block", "final_norm")
        self.final_norm = NORM.build(config.norm, base, "model.norm") if last_has_norm else None
        self.head = HEAD.build(config.head, base, "model.head")
        self.tie_weights()
        self._apply_checkpointing()
        self.index_layers()

    # ------------------------------------------------------------------ building
    def positions(self) -> list[nn.Module]:
        """The distinct position encodings: the model's, then the per-layer ones."""
        return [self.position, *self.layer_positions]

    def layer_position(self, i: int) -> nn.Module:
        """The position encoding layer ``i`` uses (the model hands its tables to the layer each forward)."""
        return self.positions()[self._position_of[i]]

    def build_layer(self, i: int, base: BuildContext) -> nn.Module:
        """Layer ``i``'s block, built from its resolved components (sub-modules first, then the block)."""
        spec = self.config.layer(i)
        heads = getattr(spec.attention, "num_heads", None) or self.config.num_heads
        head_dim = getattr(spec.attention, "head_dim", None) or self.config.head_dim
        ctx = replace(base, layer_idx=i, num_heads=heads, head_dim=head_dim)
        self._position_of.append(self._layer_position(i, spec.position, ctx))
        path = f"model.layers[{i}]"
        attn = ATTENTION.build(spec.attention, ctx, f"{path}.attention")
        ffn = FFN.build(spec.ffn, ctx, f"{path}.ffn")
        norms = {name: NORM.build(spec.norm, ctx, f"{path}.norm") for name in block_norm_names(spec.block)}
        return BLOCK.build(spec.block, ctx, f"{path}.block", attn=attn, ffn=ffn, norms=norms)

    def _layer_position(self, i: int, position: Any, ctx: BuildContext) -> int:
        """The index (into positions()) of the position encoding layer ``i`` uses, built if it is new."""
        same_heads = (ctx.num_heads, ctx.head_dim) == (self.config.num_heads, self.config.head_dim)
        if position == self.config.position and (same_heads or getattr(position, "model_wide_only", False)):
            return 0  # a model-wide encoding (learned) never depends on a layer's heads
        for k, (cfg, shape) in enumerate(self._layer_position_keys, start=1):
            if cfg == position and shape == (ctx.num_heads, ctx.head_dim):
                return k
        self.layer_positions.append(POSITION.build(position, ctx, f"model.layers[{i}].position"))
        self._layer_position_keys.append((position, (ctx.num_heads, ctx.head_dim)))
        return len(self.layer_positions)

    def index_layers(self) -> None:
        """Group the layers whose mixers share one ``prepare`` per forward (equal ``prepare_key`` and the
        same position encoding); ``_group_of[i]`` is layer i's group, ``_group_rep[g]`` a layer of it."""
        self._group_of: list[Optional[int]] = []
        self._group_rep: list[int] = []
        keys: dict[Any, int] = {}
        for i, layer in enumerate(self.layers):
            mixer = member(layer, "block", "attn")
            key = member(mixer, "attention", "prepare_key")() if mixer is not None else None
            if key is None:
                self._group_of.append(None)
                continue
            key = (key, self._position_of[i])
            if key not in keys:
                keys[key] = len(self._group_rep)
                self._group_rep.append(i)
            self._group_of.append(keys[key])

    # ------------------------------------------------------------------ weights
    def tie_weights(self) -> None:
        """Share the LM head's weight with the embedding when ``tie_embeddings`` (re-done after
        materialisation, which creates new parameters)."""
        if self.config.tie_embeddings:
            member(self.head, "head", "tie")(self.embed)

    @property
    def tied(self) -> bool:
        return member(self.head, "head", "tied_to")(self.embed)

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> list[str]:
        """GPT-2 initialisation: normal(0, init_std) for matrices and embeddings, residual output
        projections scaled by 1/sqrt(2 * num_layers), zero biases, unit norm weights.
        Deterministic for a given ``seed``. Modules with their own ``init_weights`` use it.
        Returns the names of parameters no rule covers (they keep their current values)."""
        gen = torch.Generator(device=self.embed.weight.device)
        gen.manual_seed(0 if seed is None else seed)
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.num_layers)
        for module in self.modules():
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()
        done: set[int] = set()
        left: list[str] = []
        for name, module in self.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in done]
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights(gen)
                done.update(id(p) for p in module.parameters())
                continue
            if not own:
                continue
            if isinstance(module, nn.Linear):
                s = resid_std if getattr(module, RESIDUAL_MARK, False) else std
                if any(p is module.weight for p in own):
                    nn.init.normal_(module.weight, 0.0, s, generator=gen)
                if module.bias is not None and any(p is module.bias for p in own):
                    nn.init.zeros_(module.bias)
            elif (
                isinstance(module, nn.Embedding)
                or getattr(module, "weight", None) is not None
                and module.weight.dim() == 2
            ):
                nn.init.normal_(module.weight, 0.0, std, generator=gen)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:  # other parameters (gates, scales) keep their current values
                left += [f"{name}.{n}" for n, p in module.named_parameters(recurse=False) if id(p) not in done]
            done.update(id(p) for p in own)
        return left

    def _apply_checkpointing(self) -> None:
        for i, layer in enumerate(self.layers):
            mode = self.config.checkpointed(i)
            if mode in ("attention", "ffn"):
                layer.checkpoint = mode

    def set_gradient_checkpointing(self, mode: str) -> None:
        """Change checkpointing after building: none | every_layer | every_<k> | attention | ffn."""
        self.config = self.config.replace(gradient_checkpointing=mode)
        for layer in self.layers:
            layer.checkpoint = "none"
        self._apply_checkpointing()

    def num_parameters(self, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (tied weights once)."""
        skip = {id(self.embed.weight)} if exclude_embeddings else set()
        if exclude_embeddings and getattr(self.position, "weight", None) is not None:
            skip.add(id(self.position.weight))
        return sum(
            p.numel() for p in self.parameters() if id(p) not in skip and (p.requires_grad or not trainable_only)
        )

    # ------------------------------------------------------------------ caches
    def allocate_cache(
        self,
        batch_size: int,
        capacity: int,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
        static: bool = False,
    ) -> Cache:
        """One pre-allocated KV cache per layer for ``capacity`` tokens (rolling for windows).

        ``static``: fixed buffers written at tensor positions, for a compiled decode step (see
        components.kv_cache); the forward pass then takes ``attention_mask`` [B, T] for the new
        tokens only, and ``position_ids`` whenever there is padding."""
        ref = self.embed.weight
        mixers = [member(layer, "block", "attn") for layer in self.layers]  # a block without one: no cache
        caches = [
            m.make_cache(batch_size, capacity, dtype or ref.dtype, device or ref.device) if m is not None else None
            for m in mixers
        ]
        if static:
            for i, (mixer, cache) in enumerate(zip(mixers, caches, strict=True)):
                static_ok = callable(getattr(cache, "make_static", None))  # a KVCache or a mixer's own cache
                if not (member(mixer, "attention", "supports_static_cache") and static_ok):
                    raise ModelError(
                        f"layer {i}'s attention ({type(mixer).__name__}) does not support a static KV cache; "
                        "generate without compile=..., or give the attention supports_static_cache = True and "
                        "handle LayerInputs.cache_position"
                    )
                cache.make_static()
        return Cache(caches, static=static, device=device or ref.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,  # [B, T] token ids
        attention_mask: Optional[Tensor] = None,  # [B, past + T], 1 = token, 0 = padding
        labels: Optional[Tensor] = None,  # [B, T] (lm, -100 ignored) or [B] (classification)
        past_key_values: Optional[Cache] = None,
        use_cache: bool = False,
        position_ids: Optional[Tensor] = None,  # [B, T]; default: counted from the mask
        return_logits: bool = True,  # False: labels given, gradients on -> the lm head's fused loss, no logits
    ) -> ModelOutput:
        if self.skeleton:
            raise ModelError(
                "this model is a skeleton for planning (some layers were not built); build it with compose"
            )
        check_cache(past_key_values, len(self.layers), check_ids(input_ids)[0])
        static = past_key_values is not None and past_key_values.static
        past = past_key_values.length if past_key_values is not None and not static else 0
        self._check(input_ids, attention_mask, labels, position_ids, past, static)
        labels = labels.long() if labels is not None else None  # int32 labels are fine; the losses take int64
        if use_cache and past_key_values is None:
            past_key_values = self.allocate_cache(*input_ids.shape)
        shared = self._shared_inputs(input_ids, attention_mask, position_ids, past_key_values, past)
        hidden = self._embed(input_ids, shared.position_ids)  # [B, T, C]
        hidden, aux = self._run_layers(hidden, self._layer_inputs(shared, past_key_values), past_key_values, use_cache)
        if static:
            past_key_values.advance(input_ids.shape[1])
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        logits, loss = self._head(hidden, attention_mask, labels, return_logits)
        if loss is not None and aux is not None:
            loss = loss + aux
        return ModelOutput(
            logits=logits, loss=loss, aux_loss=aux, past_key_values=past_key_values if use_cache else None
        )

    def _check(
        self, input_ids: Any, attention_mask: Any, labels: Any, position_ids: Any, past: int, static: bool
    ) -> None:
        """The boundary: every argument's type, shape, dtype and (on a CPU) values (composer.inputs)."""
        device = self.embed.weight.device
        check_forward_inputs(self.config, input_ids, attention_mask, past, static, position_ids, device)
        space = member(self.head, "head", "label_space")() if labels is not None else None
        if space is not None:
            check_labels(labels, input_ids, *space, values=host_checks(input_ids.device, self.config))

    def _shared_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor],
        position_ids: Optional[Tensor],
        cache: Optional[Cache],
        past: int,
    ) -> LayerInputs:
        """Positions and padding of this call, the same for every layer."""
        t = input_ids.shape[1]
        key_valid = cache_position = None
        if cache is not None and cache.static:  # positions are tensors: nothing changes between decode steps
            cache_position = cache.position + torch.arange(t, device=input_ids.device)  # [T]
            key_valid = None if attention_mask is None else attention_mask.bool()  # [B, T]
            if position_ids is None:
                position_ids = cache_position[None]
        elif attention_mask is not None:
            key_valid = attention_mask.bool()  # [B, past + T]
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        if position_ids is None:  # the same for every row: [1, T], broadcast (a learned table is read once)
            position_ids = torch.arange(past, past + t, device=input_ids.device)[None]
        return LayerInputs(
            position_ids=position_ids, key_valid=key_valid, past_length=past, cache_position=cache_position
        )

    def _layer_inputs(self, shared: LayerInputs, cache: Optional[Cache]) -> list[LayerInputs]:
        """Each layer's inputs: the shared ones, its position encoding's rotary tables (computed once per
        encoding) and what its mixer kind prepared (once per kind)."""
        positions = self.positions()
        rotations = [
            p.rotation(shared.position_ids) if "rotate" in member(p, "position", "acts_on") else None for p in positions
        ]
        prepared = []
        for rep in self._group_rep:
            mixer, position = self.layers[rep].attn, positions[self._position_of[rep]]
            prepared.append(mixer.prepare(shared, cache[rep] if cache is not None else None, position))
        return [
            LayerInputs(
                position_ids=shared.position_ids,
                key_valid=shared.key_valid,
                past_length=shared.past_length,
                cache_position=shared.cache_position,
                rotation=rotations[p],
                position=positions[p],
                prepared=None if g is None else prepared[g],
            )
            for p, g in zip(self._position_of, self._group_of, strict=True)
        ]

    def _embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        hidden = self.embed(input_ids)  # [B, T, C]
        if self._embed_scale:
            hidden = hidden * self._embed_scale[hidden.dtype]
        pos = self.position.embed(position_ids)
        if pos is not None:
            hidden = hidden + pos
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        return self.drop(hidden)

    def _run_layers(
        self, hidden: Tensor, inputs: list[LayerInputs], cache: Optional[Cache], use_cache: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        aux_total = None
        recompute = self.training and torch.is_grad_enabled() and not use_cache
        for i, layer in enumerate(self.layers):
            past_i = cache[i] if cache is not None else None
            if recompute and self.config.checkpointed(i) == "layer":
                hidden, _, aux = checkpoint(layer, hidden, inputs[i], past_i, use_cache, use_reentrant=False)
            else:
                hidden, _, aux = layer(hidden, inputs[i], past_i, use_cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return hidden, aux_total

    def _head(
        self, hidden: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor], return_logits: bool
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        fused = member(self.head, "head", "fused_loss")
        if not return_logits and labels is not None and fused and torch.is_grad_enabled():
            return None, self.head.fused(hidden, labels)  # the full logits are never materialised
        logits = self.head(hidden, attention_mask)
        return logits, self.head.loss(logits, labels) if labels is not None else None

    @classmethod
    def on_meta(cls, config: Any) -> ComposedModel:
        """The model ``config`` describes, validated and built on the meta device (nothing allocated)."""
        return compose(config, device="meta")

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, params={self.num_parameters():,}"


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


@contextmanager
def _skip_init():
    """Constructors' own initialisation is pointless on the meta device (init_weights runs after
    materialisation) and, on meta, slow: the first random fill imports torch's compiler stack."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_on_meta(config: ModelConfig, layers: Optional[Sequence[int]] = None) -> ComposedModel:
    """The model of a resolved config on the meta device (nothing allocated, no initialisation work);
    ``layers``: only these layers (a skeleton for planning)."""
    with torch.device("meta"), _skip_init():
        return ComposedModel(config, layers)


def compose(
    config: Any, device: Any = None, dtype: Optional[torch.dtype] = None, seed: Optional[int] = None
) -> ComposedModel:
    """Validate ``config`` (a model DictConfig, mapping or ModelConfig) and build the model.

    Built on the meta device; ``device="meta"`` returns it unallocated, any other device
    (default: CPU) materialises and initialises it (deterministically for ``seed``), then
    casts to ``dtype``. Raises ConfigError before any tensor is allocated if the config is
    invalid.
    """
    cfg = resolve_model_config(config)
    device, dtype = target_device(device), target_dtype(dtype)
    model = build_on_meta(cfg)
    dry_forward(model)
    if dtype is not None:
        model.to(dtype=dtype)
    if device.type == "meta":
        return model
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    check_fits(sum(t.numel() * t.element_size() for t in tensors), device, "the model's weights")
    model.to_empty(device=device)
    model.tie_weights()
    left = model.init_weights(seed)
    if left:  # built on meta, these never had values: refuse rather than return uninitialised memory
        raise ConfigError(
            [
                Problem(
                    ", ".join(left),
                    "parameters with no initialisation (the model is built on "
                    "the meta device, so constructor values are not kept)",
                    "give their module a reset_parameters() or init_weights(generator) method",
                )
            ]
        )
    return model


class ModelBuilder:
    """Fluent construction with hand-made parts:

        ModelBuilder(cfg).with_layer(3, my_block).with_head(my_head).build()

    ``with_layer`` takes an ``nn.Module`` implementing the block interface, or a mapping of
    component overrides for that layer (``{"attention": {"type": "mqa"}}``); ``with_head``
    takes a head module or a head config. Hand-made modules keep their own weights.
    """

    def __init__(self, config: Any):
        self._raw = resolve_model_config(config).to_dict()
        self._modules: dict[int, nn.Module] = {}
        self._head: Optional[nn.Module] = None

    def with_layer(self, index: int, block: Any) -> ModelBuilder:
        n = self._raw["num_layers"]
        if not -n <= index < n:
            raise ConfigError(
                [
                    Problem(
                        f"with_layer({index})",
                        f"layer {index} does not exist ({n} layers)",
                        f"use an index in [0, {n})",
                    )
                ]
            )
        if isinstance(block, nn.Module):
            _check_interface(block, BLOCK, f"with_layer({index})")
            self._modules[index % n] = block
        elif isinstance(block, Mapping):
            self._raw["layers"] = [*self._raw.get("layers", []), {"select": [index % n], **block}]
        else:
            raise ConfigError(
                [
                    Problem(
                        f"with_layer({index})",
                        f"expected an nn.Module or a mapping, got {type(block).__name__}",
                        "pass a block module or {'attention': ...}",
                    )
                ]
            )
        return self

    def with_head(self, head: Any) -> ModelBuilder:
        if isinstance(head, nn.Module):
            _check_interface(head, HEAD, "with_head()")
            self._head = head
        else:
            self._raw["head"] = head
        return self

    def build(
        self, device: Any = None, dtype: Optional[torch.dtype] = None, seed: Optional[int] = None
    ) -> ComposedModel:
        model = compose(self._raw, device=device, dtype=dtype, seed=seed)
        for index, block in self._modules.items():
            model.layers[index] = block
        if self._head is not None:
            model.head = self._head
        model.index_layers()  # hand-made blocks join the per-forward sharing
        return model


def _check_interface(module: nn.Module, registry: Any, path: str) -> None:
    gaps = interface_gaps(module, registry.protocol)
    if gaps:
        raise ConfigError(
            [
                Problem(
                    path,
                    f"{type(module).__name__} does not implement the {registry.family} interface: " + "; ".join(gaps),
                    "add the missing members",
                )
            ]
        )
