"""Rope scaling both ways for the families that take transformers' generic rope types (Qwen3, OLMo 2):
``common.rope_from_hf`` / ``rope_to_hf`` (default, linear, llama3) plus YaRN, whose keys are
those transformers' ``_compute_yarn_parameters`` reads: factor, original_max_position_embeddings,
beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor and truncate. Any other rope type
(longrope, dynamic, ...) is refused naming it and the types supported.
"""

from __future__ import annotations

from typing import Any

from .common import HFConfig, rope_from_hf, rope_to_hf

SUPPORTED = ("default", "linear", "llama3", "yarn")
YARN_FLOATS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")


def _merged(c: HFConfig) -> dict[str, Any]:
    params, legacy = c.get("rope_parameters", {}), c.get("rope_scaling", {})
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        return {}
    return {**legacy, **params}


def rope_type(c: HFConfig) -> str:
    merged = _merged(c)
    return str(merged.get("rope_type") or merged.get("type") or "default")


def rope_from_hf_scaled(c: HFConfig, family: str, supported: tuple[str, ...] = SUPPORTED) -> dict[str, Any]:
    """Our rope config from either spelling; YaRN here, the other ``supported`` types in ``rope_from_hf``."""
    kind = rope_type(c)
    key = "rope_parameters.rope_type" if "rope_parameters" in c.data else "rope_scaling.rope_type"
    if kind not in supported:
        c.fail(key, f"rope type {kind!r} is not supported for {family}", f"supported: {', '.join(supported)}")
        return {"type": "rope"}
    if kind != "yarn":
        return rope_from_hf(c)
    merged = _merged(c)
    out = rope_from_hf(_without_scaling(c))
    max_pos = c.get("max_position_embeddings", 1, int, min=1, bound="max_position_embeddings")
    # Phi-3 keeps the pre-training context outside the rope parameters, and transformers prefers it there
    old = c.get("original_max_position_embeddings", None, int, min=1, bound="max_position_embeddings")
    if old is None:
        old = c._typed(
            "original_max_position_embeddings",
            merged.get("original_max_position_embeddings", max_pos),
            int,
            max_pos,
            {"min": 1, "bound": "max_position_embeddings"},
        )
    factor = merged.get("factor")
    factor = max_pos / old if factor is None else c._typed("factor", factor, float, 1.0, {"min": 1.0})
    out.update(scaling="yarn", scaling_factor=factor, original_max_position_embeddings=old)
    for name, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):  # transformers: `or 32`, `or 1`
        out[name] = c._typed(name, merged.get(name) or default, float, default, {"min": 0.0})
    for name in ("mscale", "mscale_all_dim", "attention_factor"):
        if merged.get(name) is not None:
            out[name] = c._typed(name, merged[name], float, None, {"min": 0.0})
    out["truncate"] = c._typed("truncate", merged.get("truncate", True), bool, True, {})
    return out


def _without_scaling(c: HFConfig) -> HFConfig:
    """``c`` with its rope parameters reduced to theta and the rotary fraction (read by rope_from_hf);
    its problems land on ``c``."""
    merged = _merged(c)
    data = {k: v for k, v in c.data.items() if k not in ("rope_parameters", "rope_scaling")}
    data["rope_parameters"] = {k: merged[k] for k in ("rope_theta", "partial_rotary_factor") if k in merged}
    view = HFConfig(data, c.path)
    view.problems = c.problems  # the same list: problems are reported with the config's own
    return view


def rope_to_hf_scaled(rope: Any, fraction_key: Any = None) -> dict[str, Any]:
    """Both spellings (4.x ``rope_theta`` / ``rope_scaling``, 5.x ``rope_parameters``), YaRN included."""
    if rope.scaling != "yarn":
        return rope_to_hf(rope, fraction_key)
    scaling: dict[str, Any] = {
        "rope_type": "yarn",
        "type": "yarn",
        "factor": rope.scaling_factor,
        "original_max_position_embeddings": rope.original_max_position_embeddings,
        "beta_fast": rope.beta_fast,
        "beta_slow": rope.beta_slow,
        "truncate": rope.truncate,
    }
    scaling.update({k: getattr(rope, k) for k in ("mscale", "mscale_all_dim", "attention_factor") if getattr(rope, k)})
    params = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_theta": rope.theta}
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_scaling": scaling, "rope_parameters": params}
    if fraction_key is not None:
        params["partial_rotary_factor"] = rope.rotary_fraction
        out[fraction_key] = rope.rotary_fraction
    return out
