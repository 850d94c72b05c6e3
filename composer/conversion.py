"""Typed conversion of plain data (YAML, JSON) into option dataclasses, with every problem reported by
its full path: the types of the fields, their choices and bounds, finite floats and the documented size
limits.

Size limits: an option with ``bound="<name>"`` may not exceed ``SIZE_LIMITS[name]`` (a few bytes of
config must not ask for terabytes or hours: ``num_layers: 200000``, ``vocab_size: 2**62``). A real model
that needs more raises the limit in its own config: ``limits: {hidden_size: 131072}``. Float options are
finite unless their field says ``finite=False``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .contract.options import did_you_mean
from .contract.registry import FAMILIES
from .errors import ConfigError, Problem

MISSING_MARK = "???"  # OmegaConf's mark for a mandatory value
FLOAT32_MAX = 3.4028234663852886e38  # a float option is finite in the dtype the model computes in
SIZE_LIMITS = {  # documented in the README ("Limits"); raise one with model.limits.<name>=<value>
    "vocab_size": 2**22,  # 4,194,304 (Gemma 3: 262,144)
    "hidden_size": 2**16,  # 65,536 (Llama 3.1 405B: 16,384)
    "num_layers": 1024,  # (Llama 3.1 405B: 126)
    "num_heads": 1024,  # query or key/value heads (Llama 3.1 405B: 128)
    "head_dim": 2048,  # (Gemma 2: 256)
    "intermediate_size": 2**20,  # 1,048,576 (Llama 3.1 405B: 53,248)
    "max_position_embeddings": 2**24,  # 16,777,216 tokens (Llama 4 Scout: 10M)
    "num_experts": 4096,  # (DeepSeek-V3: 256)
    "num_classes": 2**20,
}
_LIMITS: contextvars.ContextVar[Mapping[str, int]] = contextvars.ContextVar("composer_limits", default=SIZE_LIMITS)


@contextlib.contextmanager
def size_limits(raised: Mapping[str, int]) -> Iterator[None]:
    """While a config is resolved: the documented limits, some raised by the config itself."""
    token = _LIMITS.set({**SIZE_LIMITS, **raised})
    try:
        yield
    finally:
        _LIMITS.reset(token)


def check_limits(raw: Any, path: str, problems: list[Problem]) -> dict[str, int]:
    """The ``limits`` mapping of a model config: known names, integers >= 1."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"expected a mapping of limits, got {raw!r}", "e.g. {hidden_size: 131072}"))
        return {}
    out = {}
    for name, value in raw.items():
        if name not in SIZE_LIMITS:
            problems.append(
                Problem(
                    f"{path}.{name}",
                    "is not a size limit",
                    f"{did_you_mean(name, SIZE_LIMITS)}limits: {', '.join(SIZE_LIMITS)}",
                )
            )
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(Problem(f"{path}.{name}", f"{value!r} must be an integer >= 1", "e.g. 131072"))
        else:
            out[name] = value
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " | ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str, problems: list[Problem], **meta: Any) -> Any:
    """``value`` as type ``tp`` with the option rules of ``meta`` (min, max, choices, bound, finite); problems
    appended under ``path``. The same conversion YAML options get, for values read from elsewhere."""
    return _convert(tp, value, path, problems, meta)


def _convert(tp: Any, value: Any, path: str, problems: list[Problem], meta: Mapping) -> Any:
    """``value`` checked (and lightly coerced) against type ``tp``; problems appended."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, value, path, problems, meta)
    if value is None:
        problems.append(Problem(path, "must not be null", f"set it to a {_type_name(tp)}"))
        return None
    if origin in (list, tuple) or tp in (list, tuple):
        return _convert_list(tp, value, path, problems)
    if origin in (dict, Mapping) or tp is dict:
        return _convert_mapping(value, path, problems)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path, problems)
    return _convert_scalar(tp, value, path, problems, meta)


def _convert_union(tp: Any, value: Any, path: str, problems: list[Problem], meta: Mapping) -> Any:
    """``value`` as the first member of union ``tp`` that takes it (null where the union allows it)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in (a for a in args if a is not type(None)):
        trial: list[Problem] = []
        out = _convert(arg, value, path, trial, meta)
        if not trial:
            return out
        if out is not None:  # the right type with a bad value (range, choices): say that
            problems.extend(trial)
            return out
    hint = f"set {path.rsplit('.', 1)[-1]} to a {_type_name(tp)}"
    problems.append(Problem(path, f"expected {_type_name(tp)}, got {value!r}", hint))
    return None


def _convert_list(tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """A list or tuple ``value`` as a list, each item converted to the item type of ``tp``."""
    if not isinstance(value, (list, tuple)):
        problems.append(Problem(path, f"expected a list, got {value!r}", "write it as [a, b, ...]"))
        return None
    (item,) = typing.get_args(tp) or (Any,)
    return [_convert(item, v, f"{path}[{i}]", problems, {}) for i, v in enumerate(value)]


def _convert_mapping(value: Any, path: str, problems: list[Problem]) -> Any:
    """A mapping ``value`` as a dict (its values unchecked)."""
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"expected a mapping, got {value!r}", "write it as {key: value}"))
        return None
    return dict(value)


def _convert_scalar(tp: Any, value: Any, path: str, problems: list[Problem], meta: Mapping) -> Any:
    """A bool, int (an integral float too), float (an int too) or str ``value``, any value for another type;
    then checked against the option's choices and bounds in ``meta``."""
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX) and meta.get("finite", True):
            problems.append(Problem(path, f"{value!r} is not a finite number (in float32)", "use a finite value"))
            return value
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        name = _type_name(tp)
        problems.append(Problem(path, f"expected {name}, got {type(value).__name__} {value!r}", f"set it to a {name}"))
        return None
    _check_choices_and_bounds(value, path, problems, meta)
    return value


def _check_choices_and_bounds(value: Any, path: str, problems: list[Problem], meta: Mapping) -> None:
    """Problems for a ``value`` outside ``meta``'s choices, below its min or above its max."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = did_you_mean(value, choices)
        problems.append(
            Problem(
                path,
                f"{value!r} is not one of {', '.join(map(str, choices))}",
                f"{hint}use one of {', '.join(map(str, choices))}",
            )
        )
    bound = meta.get("bound")
    if bound is not None and value is not None and value > _LIMITS.get()[bound]:
        limit = _LIMITS.get()[bound]
        problems.append(
            Problem(
                path,
                f"{value:,} is above the size limit {limit:,} ({bound})",
                f"use a smaller value, or raise the limit for a real model that needs it: model.limits.{bound}={value}",
            )
        )
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        problems.append(Problem(path, f"{value!r} is below the minimum {lo}", f"use a value >= {lo}"))
    if hi is not None and value > hi:
        problems.append(Problem(path, f"{value!r} is above the maximum {hi}", f"use a value <= {hi}"))


def _unknown_key(path: str, key: str, known: Iterable[str], what: str) -> Problem:
    known = sorted(known)
    hint = did_you_mean(key, known)
    return Problem(
        f"{path}.{key}" if path else str(key), f"unknown option of {what}", f"{hint}valid options: {', '.join(known)}"
    )


def build_dataclass(cls: type, data: Any, path: str, problems: list[Problem]) -> Any:
    """An instance of dataclass ``cls`` from mapping ``data``; every problem appended."""
    if not isinstance(data, Mapping):
        problems.append(Problem(path, f"expected a mapping, got {data!r}", "write it as {key: value}"))
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            problems.append(_unknown_key(path, key, fields, _describe(cls, data)))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        family = f.metadata.get("family")
        if name not in data or data[name] == MISSING_MARK:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                what = f.metadata.get("help", "")
                problems.append(
                    Problem(sub, "is required", f"set {sub}" + (f" ({what})" if what else ""), missing=True)
                )
            elif family:
                values[name] = build_component(family, _default(f), sub, problems)
            continue
        values[name] = _field_value(f, family, hints[name], data[name], sub, problems)
    try:
        return cls(**values)
    except TypeError:  # a required field missing: already reported; build a placeholder
        obj = object.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(obj, f.name, values.get(f.name, _default(f)))
        return obj


def _default(f: dataclasses.Field, otherwise: Any = None) -> Any:
    """Field ``f``'s default (a fresh one from its factory), else ``otherwise``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return otherwise


def _field_value(f: dataclasses.Field, family: Any, tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """Field ``f``'s value from ``value``: a ``family`` component's config, else ``value`` converted to ``tp``."""
    before = len(problems)
    out = build_component(family, value, path, problems) if family else _convert(tp, value, path, problems, f.metadata)
    if len(problems) > before:  # keep checking the rest against a plausible value
        out = None if family else _default(f, out)
    return out


def _describe(cls: type, data: Mapping) -> str:
    kind = data.get("type") if isinstance(data, Mapping) else None
    return f"'{kind}'" if kind else cls.__name__


def normalize_component(value: Any) -> Any:
    """``"rmsnorm"`` -> ``{"type": "rmsnorm"}``; mappings are copied; other values kept."""
    if isinstance(value, str):
        return {"type": value}
    if isinstance(value, Mapping):
        return dict(value)
    return value


def build_component(family: str, value: Any, path: str, problems: list[Problem]) -> Any:
    """The typed config of the ``family`` component named by ``value['type']``."""
    data = normalize_component(value)
    if not isinstance(data, Mapping):
        problems.append(
            Problem(
                path,
                f"expected a {family} type name or a mapping with 'type', got {value!r}",
                f"write {path}: {{type: <name>, ...}}",
            )
        )
        return None
    kind = data.get("type")
    if not kind or kind == MISSING_MARK:
        names = ", ".join(FAMILIES[family].names())
        problems.append(Problem(f"{path}.type", f"no {family} type given", f"set it to one of: {names}", missing=True))
        return None
    try:
        entry = FAMILIES[family].get(kind, f"{path}.type")
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None
    return build_dataclass(entry.config, _drop_untouched_defaults(family, entry, data), path, problems)


def _drop_untouched_defaults(family: str, entry: Any, data: Mapping) -> Mapping:
    """Options the new type does not have, left at another built-in type's default, are leftovers
    of a type switch (``model.attention.type=my_pkg.Attn`` over a preset's ``mha`` group) and are
    dropped; an option the user actually set stays and is reported as unknown."""
    known = {f.name for f in dataclasses.fields(entry.config)}
    extra = [k for k in data if k not in known]
    if not extra:
        return data
    defaults: dict[str, set] = {}
    for other in FAMILIES[family].entries():
        for f in dataclasses.fields(other.config):
            if f.default is not dataclasses.MISSING:
                defaults.setdefault(f.name, set()).add(repr(f.default))
    return {k: v for k, v in data.items() if k in known or repr(v) not in defaults.get(k, ())}
