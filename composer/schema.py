"""Typed, nested validation of model configs, with every problem reported by its full path.

A model config arrives as a plain mapping (a composed Hydra node, a dict, a saved
``config.json``). :func:`resolve_model_config` turns it into a :class:`ModelConfig` whose
component slots hold the typed config dataclass of the registered component they name,
checks types, unknown keys (with a did-you-mean), cross-field rules and per-layer
overrides, fills inherited values (``dropout: null`` takes ``model.dropout``), and raises
one :class:`~composer.errors.ConfigError` listing every problem found. Nothing is
allocated here.

The checker is hand-written rather than OmegaConf's structured configs because those stop
at the first error and cannot express type-dependent schemas (the options of ``attention``
depend on its ``type``, and may change per layer).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import components  # noqa: F401  (registers the built-in components)

from .contract.options import Checker, check_probability, did_you_mean, inherit, option  # noqa: F401 (re-exported)
from .contract.registry import FAMILIES
from .conversion import (  # noqa: F401  (re-exported: the conversion's names were schema's)
    MISSING_MARK,
    SIZE_LIMITS,
    _convert,
    _type_name,
    build_component,
    build_dataclass,
    check_limits,
    normalize_component,
    size_limits,
)
from .errors import ConfigError, Problem
from .layer_pattern import compile_pattern, shared_mixer_options

log = logging.getLogger("composer")

COMPONENT_SLOTS = ("block", "attention", "ffn", "norm", "position", "head")
LAYER_SLOTS = ("block", "attention", "ffn", "norm", "position")
_CHECKPOINT_RE = re.compile(r"^(none|every_layer|every_(\d+)|attention|ffn)$")


# --------------------------------------------------------------------------- the model schema
@dataclass
class LayerOverride:
    """Components that differ on chosen layers. ``select``: a slice ("1::2", "-4:"), an index,
    or a list of indices."""

    select: Any = option(help="which layers: slice string like '1::2', an index, or a list of indices")
    block: Any = option(None, help="block override (a type name or {type: ..., options})")
    attention: Any = option(None, help="attention override")
    ffn: Any = option(None, help="feed-forward override")
    norm: Any = option(None, help="normalization override")
    position: Any = option(None, help="position-encoding override")


@dataclass
class LayerSpec:
    """The resolved components of one layer."""

    index: int
    block: Any
    attention: Any
    ffn: Any
    norm: Any
    position: Any


@dataclass
class ModelConfig:
    """A whole model: sizes, one config per component family, and per-layer overrides."""

    vocab_size: int = option(help="vocabulary size (rows of the embedding)", min=1, bound="vocab_size")
    hidden_size: int = option(help="width of the residual stream", min=1, bound="hidden_size")
    num_layers: int = option(help="number of blocks", min=1, bound="num_layers")
    num_heads: int = option(help="attention heads (default for every layer)", min=1, bound="num_heads")
    max_position_embeddings: int = option(
        help="longest sequence the model accepts", min=1, bound="max_position_embeddings"
    )
    dropout: float = option(0.0, help="sets every dropout whose own value is null", min=0.0)
    block: Any = option("pre_norm", help="block wiring", family="block")
    attention: Any = option("mha", help="sequence mixer", family="attention")
    ffn: Any = option("mlp", help="feed-forward network", family="ffn")
    norm: Any = option("layernorm", help="normalization", family="norm")
    position: Any = option("learned", help="position encoding", family="position")
    head: Any = option("lm", help="output head", family="head")
    tie_embeddings: bool = option(True, help="share the language-model head's weight with the input embedding")
    embedding_norm: bool = option(False, help="normalize the embeddings (BERT-style post-norm models)")
    embedding_scale: str | None = option(
        None, help="scale the embeddings: null (no) | sqrt (times sqrt(hidden_size): Gemma)", choices=("sqrt",)
    )
    layers: list = option([], help="per-layer overrides: [{select: '1::2', attention: {...}}, ...]")
    layer_pattern: Any = option(
        None, help="layer kinds cycled over the layers: [gated_deltanet*3, gqa] or {cycle, first, last, exact}"
    )
    layer_kinds: dict = option({}, help="named kinds for layer_pattern: {local: {attention: {...}, position: ...}}")
    mixers: dict = option({}, help="options per sequence-mixer type, for every layer of that type")
    init_std: float = option(0.02, help="std of the normal initialization (at most 1)", min=0.0, max=1.0)
    gradient_checkpointing: str = option(
        "none", help="none | every_layer | every_<k> | attention | ffn (recompute to save memory)"
    )
    pad_vocab_to_multiple_of: int = option(
        1, help="pad embedding rows to a multiple (padding logits masked)", min=1, bound="vocab_size"
    )
    check_inputs_on_accelerator: bool = option(
        False, help="check token ids are in range on GPUs too (costs a host sync per forward)"
    )
    name: str = option("", help="preset name, for display")
    limits: dict = option(
        {}, help="raise a documented size limit for a real model that needs it: {hidden_size: 131072}"
    )

    def __post_init__(self) -> None:
        self._layer_specs: list[LayerSpec] = []

    # ---------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple_of
        return -(-self.vocab_size // m) * m

    def layer(self, i: int) -> LayerSpec:
        """The resolved components of layer ``i``."""
        return self._layer_specs[i]

    def layer_specs(self) -> list[LayerSpec]:
        return list(self._layer_specs)

    def checkpointed(self, i: int) -> str:
        """What layer ``i`` recomputes in backward: 'none', 'layer', 'attention' or 'ffn'."""
        mode = self.gradient_checkpointing
        if mode == "none":
            return "none"
        if mode in ("attention", "ffn"):
            return mode
        every = 1 if mode == "every_layer" else int(mode.split("_")[1])
        return "layer" if i % every == 0 else "none"

    def to_dict(self) -> dict:
        """The config as plain data (inherited values as null), as saved with checkpoints."""
        return config_to_dict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        """A re-validated copy with top-level fields changed (``cfg.replace(num_layers=2)``)."""
        data = self.to_dict()
        data.update(changes)
        return resolve_model_config(data)


def config_to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        inherited = obj.__dict__.get("_inherited", set())
        return {
            f.name: (None if f.name in inherited else config_to_dict(getattr(obj, f.name)))
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return obj


TYPE_OVERRIDE_RE = re.compile(r"^\+?model\.(block|attention|ffn|norm|position|head)\.type=")


def leftover_options(model: Mapping, overrides: list[str]) -> list[tuple[str, str]]:
    """(slot, option) for the options a preset set for a component whose type an override changes
    (``model.ffn.type=moe`` on ``tiny``: its ``multiple_of``) that the new type does not have. Options an
    override sets itself are kept (and reported by the schema if the new type lacks them)."""
    given = {o.lstrip("+~").partition("=")[0] for o in overrides}
    out = []
    for o in overrides:
        m = TYPE_OVERRIDE_RE.match(o)
        node = model.get(m.group(1)) if m else None
        if not isinstance(node, Mapping) or not isinstance(node.get("type"), str):
            continue
        try:
            known = {f.name for f in dataclasses.fields(FAMILIES[m.group(1)].get(node["type"]).config)}
        except ConfigError:
            continue  # an unknown type: the schema names it
        out += [(m.group(1), k) for k in node if k not in known and f"model.{m.group(1)}.{k}" not in given]
    return out


def parse_select(select: Any, num_layers: int, path: str, problems: list[Problem]) -> list[int]:
    """Layer indices for a ``select``: "a:b:c" slice, an int, or a list of ints (negatives count
    from the end)."""
    fix = f"use a slice like '1::2', an index in [-{num_layers}, {num_layers}), or a list of them"
    if isinstance(select, bool):
        problems.append(Problem(path, f"invalid layer selection {select!r}", fix))
        return []
    if isinstance(select, int):
        select = [select]
    if isinstance(select, str):
        parts = select.split(":")
        if len(parts) == 1 and re.fullmatch(r"-?\d+", parts[0].strip()):
            select = [int(parts[0])]
        elif 2 <= len(parts) <= 3 and all(re.fullmatch(r"\s*(-?\d+)?\s*", p) for p in parts):
            nums = [int(p) if p.strip() else None for p in parts]
            if len(nums) == 3 and nums[2] == 0:
                problems.append(Problem(path, "slice step must not be zero", fix))
                return []
            out = list(range(num_layers))[slice(*nums)]
            if not out:
                problems.append(Problem(path, f"{select!r} selects no layer of {num_layers}", fix))
            return out
        else:
            problems.append(Problem(path, f"invalid layer selection {select!r}", fix))
            return []
    if not isinstance(select, (list, tuple)) or not select:
        problems.append(Problem(path, f"invalid layer selection {select!r}", fix))
        return []
    out = []
    for i, idx in enumerate(select):
        if isinstance(idx, bool) or not isinstance(idx, int):
            problems.append(Problem(f"{path}[{i}]", f"layer index must be an integer, got {idx!r}", fix))
        elif not -num_layers <= idx < num_layers:
            problems.append(
                Problem(f"{path}[{i}]", f"layer {idx} does not exist (the model has {num_layers} layers)", fix)
            )
        else:
            out.append(idx % num_layers)
    return sorted(set(out))


def _field_defaults(family: str, kind: Any) -> dict[str, Any]:
    """{option: default} of the ``family`` component ``kind`` ({} for an unknown one: reported elsewhere)."""
    try:
        config = FAMILIES[family].get(kind).config
    except (ConfigError, TypeError):
        return {}
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = dataclasses.MISSING  # required: known, never equal to a value
    return out


def _merge_override(family: str, base_data: Mapping, override: Any, shared: Mapping = {}) -> dict:  # noqa: B006
    """Override options on top of a component's options. When the type changes, the options set on the
    base that the new type also has carry over (not the old type's defaults, nor what it took from
    ``shared``, ``model.mixers``: those are the old type's), the others are dropped, and the new type's
    ``shared`` options come on top of them."""
    override = normalize_component(override)
    if not isinstance(override, Mapping):
        return override  # reported by build_component (expected a type name or a mapping)
    if not isinstance(base_data, Mapping):  # an earlier override of this layer was not a mapping
        base_data = {}
    kind, old = override.get("type", base_data.get("type")), base_data.get("type")
    if kind != old:
        known = set(_field_defaults(family, kind))
        # what stays with the old type: its defaults and the options it took from model.mixers
        own = {**_field_defaults(family, old), **(shared.get(old, {}) if isinstance(old, str) else {})}
        base_data = {k: v for k, v in base_data.items() if k in known and not (k in own and own[k] == v)}
        base_data.update(shared.get(kind, {}) if isinstance(kind, str) else {})
    return {**base_data, **override, "type": kind}


def resolve_model_config(raw: Any, path: str = "model") -> ModelConfig:
    """Validate ``raw`` (mapping, DictConfig or ModelConfig) into a resolved ModelConfig.

    Raises ConfigError (InvalidParameter / MissingParameter) listing every problem.
    """
    if isinstance(raw, ModelConfig):
        raw = raw.to_dict()
    raw = _plain(raw)
    problems: list[Problem] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(
            [
                Problem(
                    path,
                    f"expected a mapping of model options, got {type(raw).__name__}",
                    "pass a model config (e.g. cfg.model from load_config)",
                )
            ]
        )
    with size_limits(check_limits(raw.get("limits"), f"{path}.limits", problems)):
        cfg = _resolve(raw, path, problems)
    if problems:
        raise ConfigError.of(_dedupe(problems))
    return cfg


def _resolve(raw: Mapping, path: str, problems: list[Problem]) -> ModelConfig:
    mixers = shared_mixer_options(raw, path, problems)
    attention = normalize_component(raw.get("attention", "mha"))
    if (
        isinstance(attention, Mapping) and isinstance(attention.get("type"), str) and attention["type"] in mixers
    ):  # the model-wide mixer's shared options
        raw = {**raw, "attention": {**mixers[attention["type"]], **attention}}
    cfg = build_dataclass(ModelConfig, raw, path, problems)
    if not isinstance(cfg, ModelConfig) or "_layer_specs" not in cfg.__dict__:
        cfg.__dict__["_layer_specs"] = []
    check = Checker(path, problems)
    sizes_ok = not any(
        p.path.split(".")[-1] in ("hidden_size", "num_heads", "num_layers", "max_position_embeddings", "vocab_size")
        for p in problems
    )
    _check_model(cfg, check, sizes_ok)
    if sizes_ok:
        for slot in COMPONENT_SLOTS:
            _resolve_component(getattr(cfg, slot), cfg, check.child(slot))
        mixers = {k: v for k, v in mixers.items() if _mixer_ok(cfg, k, v, f"{path}.mixers.{k}", problems)}
        _resolve_layers(cfg, check, compile_pattern(raw, cfg.num_layers, path, problems), mixers)
    return cfg


def _mixer_ok(cfg: ModelConfig, kind: str, options: dict, path: str, problems: list[Problem]) -> bool:
    """``model.mixers.<kind>`` checked on its own, so its problems are named there (and the layers of
    that kind are then checked without it)."""
    n_before = len(problems)
    _layer_component(cfg, "attention", {**options, "type": kind}, path, problems)
    return len(problems) == n_before


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out


def _plain(raw: Any) -> Any:
    """A DictConfig / ListConfig as plain data with interpolations resolved (ConfigError if one fails)."""
    if not type(raw).__module__.startswith("omegaconf"):
        return raw
    from omegaconf import OmegaConf  # late: only an OmegaConf object needs it (and then it is imported already)
    from omegaconf.errors import OmegaConfBaseException  # late: as above

    try:
        return OmegaConf.to_container(raw, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        where = str(getattr(exc, "full_key", "") or "model")
        raise ConfigError(
            [Problem(where, f"cannot resolve interpolation ({getattr(exc, 'msg', exc)})", "fix the ${...} reference")]
        ) from None


def _check_model(cfg: ModelConfig, check: Checker, sizes_ok: bool = True) -> None:
    if sizes_ok and cfg.hidden_size % cfg.num_heads:
        check.fail(
            "hidden_size",
            f"{cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}",
            "make hidden_size a multiple of num_heads",
        )
    if not 0.0 <= cfg.dropout < 1.0:
        check.fail("dropout", f"{cfg.dropout} is outside [0, 1)", "use a probability like 0.1")
    if not _CHECKPOINT_RE.match(str(cfg.gradient_checkpointing)):
        check.fail(
            "gradient_checkpointing",
            f"{cfg.gradient_checkpointing!r} is not a checkpointing mode",
            "use none, every_layer, every_<k> (e.g. every_2), attention or ffn",
        )
    elif re.fullmatch(r"every_0+", cfg.gradient_checkpointing):
        check.fail("gradient_checkpointing", "every_<k> needs k >= 1", "use every_1, every_2, ...")


def _resolve_component(comp: Any, model: ModelConfig, check: Checker) -> None:
    if not dataclasses.is_dataclass(comp):
        return
    hook = getattr(comp, "resolve", None)
    if hook is not None:
        hook(model, check)
    # nested components (an MoE's experts) resolve under their own path
    for f in dataclasses.fields(comp):
        if f.metadata.get("family") and getattr(comp, f.name) is not None:
            _resolve_component(getattr(comp, f.name), model, check.child(f.name))


def _resolve_layers(cfg: ModelConfig, check: Checker, pattern: list, mixers: dict) -> None:
    """Each layer's components: the pattern's kinds first, then the ``layers`` overrides in order."""
    problems = check.problems
    n_before = len(problems)
    entries: list[tuple[list[int], dict, str]] = [(i, _given(g, p, problems), p) for i, g, p in pattern]
    for i, item in enumerate(cfg.layers or []):
        path = check.at(f"layers[{i}]")
        ov = build_dataclass(LayerOverride, item, path, problems)
        if getattr(ov, "select", None) is None:
            if isinstance(item, Mapping) and "select" in item:  # null (a missing one is reported)
                problems.append(
                    Problem(
                        f"{path}.select", "must not be null", "use a slice like '1::2', an index, or a list of indices"
                    )
                )
            continue
        idx = parse_select(ov.select, cfg.num_layers, f"{path}.select", problems)
        given = _given({s: getattr(ov, s) for s in LAYER_SLOTS if getattr(ov, s) is not None}, path, problems)
        if not given and isinstance(item, Mapping):
            problems.append(
                Problem(path, "overrides no component", f"add one of {', '.join(LAYER_SLOTS)} next to select")
            )
        entries.append((idx, given, path))
    resolved: dict[str, Any] = {}
    specs = [_layer_spec(cfg, layer, entries, resolved, mixers, problems) for layer in range(cfg.num_layers)]
    if len(problems) == n_before:
        cfg._layer_specs = specs


def _given(given: dict, path: str, problems: list[Problem]) -> dict:
    """The slots an override names, without those that are neither a type name nor a mapping (reported
    here: a later override of the layer would hide them)."""
    for slot, value in list(given.items()):
        if not isinstance(value, (str, Mapping)):
            problems.append(
                Problem(
                    f"{path}.{slot}",
                    f"expected a {slot} type name or a mapping, got {value!r}",
                    f"write {slot}: {{type: <name>, ...}}",
                )
            )
            del given[slot]
    return given


def _layer_spec(
    cfg: ModelConfig, layer: int, entries: list, resolved: dict, mixers: dict, problems: list[Problem]
) -> LayerSpec:
    """Layer ``layer``: the model's components with the overrides selecting it merged in (each distinct
    merge built once, kept in ``resolved``), checked against each other."""
    comps = {s: getattr(cfg, s) for s in LAYER_SLOTS}
    data: dict[str, Any] = {}
    source: dict[str, str] = {}
    for idx, given, path in entries:
        if layer not in idx:
            continue
        for slot, value in given.items():
            base = data.get(slot, config_to_dict(comps[slot]) or {})
            data[slot] = _merge_override(slot, base, value, mixers if slot == "attention" else {})
            source[slot] = f"{path}.{slot}"
    for slot, merged in data.items():
        key = f"{slot}|{source[slot]}|{merged!r}"
        if key not in resolved:
            resolved[key] = _layer_component(cfg, slot, merged, source[slot], problems)
        comps[slot] = resolved[key]
    spec = LayerSpec(index=layer, **comps)
    slot = "attention" if "attention" in source else "position" if "position" in source else None
    check_layer = getattr(spec.position, "check_layer", None)  # e.g. rope vs this layer's head_dim
    found = check_layer(spec) if slot and check_layer is not None and spec.attention is not None else None
    if found:
        problems.append(Problem(source[slot], *found))
    return spec


def _layer_component(cfg: ModelConfig, slot: str, merged: Any, path: str, problems: list[Problem]) -> Any:
    """The ``slot`` component a layer override merges to, built and resolved; new problems appended."""
    sub_problems: list[Problem] = []
    comp = build_component(slot, merged, path, sub_problems)
    if getattr(comp, "model_wide_only", False):
        sub_problems.append(
            Problem(
                f"{path}.type",
                f"'{comp.type}' cannot differ per layer",
                f"set model.{slot}: {comp.type} for the whole model instead",
            )
        )
    if comp is not None and not sub_problems:
        _resolve_component(comp, cfg, Checker(path, sub_problems))
    problems.extend(p for p in sub_problems if p not in problems)
    return comp
