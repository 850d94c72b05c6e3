"""What the preset tests share: transformers' model of a published configuration built on the meta
device, its total and active parameter counts read from that model itself, and our preset on meta."""

from __future__ import annotations

from typing import Any

import torch

from composer import ComposedModel, compose, load_config


def hf_on_meta(config: Any, model_class: Any = None) -> Any:
    """transformers' causal LM for ``config`` (a PretrainedConfig) on the meta device: nothing allocated.
    ``model_class``: a class of its own (default: AutoModelForCausalLM's choice)."""
    import transformers  # late: optional dependency (the tests importorskip it)

    with torch.device("meta"):
        if model_class is not None:
            return model_class(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def hf_counts(model: Any, top_k: int = 0) -> tuple[int, int]:
    """(total, active) parameters of transformers' ``model`` (tied weights once): active drops, in each
    mixture-of-experts layer (``layer.mlp.experts``), the E - ``top_k`` routed experts a token does not use,
    one expert's size (weights and biases) read from the model's own stacked expert tensors."""
    total = sum(p.numel() for p in model.parameters())
    if not top_k:
        return total, total
    idle = 0
    for layer in model.model.layers:
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None:
            e = experts.num_experts
            idle += (e - top_k) * (sum(p.numel() for p in experts.parameters()) // e)
    return total, total - idle


def preset_on_meta(preset: str, *overrides: str) -> ComposedModel:
    """conf/model/<preset>.yaml composed on the meta device."""
    return compose(load_config([f"model={preset}", *overrides]).model, device="meta")
