"""The ``layer_pattern`` shorthand: a list of layer kinds cycled over the layers, compiled into per-layer
overrides before the model's own ``layers:`` overrides (so the two combine, and an explicit override wins).

    layer_pattern: [gated_deltanet*3, gqa]          # cycled: layers 0-2 gated_deltanet, 3 gqa, 4-6 ...
    layer_pattern: {cycle: [local*5, global], last: [global], exact: false}
    layer_kinds:                                    # named kinds: any layer slots, as in a `layers:` entry
      local: {attention: {type: sliding_window, window: 512}, position: {type: rope, theta: 10000}}
      global: {attention: gqa}
    mixers:                                         # options per mixer type, for every layer of that type
      gated_deltanet: {num_heads: 16, head_dim: 128}

A pattern entry names a kind of ``layer_kinds`` or a registered sequence mixer (``attention`` type);
``name*k`` repeats it k times. The mapping form pins the ``first`` and ``last`` layers and cycles the rest;
``exact: true`` asks that the cycle tile the unpinned layers exactly. Every problem is reported with its
path (unknown names with a did-you-mean); nothing is allocated here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .contract.options import did_you_mean
from .contract.registry import FAMILIES
from .errors import Problem

LAYER_SLOTS = ("block", "attention", "ffn", "norm", "position")
_REPEAT_RE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(?:\*\s*(\d+))?\s*$")
MAX_REPEAT = 1 << 16
MAX_LENGTH = 1 << 16  # pattern entries after expansion (the size limit on num_layers is far lower)


def compile_pattern(raw: Mapping, num_layers: int, path: str, problems: list[Problem]) -> list[tuple[list, dict, str]]:
    """The pattern of model config ``raw`` as override entries ``(layer indices, {slot: value}, path)``,
    one per kind used, in the order kinds first appear. Problems are appended to ``problems``."""
    pattern = raw.get("layer_pattern")
    kinds, named = _kinds(raw.get("layer_kinds"), f"{path}.layer_kinds", problems)
    if pattern is None:
        return []
    ppath = f"{path}.layer_pattern"
    names = _layer_names(pattern, num_layers, ppath, named, problems)
    if any(name not in kinds and not _is_mixer(name) for name, _ in names):  # a kind with a problem
        return []
    entries: dict[str, tuple[list, dict, str]] = {}
    for layer, (name, where) in enumerate(names):
        if name not in entries:
            given = kinds.get(name, {"attention": {"type": name}})
            entries[name] = ([], given, f"{path}.layer_kinds.{name}" if name in kinds else where)
        entries[name][0].append(layer)
    return list(entries.values())


def shared_mixer_options(raw: Mapping, path: str, problems: list[Problem]) -> dict[str, dict]:
    """``mixers``: {mixer type: options}, checked (registered types, mappings without a `type`)."""
    mixers = raw.get("mixers") or {}
    if not isinstance(mixers, Mapping):
        problems.append(Problem(f"{path}.mixers", f"expected a mapping, got {mixers!r}", _MIXERS_FIX))
        return {}
    out = {}
    for name, options in mixers.items():
        where = f"{path}.mixers.{name}"
        if not _is_mixer(name):  # (a key that is not a string is not a registered name either)
            problems.append(Problem(where, f"'{name}' is not a registered sequence mixer", _mixer_fix(name)))
        elif not isinstance(options, Mapping) or "type" in options:
            problems.append(Problem(where, f"expected a mapping of {name} options, got {options!r}", _MIXERS_FIX))
        else:
            out[str(name)] = dict(options)
    return out


_MIXERS_FIX = "write mixers: {gated_deltanet: {num_heads: 16}, ...} (the type is the key)"


def _is_mixer(name: Any) -> bool:
    return isinstance(name, str) and name in FAMILIES["attention"].names()


def _mixer_fix(name: Any) -> str:
    known = FAMILIES["attention"].names()
    return f"{did_you_mean(str(name), known)}registered mixers: {', '.join(known)}"


def _kinds(raw: Any, path: str, problems: list[Problem]) -> tuple[dict[str, dict], set[str]]:
    """The well-formed kinds, and the names of all (a pattern naming a kind with a problem is not
    reported again as unknown)."""
    if raw is None:
        return {}, set()
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"expected a mapping of named layer kinds, got {raw!r}", _KINDS_FIX))
        return {}, set()
    out = {}
    for name, slots in raw.items():
        where = f"{path}.{name}"
        if not isinstance(slots, Mapping) or not slots:
            problems.append(Problem(where, f"expected a mapping of layer slots, got {slots!r}", _KINDS_FIX))
            continue
        bad = [s for s in slots if s not in LAYER_SLOTS]
        for s in bad:
            hint = f"{did_you_mean(str(s), LAYER_SLOTS)}slots: {', '.join(LAYER_SLOTS)}"
            problems.append(Problem(f"{where}.{s}", "is not a layer slot", hint))
        if not bad:
            out[str(name)] = dict(slots)
    return out, {str(k) for k in raw}


_KINDS_FIX = "write layer_kinds: {local: {attention: {type: sliding_window, window: 512}}, ...}"


def _layer_names(pattern: Any, n: int, path: str, kinds: set, problems: list[Problem]) -> list[tuple[str, str]]:
    """(kind name, path of its pattern entry) for each of the ``n`` layers ([] after a problem)."""
    if isinstance(pattern, (list, tuple, str)):
        pattern = {"cycle": pattern}
    if not isinstance(pattern, Mapping):
        problems.append(Problem(path, f"expected a list of layer kinds, got {pattern!r}", _PATTERN_FIX))
        return []
    unknown = [k for k in pattern if k not in ("cycle", "first", "last", "exact")]
    for k in unknown:
        problems.append(Problem(f"{path}.{k}", "is not a pattern key", "use cycle, first, last and exact"))
    n_before = len(problems)
    parts = {k: _expand(pattern.get(k, []), f"{path}.{k}", kinds, problems) for k in ("first", "cycle", "last")}
    exact = pattern.get("exact", False)
    if not isinstance(exact, bool):
        problems.append(Problem(f"{path}.exact", f"expected true or false, got {exact!r}", "write exact: true"))
    if len(problems) > n_before:
        return []
    first, cycle, last = parts["first"], parts["cycle"], parts["last"]
    middle = n - len(first) - len(last)
    if middle < 0:
        problems.append(
            Problem(path, f"pins {len(first) + len(last)} layers but the model has {n}", "pin fewer layers")
        )
        return []
    if middle and not cycle:
        problems.append(Problem(f"{path}.cycle", f"is empty but {middle} layers are not pinned", _PATTERN_FIX))
        return []
    if exact is True and cycle and middle % len(cycle):
        problems.append(
            Problem(
                f"{path}.cycle",
                f"{len(cycle)} kinds do not tile {middle} layers exactly (exact: true)",
                f"use a number of layers where {middle} becomes a multiple of {len(cycle)}, or exact: false",
            )
        )
        return []
    return first + [cycle[i % len(cycle)] for i in range(middle)] + last


_PATTERN_FIX = "write layer_pattern: [gated_deltanet*3, gqa] or {cycle: [...], first: [...], last: [...]}"


def _expand(entries: Any, path: str, kinds: set, problems: list[Problem]) -> list[tuple[str, str]]:
    """Pattern entries with ``name*k`` expanded; each name must be a kind or a registered mixer."""
    if isinstance(entries, str):
        entries = [e for e in entries.split(",") if e.strip()]
    if not isinstance(entries, (list, tuple)):
        problems.append(Problem(path, f"expected a list of layer kinds, got {entries!r}", _PATTERN_FIX))
        return []
    out: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        m = _REPEAT_RE.match(entry) if isinstance(entry, str) else None
        if m is None or (m.group(2) is not None and not 1 <= int(m.group(2)) <= MAX_REPEAT):
            problems.append(
                Problem(
                    where, f"invalid pattern entry {entry!r}", f"write a kind name, or name*k (1 <= k <= {MAX_REPEAT})"
                )
            )
            continue
        name = m.group(1)
        if name not in kinds and not _is_mixer(name):
            known = sorted(kinds) + sorted(FAMILIES["attention"].names())
            hint = f"{did_you_mean(name, known)}known: {', '.join(known)}"
            problems.append(Problem(where, f"'{name}' is neither a layer kind nor a registered sequence mixer", hint))
            continue
        out.extend([(name, where)] * int(m.group(2) or 1))
        if len(out) > MAX_LENGTH:
            problems.append(Problem(where, f"expands to more than {MAX_LENGTH} layers", "use fewer repeats"))
            return []
    return out
