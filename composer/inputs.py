"""The model's boundary: what a forward pass accepts, checked before any layer runs (ModelError
naming the argument, what it got and what it expects).

Value checks (id ranges, mask values, label ranges) read the tensor once on the host: on a CPU
always, on an accelerator only with ``check_inputs_on_accelerator`` (a host sync per forward).

Shapes: B batch, T new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .contract import IGNORE_INDEX
from .errors import ModelError
from .schema import ModelConfig

ID_DTYPES = (torch.int64, torch.int32)


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_ids(input_ids: Any) -> tuple[int, int]:
    """``input_ids`` is an int64 / int32 tensor [B, T] with B, T >= 1; returns (B, T)."""
    if not isinstance(input_ids, Tensor):
        raise ModelError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ModelError(
            f"input_ids must be 2-D [batch, seq_len], got shape {tuple(input_ids.shape)}; "
            "add a batch dimension with input_ids.unsqueeze(0)"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ModelError(f"input_ids must be an integer tensor, got {input_ids.dtype}; convert with input_ids.long()")
    if input_ids.dtype not in ID_DTYPES:
        raise ModelError(f"input_ids must be int64 or int32, got {input_ids.dtype}; convert with input_ids.long()")
    b, t = input_ids.shape
    if t == 0:
        raise ModelError("input_ids is empty (seq_len 0); pass at least one token")
    if b == 0:
        raise ModelError("input_ids has no rows (batch 0, shape (0, T)); pass at least one sequence")
    return b, t


def host_checks(device: torch.device, config: ModelConfig) -> bool:
    return not torch.compiler.is_compiling() and (device.type == "cpu" or config.check_inputs_on_accelerator)


def check_forward_inputs(
    config: ModelConfig,
    input_ids: Any,
    attention_mask: Any,
    past: int,
    static: bool = False,
    position_ids: Any = None,
    model_device: Optional[torch.device] = None,
) -> None:
    """Shape, dtype, device, id range, length, mask and positions of a forward call (ModelError). With a
    static cache the mask covers the new tokens only and the cache's capacity bounds the length."""
    b, t = check_ids(input_ids)
    if model_device is not None and model_device.type == "meta":
        raise ModelError(
            "the model is on the meta device (compose(..., device='meta') allocates nothing); "
            "build it with compose(config) or compose(config, device='cpu') to run it"
        )
    if model_device is not None and input_ids.device.type != model_device.type:
        raise ModelError(
            f"input_ids are on {input_ids.device}, the model on {model_device}; "
            f"move them with input_ids.to('{model_device}')"
        )
    limit = config.max_position_embeddings
    if past + t > limit:
        raise ModelError(
            f"sequence length {past + t} (past {past} + new {t}) exceeds max_position_embeddings={limit}; "
            "truncate the input or use a model with a longer context"
        )
    _check_mask(config, attention_mask, (b, past + t) if not static else (b, t), static, input_ids.device)
    _check_positions(config, position_ids, b, t, input_ids.device)
    if host_checks(input_ids.device, config):
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one pass, one host read
        if lo < 0 or hi >= config.vocab_size:
            raise ModelError(
                f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {config.vocab_size}); "
                "check the tokenizer matches the model's vocab_size"
            )


def _check_mask(config: ModelConfig, mask: Any, want: tuple[int, int], static: bool, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or tuple(mask.shape) != want:
        what = "[batch, seq_len] (a static cache keeps the past's padding)" if static else "[batch, past + seq_len]"
        raise ModelError(f"attention_mask must have shape {want} {what}, got {_shape(mask)}")
    if mask.dtype.is_complex:
        raise ModelError(f"attention_mask must hold 0 / 1 (bool, int or float), got {mask.dtype}")
    if host_checks(device, config) and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        odd = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ModelError(
            f"attention_mask must hold only 0 (padding) and 1 (token), found {odd!r}; "
            "build it with (ids != pad_id).long()"
        )


def _check_positions(config: ModelConfig, position_ids: Any, b: int, t: int, device: torch.device) -> None:
    if position_ids is None:
        return
    if (
        not isinstance(position_ids, Tensor)
        or position_ids.dim() != 2
        or position_ids.shape[1] != t
        or (position_ids.shape[0] not in (1, b))
    ):
        raise ModelError(f"position_ids must have shape ({b}, {t}) or (1, {t}), got {_shape(position_ids)}")
    if position_ids.dtype not in ID_DTYPES:
        raise ModelError(f"position_ids must be int64 or int32, got {position_ids.dtype}; convert with .long()")
    if host_checks(device, config):
        lo, hi = torch.stack(torch.aminmax(position_ids)).tolist()
        if lo < 0 or hi >= config.max_position_embeddings:
            raise ModelError(
                f"position_ids hold {lo if lo < 0 else hi}, outside [0, max_position_embeddings="
                f"{config.max_position_embeddings})"
            )


def check_cache(cache: Any, num_layers: int, batch: int) -> None:
    """``past_key_values`` is this model's cache (one entry per layer) for a batch of ``batch`` rows."""
    if cache is None:
        return
    if not isinstance(cache, Sequence) or not hasattr(cache, "length") or not hasattr(cache, "static"):
        raise ModelError(
            f"past_key_values must be the Cache a forward with use_cache=True returned (or "
            f"model.allocate_cache(...)), got {type(cache).__name__}"
        )
    if len(cache) != num_layers:
        raise ModelError(
            f"past_key_values has {len(cache)} layers, this model {num_layers}: it belongs to another "
            "model; allocate one with model.allocate_cache(batch, capacity)"
        )
    for i, layer in enumerate(cache):  # every layer's: a hybrid's layers hold caches of different kinds
        rows = getattr(layer, "batch_size", None)
        if isinstance(rows, int) and rows != batch:
            raise ModelError(
                f"past_key_values layer {i} holds {rows} rows, input_ids {batch}; use a cache allocated for this "
                "batch size"
            )


def check_labels(labels: Any, input_ids: Tensor, per_token: bool, classes: int, values: bool) -> None:
    """Labels [B, T] of token ids (language modelling, ``per_token``) or [B] class indices, integer, in
    [0, classes) or IGNORE_INDEX; the values are read (once, on the host) only when ``values`` (host_checks)."""
    b, t = input_ids.shape
    want = (b, t) if per_token else (b,)
    what = "[batch, seq_len] token ids" if per_token else "[batch] class indices"
    if not isinstance(labels, Tensor) or tuple(labels.shape) != want:
        raise ModelError(f"labels must have shape {want} ({what}), got {_shape(labels)}")
    if labels.dtype not in ID_DTYPES:
        raise ModelError(f"labels must be int64 or int32, got {labels.dtype}; convert with labels.long()")
    if values and labels.numel():
        bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= classes))]
        if bad.numel():
            raise ModelError(
                f"labels hold {int(bad[0])}, outside [0, {classes}) (or {IGNORE_INDEX}: ignored); "
                "check the labels match the model's " + ("vocab_size" if per_token else "num_classes")
            )
