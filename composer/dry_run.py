"""One forward pass on the meta device for a model built with plugins: a component that fails or returns
the wrong thing is named when the model is built, not at its first real call (nothing is allocated).

Shapes: C hidden size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import ComposerError, ConfigError, Problem

BUILTIN_PACKAGES = ("components", "composer", "torch")


def _plugins(module: nn.Module) -> list[str]:
    return sorted(
        {
            f"{type(m).__module__}.{type(m).__qualname__}"
            for m in module.modules()
            if type(m).__module__.split(".")[0] not in BUILTIN_PACKAGES
        }
    )


@torch.no_grad()
def dry_forward(model: Any) -> None:  # a ComposedModel (this module sits below it)
    """One forward pass on the meta device when a plugin takes part, so a component that returns the
    wrong thing (or fails) is named when the model is built, not at its first real call."""
    if not _plugins(model):
        return
    ids = torch.zeros(1, 2, dtype=torch.long, device="meta")
    shared = model._shared_inputs(ids, None, None, None, 0)
    hidden = model._embed(ids, shared.position_ids)  # [1, 2, C]
    for i, (layer, inputs) in enumerate(zip(model.layers, model._layer_inputs(shared, None), strict=True)):
        out = _dry_call(f"model.layers[{i}]", layer, hidden, inputs, None, False)
        if not (
            isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], Tensor) and out[0].shape == hidden.shape
        ):
            raise _dry_failure(
                f"model.layers[{i}]",
                layer,
                f"returned {_describe(out)}",
                "a block returns (hidden [B, T, C], cache or None, aux loss or None)",
            )
        hidden = out[0]
    logits = _dry_call("model.head", model.head, hidden, None)
    if not isinstance(logits, Tensor):
        raise _dry_failure("model.head", model.head, f"returned {_describe(logits)}", "a head returns a logits tensor")


def _dry_call(path: str, module: nn.Module, *args: Any) -> Any:
    try:
        return module(*args)
    except ComposerError:
        raise
    except Exception as exc:  # a plugin's forward failing: name it, whatever it raised
        raise _dry_failure(path, module, f"failed ({type(exc).__name__}: {exc})", "fix its forward") from None


def _dry_failure(path: str, module: nn.Module, what: str, fix: str) -> ConfigError:
    return ConfigError(
        [
            Problem(
                path,
                f"a dry forward on the meta device {what} (plugins here: {', '.join(_plugins(module)) or 'none'})",
                fix,
            )
        ]
    )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple):
        return f"a tuple ({', '.join(_describe(v) for v in value)})"
    return f"a {type(value).__name__}"
