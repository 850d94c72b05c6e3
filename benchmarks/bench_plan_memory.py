"""Benchmark: ``composer-plan``'s training-memory estimate for hybrids (linear mixers + attention) against the
measured peak of a training step (issue 16's planner goal: within 15%).

    python -m benchmarks.bench_plan_memory [--device cuda] [--quick] [--stacks gated_deltanet_gqa,mamba2_gqa]
    python -m benchmarks.bench_plan_memory --modes none,every_layer --precisions 32-true

Stacks (``layer_pattern``, three mixer layers to one attention layer): ``gated_deltanet*3, gqa``,
``mamba2*3, gqa``, ``gla*3, gqa``, and ``gqa`` alone as the attention-only reference; 8 layers x 256 wide,
4 heads (grouped-query attention with 2 K/V heads, rope; the mixers with their defaults), SwiGLU, RMSNorm,
vocabulary 8,192, batch 4 x 256, each with gradient checkpointing none and every_layer (the other modes
with ``--modes``), 32-true (bf16-mixed too on CUDA). Peak memory of a step as bench_checkpointing measures
it: the model's resident bytes (weights + AdamW state, made by a first step) + the peak allocated during a
second step above what was allocated before it (CUDA: the caching allocator; CPU: live tensor storages,
eager). ``composer.plan.plan(...)`` estimates the same total; the row is estimate / measured.
``tests/test_plan_layers.py`` calls ``measure`` on a tiny hybrid.
"""

from __future__ import annotations

import argparse
import gc
from typing import Any, Optional

import torch

from benchmarks import harness
from benchmarks.bench_checkpointing import resident_bytes
from benchmarks.bench_train_step import make_step
from composer import compose
from composer.plan import plan

STACKS = {
    "gated_deltanet_gqa": ["gated_deltanet*3", "gqa"],
    "mamba2_gqa": ["mamba2*3", "gqa"],
    "gla_gqa": ["gla*3", "gqa"],
    "gqa": ["gqa"],
}
MODES = ("none", "every_layer", "every_2", "attention", "ffn")
GOAL = 0.15  # |estimate / measured - 1|


def hybrid(stack: str, quick: bool = False) -> dict[str, Any]:
    """The model config of ``stack`` (a key of STACKS): 8 layers x 256 wide (quick: 4 x 64)."""
    return {
        "vocab_size": 512 if quick else 8192,
        "hidden_size": 64 if quick else 256,
        "num_layers": 4 if quick else 8,
        "num_heads": 4,
        "max_position_embeddings": 64 if quick else 256,
        "attention": {"type": "gqa", "num_kv_heads": 2},
        "ffn": {"type": "swiglu"},
        "norm": {"type": "rmsnorm"},
        "position": {"type": "rope"},
        "head": {"type": "lm"},
        "layer_pattern": STACKS[stack],
        "dropout": 0.0,
    }


def measure(
    config: dict[str, Any],
    batch_size: int,
    seq_len: int,
    checkpointing: str = "none",
    precision: str = "32-true",
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
) -> dict[str, Any]:
    """One AdamW training step of ``config`` measured (weights + AdamW state + the step's peak) next to
    ``plan``'s estimate of the same step: {measured_bytes, resident_bytes, step_peak_bytes, plan_bytes,
    plan_over_measured}."""
    model = compose(config, device=device, seed=seed)
    model.set_gradient_checkpointing(checkpointing)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    step = make_step("composed", model, ids, device, bf16=precision == "bf16-mixed")
    step()  # creates the optimizer state (part of the resident bytes)
    peak = harness.peak_bytes(step, device)
    own = resident_bytes(model, step.optimizer)
    estimate = plan(
        model.config,
        batch_size=batch_size,
        seq_len=seq_len,
        precision=precision,
        checkpointing=checkpointing,
        device=device.type,
    ).memory.total
    del model, step
    gc.collect()
    return {
        "measured_bytes": own + peak,
        "resident_bytes": own,
        "step_peak_bytes": peak,
        "plan_bytes": estimate,
        "plan_over_measured": estimate / (own + peak),
    }


def _names(choices: tuple[str, ...], what: str, required: tuple[str, ...] = ()) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        chosen = tuple(n for n in text.split(",") if n)
        wrong = sorted(set(chosen) - set(choices))
        if wrong or not chosen or not set(required) <= set(chosen):
            need = f" that includes {','.join(required)}" if required else ""
            raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated subset of {','.join(choices)}{need}")
        return chosen

    parse.__name__ = what
    return parse


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = harness.cli_args(
        __doc__.splitlines()[0],
        argv,
        extra=[
            ("--stacks", {"type": _names(tuple(STACKS), "stacks"), "default": tuple(STACKS), "help": "the stacks"}),
            ("--modes", {"type": _names(MODES, "modes"), "default": ("none", "every_layer"), "help": "checkpointing"}),
            ("--precisions", {"default": None, "help": "comma-separated (default: 32-true; +bf16-mixed on CUDA)"}),
        ],
    )
    if args.shape is not None or args.batch_size is not None:
        raise SystemExit("bench_plan_memory: --shape / --batch-size do not apply: the stacks have their own shape")
    log, device, env = harness.start("plan_memory", args)
    batch = 2 if args.quick else 4
    precisions = (args.precisions or ("32-true,bf16-mixed" if device.type == "cuda" else "32-true")).split(",")
    result: dict[str, Any] = {"env": env, "cases": []}
    rows: list[dict[str, str]] = []
    for stack in args.stacks:
        cfg = hybrid(stack, args.quick)
        shape = (
            f"{cfg['num_layers']} layers x {cfg['hidden_size']}, layer_pattern [{', '.join(STACKS[stack])}], "
            f"vocab {cfg['vocab_size']}, batch {batch} x {cfg['max_position_embeddings']}"
        )
        for precision in precisions:
            for mode in args.modes:
                r = measure(cfg, batch, cfg["max_position_embeddings"], mode, precision, device)
                result["cases"].append({"stack": stack, "precision": precision, "checkpointing": mode, **r})
                log(
                    f"{stack} {precision} {mode}: {r['measured_bytes'] / 2**20:,.1f} MiB measured, plan "
                    f"{r['plan_bytes'] / 2**20:,.1f} MiB (x{r['plan_over_measured']:.3f})"
                )
                rows.append(
                    harness.row(
                        env,
                        f"plan memory {precision} {stack}/{mode} ({shape})",
                        "plan estimate / measured peak memory",
                        r["plan_over_measured"],
                    )
                )
                rows[-1]["goal"] = f"{1 - GOAL:.2f} - {1 + GOAL:.2f}"
                rows[-1]["met"] = "yes" if abs(r["plan_over_measured"] - 1) <= GOAL else "**no**"
                harness.save_partial("plan_memory", result, args)
    return harness.finish("plan_memory", result, rows, args)


if __name__ == "__main__":
    run()
