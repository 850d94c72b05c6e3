"""One registry per component family, filled by one mechanism: ``register``.

    from composer.contract import ATTENTION

    @ATTENTION.register("my_attention", config=MyAttentionConfig)
    class MyAttention(nn.Module): ...

A YAML ``type:`` is looked up in three places, in order: names registered with the
decorator (the built-in components register when the ``components`` package is imported), entry points in the
``composer.components`` group (``attention.my_attn = my_pkg.attn:MyAttention``), and a
dotted import path (``type: my_pkg.attn.MyAttention``). The component's options are the
fields of its ``Config`` dataclass; a built component is checked against its family's
``typing.Protocol`` before the model uses it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from torch import nn

from ..errors import ComposerError, ConfigError, Problem
from . import protocols
from .options import did_you_mean
from .protocols import BuildContext, ComponentConfig

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
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        _load_entry_points()
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        if isinstance(name, str) and "." in name:
            return self._from_dotted_path(name, path)
        known = sorted(self._entries)
        hint = did_you_mean(name, known)
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
        _refuse_untrusted(self.family, dotted, path)
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
                            f"{dotted}.Config must be a dataclass subclassing composer.contract.ComponentConfig",
                            "declare its options there",
                        )
                    ]
                )
            self._dotted[dotted] = Entry(dotted, cls, cfg, _summary(cfg) or _summary(cls))
        return self._dotted[dotted]

    # ---------------------------------------------------------------- building
    def build(self, cfg: ComponentConfig, ctx: BuildContext, path: str = "", **parts: Any) -> nn.Module:
        """Construct the component ``cfg.type`` (``Component(cfg, ctx, **parts)``: blocks receive their
        built ``attn``, ``ffn`` and ``norms``) and check it implements the family interface."""
        entry = self.get(cfg.type, path)
        path = path or f"model.{self.family}.type"
        where = f"{entry.cls.__module__}.{entry.cls.__qualname__}"
        signature = "(cfg, ctx" + "".join(f", {k}" for k in parts) + ")"
        try:
            module = entry.cls(cfg, ctx, **parts)
        except ComposerError:
            raise
        except TypeError as exc:  # a class that is not built as Component(cfg, ctx)
            raise ConfigError(
                [
                    Problem(
                        path,
                        f"{where}{signature} failed ({exc})",
                        "a component's __init__ takes its Config and the BuildContext "
                        "(see composer/contract/protocols.py)",
                    )
                ]
            ) from exc
        except Exception as exc:  # a plugin's own constructor failing: name it, whatever it raised
            raise ConfigError(
                [
                    Problem(
                        path,
                        f"{where}{signature} raised {type(exc).__name__}: {exc}",
                        "fix the component's options or its constructor",
                    )
                ]
            ) from exc
        missing = interface_gaps(module, self.protocol)
        if missing:
            raise ConfigError(
                [
                    Problem(
                        path,
                        f"{where} does not implement the {self.family} interface "
                        f"({self.protocol.__module__}.{self.protocol.__name__}): " + "; ".join(missing),
                        "add the missing members (see composer/contract/protocols.py)",
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
        if impl is None or not callable(impl) or (name == "forward" and impl is nn.Module.forward):
            gaps.append(f"missing method '{name}()'")  # nn.Module's placeholder forward does not count
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

_state = {"entry_points": False}


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


# ----------------------------------------------------------------------------- untrusted configs
@dataclass(frozen=True)
class _Untrusted:
    source: str  # the file the config came from
    trusted: tuple[str, ...]  # module prefixes the user allows


_UNTRUSTED: contextvars.ContextVar[_Untrusted | None] = contextvars.ContextVar("composer_untrusted", default=None)


@contextlib.contextmanager
def untrusted_config(source: str, trust_plugins: Iterable[str] = ()) -> Iterator[None]:
    """While a config read from ``source`` (a checkpoint's config.json, a safetensors header) is resolved,
    a ``type:`` that is a dotted path is refused unless its module is in ``trust_plugins`` (a package or
    module name, e.g. "my_pkg"): loading a file never imports a module the user did not choose. Registered
    names and installed entry points work as always."""
    token = _UNTRUSTED.set(_Untrusted(source, tuple(str(t) for t in trust_plugins)))
    try:
        yield
    finally:
        _UNTRUSTED.reset(token)


def _refuse_untrusted(family: str, dotted: str, path: str) -> None:
    state = _UNTRUSTED.get()
    if state is None or any(dotted == t or dotted.startswith(t.rstrip(".") + ".") for t in state.trusted):
        return
    package = dotted.split(".")[0]
    raise ConfigError(
        [
            Problem(
                path,
                f"{family} {dotted!r} in {state.source} is a plugin named by its import path; loading a "
                "checkpoint does not import modules it names",
                f"if you trust it, pass trust_plugins=[{package!r}] (composer-export --trust-plugin {package}, "
                f"composer-generate trust_plugin={package}), or install the plugin as an entry point",
            )
        ]
    )
