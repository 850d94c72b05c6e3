"""Hugging Face interop: import a local Hugging Face model folder, export a composed model to one.

    model = import_hf("path/to/hf_llama")          # config.json + *.safetensors -> ComposedModel
    export_hf(model, "path/to/out")                # -> config.json + model.safetensors for transformers

Families: GPT-2, Llama (incl. Llama 3 rope scaling), Mistral, Qwen2 (llama.py), GPT-NeoX, Qwen3, OLMo 2
and Phi-3 (qwen3.py, olmo2.py, phi3.py; YaRN in rope_scaling.py), Gemma 2 and Gemma 3 text (gemma.py),
gpt-oss (gpt_oss.py), and the others listed in FAMILIES. Each family module holds ONE parameter-name table
used in both directions.
No network access and no ``transformers`` import: configs are read and written as JSON, weights as
safetensors (validated like composer checkpoints: names, shapes and dtypes are checked before any data is
read).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, ModelError, Problem
from ..model import compose, target_device
from ..schema import resolve_model_config
from ..weights import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    TensorInfo,
    atomic_write,
    check_output_folder,
    index_files,
    materialize,
    open_safetensors,
    pickle_hint,
    read_header,
    unique_state,
    write_safetensors,
)
from . import (
    bamba,
    deepseek_v3,
    gemma,
    gpt2,
    gpt_neox,
    gpt_oss,
    llama,
    mamba2,
    mixtral,
    olmo2,
    olmo_hybrid,
    phi3,
    qwen3,
    qwen3_moe,
    qwen3_next,
)
from .common import Exporting, Family, HFConfig, Rule, read_hf_config, routed_experts, to_ours, to_theirs

FAMILIES: tuple[Family, ...] = (
    gpt2.FAMILY,
    llama.FAMILY,
    gpt_neox.FAMILY,
    gemma.FAMILY,
    qwen3.FAMILY,
    olmo2.FAMILY,
    phi3.FAMILY,
    deepseek_v3.FAMILY,
    mamba2.FAMILY,
    bamba.FAMILY,
    olmo_hybrid.FAMILY,
    qwen3_next.FAMILY,
    mixtral.FAMILY,
    qwen3_moe.FAMILY,
    gpt_oss.FAMILY,
)
MODEL_TYPES: dict[str, Family] = {mt: f for f in FAMILIES for mt in f.model_types}
SLOTS = ("block", "attention", "ffn", "norm", "position")

__all__ = ["FAMILIES", "MODEL_TYPES", "export_hf", "import_hf"]


def family_of(c: HFConfig) -> Family:
    family = MODEL_TYPES.get(c.model_type)
    if family is None:
        raise ConfigError(
            [
                Problem(
                    f"{c.path}:model_type",
                    f"'{c.model_type}' is not supported",
                    f"supported model types: {', '.join(sorted(MODEL_TYPES))}",
                )
            ],
            header="cannot import this Hugging Face model",
        )
    return family


# ----------------------------------------------------------------------------- import
def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX_NAME).is_file():
        return index_files(folder / INDEX_NAME)
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            pickle_hint(pickles[0]) + "\nWith transformers: AutoModelForCausalLM.from_pretrained("
            "folder).save_pretrained(out, safe_serialization=True), then import `out`."
        )
    raise CheckpointError(f"{folder} holds no *.safetensors weights beside its config.json")


def _module_of(model: Any, name: str) -> Any:
    """The module a rule's conversion reads its sizes from: the layer's attention, or its feed-forward for
    a feed-forward tensor (gpt_oss.py's fused experts); None for the others."""
    m = re.match(r"layers\.(\d+)\.(attn|ffn)\.", name)
    return getattr(model.layers[int(m.group(1))], m.group(2)) if m else None


def import_hf(directory: Union[str, Path], device: Any = None, dtype: Optional[torch.dtype] = None) -> Any:
    """Build the composed model equivalent to a local Hugging Face model folder, with its weights.

    directory: config.json + model.safetensors (or shards with model.safetensors.index.json)
    device:    where the weights go (default CPU)
    dtype:     cast to this dtype (default: the checkpoint's)
    Raises ConfigError for an unsupported model_type / option, CheckpointError for bad weights.
    """
    dev = str(target_device(device))
    folder = Path(directory)
    c = read_hf_config(folder)
    family = family_of(c)
    raw = family.to_composer(c)
    c.check()
    try:
        cfg = resolve_model_config(raw)
    except ConfigError as exc:
        raise ConfigError(exc.problems, header=f"{c.path} translates to an invalid composer config") from None
    files = _weight_files(folder)
    found: dict[str, tuple[TensorInfo, Path]] = {}
    for f in files:
        for name, info in read_header(f).tensors.items():
            found[name] = (info, f)
    model = compose(cfg, device="meta")
    plan = _plan(family, model, found, str(folder))
    readers = {f: open_safetensors(f, dev) for f in files}
    target = dtype or found[plan[0][1][0]][0].torch_dtype
    state: dict[str, Tensor] = {}
    try:
        for rule, names, attn in plan:
            parts = [readers[found[n][1]].get_tensor(n) for n in names]
            state[rule.ours] = to_ours(rule, parts, attn).to(target)
    except Exception as exc:  # a file changed or damaged after its header was checked
        raise CheckpointError(f"cannot read the weights in {folder}: {exc}") from None
    return materialize(model, state, dev).eval()


def _plan(
    family: Family, model: Any, found: dict[str, tuple[TensorInfo, Path]], where: str
) -> list[tuple[Rule, list[str], Any]]:
    """Match every tensor of ``model`` to Hugging Face names; check presence, shapes and dtypes
    (no data read); one CheckpointError listing every problem."""
    expected = unique_state(model)
    plan, used, missing, lines, mapped = [], set(), [], [], set()
    for rule in family.table(model.config.num_layers, routed_experts(model.config), model.config):
        if rule.ours not in expected:
            continue
        mapped.add(rule.ours)
        attn = _module_of(model, rule.ours)
        wanted = to_theirs(rule, expected[rule.ours], attn)
        plan.append((rule, _match_rule(family, found, rule, wanted, used, missing, lines), attn))
    unmapped = [k for k in expected if k not in mapped]
    if unmapped:  # a table gap: report rather than leave weights uninitialised
        lines.append(f"no {family.name} mapping for: {', '.join(unmapped)}")
    extra = [
        n
        for n in found
        if n not in used and not family.ignored(n) and not (model.tied and n.endswith("lm_head.weight"))
    ]
    _raise_mismatches(where, lines, missing, extra)
    return plan


def _locate(family: Family, found: dict[str, tuple[TensorInfo, Path]], name: str) -> Optional[str]:
    """The checkpoint's name for Hugging Face tensor ``name``: as is, or without the family's prefix (None:
    neither is there)."""
    if name in found:
        return name
    bare = name[len(family.prefix) :] if family.prefix and name.startswith(family.prefix) else None
    return bare if bare in found else None


def _match_rule(
    family: Family,
    found: dict[str, tuple[TensorInfo, Path]],
    rule: Rule,
    wanted: list[Tensor],
    used: set[str],
    missing: list[str],
    lines: list[str],
) -> list[str]:
    """The checkpoint names of ``rule``'s Hugging Face tensors (``wanted``: their expected values, by shape);
    each absent one added to ``missing``, each found one to ``used``, shape and dtype problems to ``lines``."""
    names = []
    for theirs, want in zip(rule.theirs, wanted, strict=True):
        name = _locate(family, found, theirs)
        if name is None:
            missing.append(theirs)
            continue
        used.add(name)
        names.append(name)
        info = found[name][0]
        if info.shape != tuple(want.shape):
            lines.append(f"{name}: shape {list(info.shape)}, config.json implies {list(want.shape)}")
        if not info.torch_dtype.is_floating_point:
            lines.append(f"{name}: dtype {info.dtype}, expected a floating-point dtype")
    return names


def _raise_mismatches(where: str, lines: list[str], missing: list[str], extra: list[str]) -> None:
    """One CheckpointError listing missing tensors, then unexpected ones, then ``lines``; nothing if none."""
    if missing:
        lines.insert(0, f"missing tensors: {', '.join(missing)}")
    if extra:
        lines.insert(1 if missing else 0, f"unexpected tensors: {', '.join(extra)}")
    if lines:
        body = "\n".join(f"  - {line}" for line in lines)
        raise CheckpointError(f"the weights in {where} do not match its config.json ({len(lines)} problems):\n{body}")


# ----------------------------------------------------------------------------- export
def choose_family(cfg: Any) -> tuple[Family, str]:
    """The Hugging Face family and model_type a composition exports as; ConfigError naming every
    component that has no equivalent."""
    problems: list[Problem] = []
    _check_universal(cfg, problems)
    spec = cfg.layer(0)
    types = {slot: getattr(spec, slot).type for slot in SLOTS}

    used = {key for s in cfg.layer_specs() for key, on in attention_features(s.attention).items() if on}
    used |= {key for key, on in model_features(cfg).items() if on}

    def misses(f: Family) -> list[str]:  # the slots, then the attention features, the family lacks
        return [s for s in SLOTS if types[s] not in f.signature[s]] + sorted(used - set(f.options))

    fewest = min(len(misses(f)) for f in FAMILIES)
    nearest = [f for f in FAMILIES if len(misses(f)) == fewest]
    name = str(getattr(cfg, "name", ""))  # an import's or a preset's own family first (phi3_mini: phi3)
    nearest.sort(key=lambda f: not any(name == t or name.startswith(f"{t}_") for t in f.model_types))
    family = nearest[0]
    known = {slot: {t for f in FAMILIES for t in f.signature[slot]} for slot in SLOTS}
    for key in sorted(used - set(family.options)):
        problems.append(
            Problem(
                f"model.{key}" if key in MODEL_FEATURES else f"model.attention.{key}",
                f"does not fit the nearest Hugging Face family, {family.name} (it has no {key})",
                "compose the model like one of the supported families",
            )
        )
    for slot in (s for s in SLOTS if types[s] not in family.signature[s]):
        if types[slot] in known[slot]:  # exists in another family, not in this combination
            problems.append(
                Problem(
                    f"model.{slot}.type",
                    f"'{types[slot]}' does not fit the nearest Hugging Face "
                    f"family, {family.name} (which uses {slot} {' / '.join(family.signature[slot])})",
                    "compose the model like one of the supported families",
                )
            )
    if problems:
        raise ConfigError.of(_unique(problems), header="this model has no Hugging Face equivalent")
    first = None  # the nearest families in order: the first that takes the composition
    for family in nearest:
        e = Exporting(cfg, family.name)
        model_type = family.match(e)
        if not e.problems:
            return family, model_type
        first = first or e
    raise ConfigError.of(_unique(first.problems), header="this model has no Hugging Face equivalent")


def attention_features(a: Any) -> dict[str, bool]:
    """Which attention options beyond the plain defaults ``a`` uses (a family maps those in its
    ``options``; the others have no equivalent there)."""
    return {
        "qk_norm": getattr(a, "qk_norm", False) is not False,
        "logit_softcap": getattr(a, "logit_softcap", None) is not None,
        "causal": not getattr(a, "causal", True),
        "output_gate": getattr(a, "output_gate", "none") != "none",
        "sinks": bool(getattr(a, "sinks", False)),
        "query_pre_attn_scalar": getattr(a, "query_pre_attn_scalar", None) is not None,
    }


MODEL_FEATURES = ("head.logit_softcap", "embedding_scale", "norm.zero_centred", "norm.weight")


def model_features(cfg: Any) -> dict[str, bool]:
    """Which model-wide options beyond the plain defaults ``cfg`` uses, by config path (``MODEL_FEATURES``;
    a family maps those in its ``options``, as the attention features)."""
    norms = [s.norm for s in cfg.layer_specs()]
    return {
        "head.logit_softcap": getattr(cfg.head, "logit_softcap", None) is not None,
        "embedding_scale": getattr(cfg, "embedding_scale", None) is not None,
        "norm.zero_centred": any(getattr(n, "zero_centred", False) for n in norms),
        "norm.weight": any(getattr(n, "weight", True) is False for n in norms),
    }


def _check_universal(cfg: Any, problems: list[Problem]) -> None:
    """Components no supported family has, named by their config path."""
    known = {slot: {t for f in FAMILIES for t in f.signature[slot]} for slot in SLOTS}
    head = cfg.head
    if head.type != "lm":
        problems.append(
            Problem(
                "model.head.type",
                f"'{head.type}' has no Hugging Face causal-LM equivalent",
                "export language models (head: lm)",
            )
        )
    elif head.bias:
        problems.append(Problem("model.head.bias", "the supported families have no LM-head bias", "set head.bias off"))
    if cfg.embedding_norm:
        problems.append(
            Problem(
                "model.embedding_norm", "no supported family normalizes the embeddings", "set embedding_norm: false"
            )
        )
    for spec in cfg.layer_specs():
        for slot in SLOTS:
            comp = getattr(spec, slot)
            where = f"model.{slot}" if comp is getattr(cfg, slot) else f"model.layers (layer {spec.index}) {slot}"
            if comp.type not in known[slot]:
                problems.append(
                    Problem(
                        f"{where}.type",
                        f"'{comp.type}' has no Hugging Face equivalent among the "
                        f"supported families ({', '.join(MODEL_TYPES)})",
                        f"use {slot} {' / '.join(sorted(known[slot]))}",
                    )
                )
        a = spec.attention
        mapped = {k for f in FAMILIES for k in f.options}
        for key, bad in attention_features(a).items():
            if bad and key not in mapped:
                where = "model.attention" if a is cfg.attention else f"model.layers (layer {spec.index}) attention"
                problems.append(
                    Problem(
                        f"{where}.{key}",
                        f"{key}={getattr(a, key)} has no Hugging Face equivalent among the supported families",
                        f"use the default {key}",
                    )
                )


def _unique(problems: list[Problem]) -> list[Problem]:
    return list({str(p): p for p in problems}.values())


def export_hf(
    model: Any,
    directory: Union[str, Path],
    tokenizer: Any = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    sources: tuple = (),
) -> Path:
    """Write ``model`` as a Hugging Face folder (config.json + safetensors [+ tokenizer.json]) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Raises ConfigError naming the
    component that has no equivalent. Refuses a folder that holds a checkpoint unless ``overwrite``, and
    one that is, contains or lies inside any of ``sources`` (the checkpoint it was read from) always.
    Returns the folder."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    cfg = model.config
    family, model_type = choose_family(cfg)
    state = unique_state(model)
    tensors: dict[str, Tensor] = {}
    for rule in family.table(cfg.num_layers, routed_experts(cfg), cfg):
        t = state.pop(rule.ours, None)
        if t is None:
            continue
        pieces = to_theirs(rule, t, _module_of(model, rule.ours))
        for name, piece in zip(rule.theirs, pieces, strict=True):
            if rule.vocab:
                piece = piece[: cfg.vocab_size]  # drop the rows of a padded vocabulary
            tensors[name] = piece.clone() if len(pieces) > 1 or rule.vocab else piece  # no shared storage
    if state:
        raise ModelError(f"parameters with no Hugging Face {family.name} name (hand-made modules?): {', '.join(state)}")
    dtypes = {t.dtype for t in tensors.values()}
    dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    hf = {
        "architectures": [family.model_types[model_type]],
        "model_type": model_type,
        **family.to_hf(cfg, model_type),
        "tie_word_embeddings": bool(model.tied),
        "initializer_range": cfg.init_std,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    folder = check_output_folder(directory, sources, overwrite, option="overwrite=True (--overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, folder, max_shard_size, {"format": "pt"})
    atomic_write(folder / "config.json", json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        atomic_write(folder / "tokenizer.json", tokenizer.to_str())
    return folder
