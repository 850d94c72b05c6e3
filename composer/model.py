"""The composed model: embeddings, a stack of registered blocks, a final norm and a head.

    cfg = load_config(["model=llama3_8b", "model.num_layers=4"])
    model = compose(cfg.model)                  # validated, built on meta, materialised, initialised
    out = model(input_ids)                      # out.logits [B, T, V]

Every layer is built from its own resolved components (``config.layer(i)``), so any
component may differ per layer. Weights are created on the meta device first and only
materialised on the device asked for (``device="meta"`` allocates nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from components.kv_cache import Cache, KVCache
from components.protocols import AttentionInputs, BuildContext, run_with_own_memo

from .errors import ConfigError, InvalidParameter, ModelError, Problem
from .registry import ATTENTION, BLOCK, FAMILIES, FFN, HEAD, NORM, POSITION, interface_gaps
from .schema import ModelConfig, resolve_model_config


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


class ComposedModel(nn.Module):
    """A transformer assembled from registered components according to a ModelConfig."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config.hidden_size
        base = BuildContext(
            c,
            config.vocab_size,
            config.max_position_embeddings,
            config.num_layers,
            dropout=config.dropout,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            build=lambda family, cfg, ctx: FAMILIES[family].build(cfg, ctx),
        )
        self.embed = nn.Embedding(config.padded_vocab_size, c)  # [V, C]
        self.position = POSITION.build(config.position, base, "model.position")  # adds to embeddings if learned
        self.embed_norm = NORM.build(config.norm, base, "model.norm") if config.embedding_norm else None
        self.drop = nn.Dropout(config.dropout)
        self.layer_positions = nn.ModuleList()  # per-layer position encodings other than the model's
        positions: dict[str, nn.Module] = {}
        self.layers = nn.ModuleList(self._build_layer(i, base, positions) for i in range(config.num_layers))
        last = self.layers[-1]
        self.final_norm = NORM.build(config.norm, base, "model.norm") if getattr(last, "final_norm", True) else None
        self.head = HEAD.build(config.head, _with(base, embedding=self.embed), "model.head")
        self.tie_weights()
        self._apply_checkpointing()

    def _build_layer(self, i: int, base: BuildContext, positions: dict[str, nn.Module]) -> nn.Module:
        spec = self.config.layer(i)
        heads = getattr(spec.attention, "num_heads", None) or self.config.num_heads
        head_dim = getattr(spec.attention, "head_dim", None) or self.config.head_dim
        key = f"{spec.position!r}|{heads}|{head_dim}"
        same_shape = heads == self.config.num_heads and head_dim == self.config.head_dim
        if spec.position == self.config.position and same_shape:
            position = self.position
        elif key in positions:
            position = positions[key]
        else:
            pctx = _with(base, layer_idx=i, num_heads=heads, head_dim=head_dim)
            position = positions[key] = POSITION.build(spec.position, pctx, f"model.layers[{i}].position")
            self.layer_positions.append(position)
        ctx = _with(base, layer_idx=i, num_heads=heads, head_dim=head_dim, position=position)
        path = f"model.layers[{i}]"
        ctx.make_attention = lambda: ATTENTION.build(spec.attention, ctx, f"{path}.attention")
        ctx.make_ffn = lambda: FFN.build(spec.ffn, ctx, f"{path}.ffn")
        ctx.make_norm = lambda: NORM.build(spec.norm, ctx, f"{path}.norm")
        return BLOCK.build(spec.block, ctx, f"{path}.block")

    # ------------------------------------------------------------------ weights
    def tie_weights(self) -> None:
        """Share the LM head's weight with the embedding when ``tie_embeddings`` (re-done after
        materialisation, which creates new parameters)."""
        proj = getattr(self.head, "proj", None)
        if self.config.tie_embeddings and proj is not None and proj.weight.shape == self.embed.weight.shape:
            proj.weight = self.embed.weight

    @property
    def tied(self) -> bool:
        proj = getattr(self.head, "proj", None)
        return proj is not None and proj.weight is self.embed.weight

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
                s = resid_std if getattr(module, "residual_projection", False) else std
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
        caches = [
            layer.attn.make_cache(batch_size, capacity, dtype or ref.dtype, device or ref.device)
            for layer in self.layers
        ]
        if static:
            for i, (layer, cache) in enumerate(zip(self.layers, caches, strict=True)):
                if not (getattr(layer.attn, "supports_static_cache", False) and isinstance(cache, KVCache)):
                    raise ModelError(
                        f"layer {i}'s attention ({type(layer.attn).__name__}) does not support a static "
                        "KV cache; generate without compile=..., or give the attention "
                        "supports_static_cache = True and handle AttentionInputs.cache_position"
                    )
                cache.make_static()
        return Cache(caches, static=static)

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
        static = past_key_values is not None and getattr(past_key_values, "static", False)
        past = past_key_values.length if past_key_values is not None and not static else 0
        self._check_inputs(input_ids, attention_mask, past, static)
        b, t = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = self.allocate_cache(b, t)
        key_valid = cache_position = None
        if static:  # positions are tensors: nothing here changes from one decode step to the next
            cache_position = past_key_values.position + torch.arange(t, device=input_ids.device)  # [T]
            key_valid = None if attention_mask is None else attention_mask.bool()  # [B, T]
            if position_ids is None:
                position_ids = cache_position[None]
        elif attention_mask is not None:
            key_valid = attention_mask.bool()  # [B, past + T]
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        if position_ids is None:  # the same for every row: [1, T], broadcast (a learned table is read once)
            position_ids = torch.arange(past, past + t, device=input_ids.device)[None]
        inputs = AttentionInputs(
            position_ids=position_ids, key_valid=key_valid, past_length=past, cache_position=cache_position
        )

        hidden = self.embed(input_ids)  # [B, T, C]
        pos = self.position.embed(position_ids)
        if pos is not None:
            hidden = hidden + pos
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        hidden = self.drop(hidden)

        aux_total = None
        for i, layer in enumerate(self.layers):
            past_i = past_key_values[i] if past_key_values is not None else None
            if self.config.checkpointed(i) == "layer" and self.training and torch.is_grad_enabled() and not use_cache:
                hidden, _, aux = checkpoint(
                    run_with_own_memo, layer, hidden, inputs, past_i, use_cache, use_reentrant=False
                )
            else:
                hidden, _, aux = layer(hidden, inputs, past_i, use_cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if static:
            past_key_values.advance(t)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        loss = logits = None
        if (
            not return_logits
            and labels is not None
            and getattr(self.head, "fused_loss", False)
            and torch.is_grad_enabled()
        ):
            loss = self.head.fused(hidden, labels)  # the full logits are never materialised
        else:
            logits = self.head(hidden, attention_mask)
            if labels is not None:
                loss = self.head.loss(logits, labels)
        if loss is not None and aux_total is not None:
            loss = loss + aux_total
        return ModelOutput(
            logits=logits, loss=loss, aux_loss=aux_total, past_key_values=past_key_values if use_cache else None
        )

    def _check_inputs(self, input_ids: Any, attention_mask: Any, past: int, static: bool = False) -> None:
        """Boundary checks: shape, dtype, id range, length, mask shape (ModelError). With a static
        cache the mask covers the new tokens only and the cache's capacity bounds the length."""
        if not isinstance(input_ids, Tensor):
            raise ModelError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ModelError(
                f"input_ids must be 2-D [batch, seq_len], got shape {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids.unsqueeze(0)"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ModelError(
                f"input_ids must be an integer tensor, got {input_ids.dtype}; convert with input_ids.long()"
            )
        b, t = input_ids.shape
        if t == 0:
            raise ModelError("input_ids is empty (seq_len 0); pass at least one token")
        limit = self.config.max_position_embeddings
        if past + t > limit:
            raise ModelError(
                f"sequence length {past + t} (past {past} + new {t}) exceeds "
                f"max_position_embeddings={limit}; truncate the input or use a model with "
                "a longer context"
            )
        if attention_mask is not None:
            want = (b, past + t)
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != want:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
                what = (
                    "[batch, seq_len] (a static cache keeps the past's padding)"
                    if static
                    else "[batch, past + seq_len]"
                )
                raise ModelError(f"attention_mask must have shape {want} {what}, got {got}")
        if torch.compiler.is_compiling():
            return
        if input_ids.device.type == "cpu" or self.config.check_inputs_on_accelerator:
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one pass, one host read
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ModelError(
                    f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size}); "
                    "check the tokenizer matches the model's vocab_size"
                )

    # ------------------------------------------------------------------ generation and checkpoints
    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, **kwargs: Any) -> Tensor:
        """Decode new tokens after ``input_ids`` (see composer.generation.generate)."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, directory: Any, tokenizer: Any = None, **kwargs: Any) -> None:
        """Write weights (safetensors), config and tokenizer to ``directory`` (composer.checkpoint)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, directory, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: Any, **kwargs: Any) -> ComposedModel:
        """Rebuild a model saved with ``save_pretrained`` (composer.checkpoint)."""
        from .checkpoint import from_pretrained

        return from_pretrained(directory, **kwargs)

    # ------------------------------------------------------------------ misc
    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, params={self.num_parameters():,}"


def _with(ctx: BuildContext, **changes: Any) -> BuildContext:
    from dataclasses import replace

    return replace(ctx, **changes)


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


def target_device(device: Any, argument: str = "device") -> torch.device:
    """``device`` (None: CPU) as a torch.device this process can use. Raises InvalidParameter naming
    ``argument`` for a string that is no device or an accelerator this torch does not see, before
    anything is allocated (torch's own errors there come late and name neither)."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device if device is not None else "cpu")
        except (RuntimeError, TypeError):
            raise InvalidParameter(
                [Problem(argument, f"{device!r} is not a device", "use cpu, cuda or cuda:<index>")]
            ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidParameter(
                [
                    Problem(
                        argument,
                        f"{device!r}: this torch ({torch.__version__}) sees no CUDA device",
                        "use cpu, or run where a GPU and a CUDA build of torch are",
                    )
                ]
            )
        if dev.index is not None and dev.index >= count:
            raise InvalidParameter(
                [
                    Problem(
                        argument,
                        f"{device!r}: this machine has {count} CUDA device(s)",
                        f"use cuda:0 ... cuda:{count - 1}",
                    )
                ]
            )
    return dev


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
    device = target_device(device)
    with torch.device("meta"), _skip_init():
        model = ComposedModel(cfg)
    if dtype is not None:
        model.to(dtype=dtype)
    if device.type == "meta":
        return model
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
