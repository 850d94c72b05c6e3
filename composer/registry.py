"""One registry per component family, filled by decorators, plugins and dotted paths.

    from composer.registry import ATTENTION

    @ATTENTION.register("my_attention", config=MyAttentionConfig)
    class MyAttention(nn.Module): ...

A YAML ``type:`` is looked up in three places, in order: names registered with the
decorator (the built-in components register on first lookup), entry points in the
``composer.components`` group (``attention.my_attn = my_pkg.attn:MyAttention``), and a
dotted import path (``type: my_pkg.attn.MyAttention``). The component's options are the
fields of its ``Config`` dataclass; a built component is checked against its family's
``typing.Protocol`` before the model uses it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from torch import nn

from components import protocols
from components.protocols import BuildContext, ComponentConfig

from .errors import ConfigError, Problem

ENTRY_POINT_GROUP = "composer.components"


@dataclass(frozen=True)
class Entry:
    """A registered component: its name, class, options dataclass and one-line summary."""

    name: str
    cls: type
    config: type
    description: str


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """Name -> component for one family (attention, ffn, norm, position, head, block)."""

    def __init__(self, family: str, protocol: type):
        self.family = family
        self.protocol = protocol
        self._entries: dict[str, Entry] = {}
        self._dotted: dict[str, Entry] = {}

    # ---------------------------------------------------------------- registration
    def register(self, name: str, *, config: type | None = None, description: str | None = None):
        """Class decorator: register ``cls`` under ``name`` with options ``config``."""

        def decorate(cls: type) -> type:
            cfg = config or getattr(cls, "Config", ComponentConfig)
            if not (dataclasses.is_dataclass(cfg) and issubclass(cfg, ComponentConfig)):
                raise TypeError(f"{self.family} '{name}': config must be a ComponentConfig dataclass")
            if name in self._entries and self._entries[name].cls is not cls:
                raise ValueError(f"{self.family} '{name}' is already registered")
            self._entries[name] = Entry(name, cls, cfg, description or _summary(cfg) or _summary(cls))
            return cls

        return decorate

    # ---------------------------------------------------------------- lookup
    def names(self) -> list[str]:
        _load_builtins()
        _load_entry_points()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except ConfigError:
            return False

    def get(self, name: str, path: str = "") -> Entry:
        """The entry for ``name``; a ConfigError listing the known names otherwise."""
        path = path or f"model.{self.family}.type"
        _load_builtins()
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        _load_entry_points()
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        if isinstance(name, str) and "." in name:
            return self._from_dotted_path(name, path)
        known = sorted(self._entries)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            [
                Problem(
                    path,
                    f"unknown {self.family} type {name!r}",
                    f"{hint}registered {self.family} types: {', '.join(known)}; "
                    "or give a plugin's dotted path (my_pkg.module.Class)",
                )
            ]
        )

    def _from_dotted_path(self, dotted: str, path: str) -> Entry:
        module_name, _, attr = dotted.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # ImportError, a bad path ('.x'), or the module's own code failing
            raise ConfigError(
                [
                    Problem(
                        path,
                        f"cannot import {self.family} plugin {dotted!r} ({exc})",
                        "check the module is installed and the class name is spelled right",
                    )
                ]
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(
                [Problem(path, f"{dotted!r} is not an nn.Module subclass", "point type: at a torch.nn.Module class")]
            )
        # Kept apart from the registered names: a dotted path is not advertised in catalogues
        # or "registered types" lists (and a class that then fails its build leaves no trace).
        if dotted not in self._dotted:
            cfg = getattr(cls, "Config", ComponentConfig)
            if not (dataclasses.is_dataclass(cfg) and issubclass(cfg, ComponentConfig)):
                raise ConfigError(
                    [
                        Problem(
                            path,
                            f"{dotted}.Config must be a dataclass subclassing components.protocols.ComponentConfig",
                            "declare its options there",
                        )
                    ]
                )
            self._dotted[dotted] = Entry(dotted, cls, cfg, _summary(cfg) or _summary(cls))
        return self._dotted[dotted]

    # ---------------------------------------------------------------- building
    def build(self, cfg: ComponentConfig, ctx: BuildContext, path: str = "") -> nn.Module:
        """Construct the component ``cfg.type`` and check it implements the family interface."""
        entry = self.get(cfg.type, path)
        try:
            module = entry.cls(cfg, ctx)
        except TypeError as exc:  # a class that is not built as Component(cfg, ctx)
            raise ConfigError(
                [
                    Problem(
                        path or f"model.{self.family}.type",
                        f"{entry.cls.__module__}.{entry.cls.__qualname__}(cfg, ctx) failed ({exc})",
                        "a component's __init__ takes its Config and the BuildContext (see components/protocols.py)",
                    )
                ]
            ) from exc
        missing = interface_gaps(module, self.protocol)
        if missing:
            raise ConfigError(
                [
                    Problem(
                        path or f"model.{self.family}.type",
                        f"{entry.cls.__module__}.{entry.cls.__qualname__} does not implement the "
                        f"{self.family} interface ({self.protocol.__module__}.{self.protocol.__name__}): "
                        + "; ".join(missing),
                        "add the missing members (see components/protocols.py)",
                    )
                ]
            )
        return module


def interface_gaps(obj: Any, protocol: type) -> list[str]:
    """What ``obj`` lacks of ``protocol``: missing attributes, methods, or method parameters."""
    gaps = [
        f"missing attribute '{name}'" for name in getattr(protocol, "__annotations__", {}) if not hasattr(obj, name)
    ]
    return gaps + list(_method_gaps(type(obj), protocol))


@functools.cache
def _method_gaps(cls: type, protocol: type) -> tuple[str, ...]:
    """Missing methods / parameters of a class (cached: ``inspect.signature`` is slow)."""
    gaps = []
    for name, member in vars(protocol).items():
        if name.startswith("_") or not callable(member):
            continue
        impl = getattr(cls, name, None)
        if impl is None or not callable(impl):
            gaps.append(f"missing method '{name}()'")
            continue
        want = [p for p in inspect.signature(member).parameters if p != "self"]
        try:
            have = inspect.signature(impl).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind == p.VAR_POSITIONAL for p in have.values()):
            continue
        lacking = [p for p in want if p not in have]
        if lacking:
            gaps.append(f"'{name}()' lacks parameter(s) {', '.join(lacking)}")
    return tuple(gaps)


ATTENTION = Registry("attention", protocols.Attention)
FFN = Registry("ffn", protocols.FeedForward)
NORM = Registry("norm", protocols.Norm)
POSITION = Registry("position", protocols.PositionEncoding)
HEAD = Registry("head", protocols.Head)
BLOCK = Registry("block", protocols.Block)
FAMILIES: dict[str, Registry] = {r.family: r for r in (ATTENTION, FFN, NORM, POSITION, HEAD, BLOCK)}

_state = {"builtins": False, "entry_points": False}


def _load_builtins() -> None:
    if not _state["builtins"]:
        _state["builtins"] = True
        import components

        for name in components.BUILTIN_MODULES:
            importlib.import_module(f"components.{name}")


def _load_entry_points() -> None:
    """Register plugins advertised as ``<family>.<name> = module:Class`` entry points."""
    if _state["entry_points"]:
        return
    _state["entry_points"] = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        family, _, name = ep.name.partition(".")
        if family not in FAMILIES or not name:
            raise ConfigError(
                [
                    Problem(
                        f"entry point {ep.name!r} ({ep.value})",
                        "is not named <family>.<name>",
                        f"name it one of {', '.join(f + '.<name>' for f in FAMILIES)}",
                    )
                ]
            )
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others' names
            raise ConfigError(
                [Problem(f"entry point {ep.name!r}", f"failed to load ({exc})", "fix or uninstall the plugin package")]
            ) from None
        FAMILIES[family].register(name)(cls)


def reload_entry_points() -> None:
    """Look for entry-point plugins again (after installing one in a running process)."""
    _state["entry_points"] = False
    _load_entry_points()
