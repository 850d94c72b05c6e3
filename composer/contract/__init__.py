"""The bottom layer every component builds on: interfaces, the option toolkit, costs and the registries.

It imports nothing of the project but ``composer.errors``; components import only this layer (and
each other). A plugin author needs nothing else:

- ``protocols``: the family interfaces (``typing.Protocol``), their optional members with defaults
  (``MixerBase``, ``FeedForwardBase``, ``HeadBase``, ``BlockBase``, ``PositionBase``), ``BuildContext``
  and ``LayerInputs``
- ``options``:   ``option`` fields, the ``Checker``, ``inherit`` and the shared small checks
- ``cost``:      ``CostCall`` / ``Cost``, what a component answers to ``composer-plan``
- ``registry``:  one ``Registry`` per family (``ATTENTION``, ``FFN``, ``NORM``, ``POSITION``, ``HEAD``,
  ``BLOCK``), filled by ``register``
"""

import importlib
from typing import Any

from ..errors import ConfigError, InvalidParameter, ModelError, Problem

_LAZY = {  # public name -> the contract module defining it (imported on first use: options needs no torch)
    "ATTENTION": "registry",
    "Attention": "protocols",
    "BLOCK": "registry",
    "Block": "protocols",
    "BlockBase": "protocols",
    "BlockConfigBase": "protocols",
    "BuildContext": "protocols",
    "Checker": "options",
    "ComponentConfig": "protocols",
    "Cost": "cost",
    "CostCall": "cost",
    "Costed": "protocols",
    "Entry": "registry",
    "FAMILIES": "registry",
    "FFN": "registry",
    "FeedForward": "protocols",
    "FeedForwardBase": "protocols",
    "HEAD": "registry",
    "Head": "protocols",
    "HeadBase": "protocols",
    "IGNORE_INDEX": "options",
    "LayerCache": "protocols",
    "LayerInputs": "protocols",
    "MixerBase": "protocols",
    "NORM": "registry",
    "Norm": "protocols",
    "NotPlanned": "cost",
    "POSITION": "registry",
    "PositionBase": "protocols",
    "PositionEncoding": "protocols",
    "Registry": "registry",
    "Rotation": "protocols",
    "SequenceMixer": "protocols",
    "check_probability": "options",
    "cost_of": "cost",
    "did_you_mean": "options",
    "inherit": "options",
    "interface_gaps": "registry",
    "is_int": "options",
    "is_number": "options",
    "linear_flops": "cost",
    "mark_residual": "protocols",
    "member": "protocols",
    "option": "options",
    "param_count": "cost",
}

__all__ = [
    "ATTENTION",
    "BLOCK",
    "FAMILIES",
    "FFN",
    "HEAD",
    "IGNORE_INDEX",
    "NORM",
    "POSITION",
    "Attention",
    "Block",
    "BlockBase",
    "BlockConfigBase",
    "BuildContext",
    "Checker",
    "ComponentConfig",
    "ConfigError",
    "Cost",
    "CostCall",
    "Costed",
    "NotPlanned",
    "Entry",
    "FeedForward",
    "FeedForwardBase",
    "Head",
    "HeadBase",
    "InvalidParameter",
    "LayerCache",
    "LayerInputs",
    "MixerBase",
    "ModelError",
    "Norm",
    "PositionBase",
    "PositionEncoding",
    "Problem",
    "Registry",
    "Rotation",
    "SequenceMixer",
    "check_probability",
    "cost_of",
    "did_you_mean",
    "inherit",
    "interface_gaps",
    "is_int",
    "is_number",
    "linear_flops",
    "mark_residual",
    "member",
    "option",
    "param_count",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'composer.contract' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
