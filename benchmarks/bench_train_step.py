"""Benchmark 1: one training step (forward + backward + AdamW): tokens/s and peak memory.

    python -m benchmarks.bench_train_step [--device cuda] [--quick] [--no-compile]

Contenders, same weights and the same batch: the composed ``gpt2``-shaped model (its defaults: the fused
loss), the hand-written single-file GPT (benchmarks/handwritten_gpt.py), transformers' GPT2LMHeadModel
(SDPA) and the composed model with ``head.fused_loss=false`` (what the fused loss is worth), each eager
and under ``torch.compile``. CPU: 4 layers x 384 wide, 6 heads, context 256, GPT-2 vocabulary, batch 4,
float32. CUDA: GPT-2 124M, batch 16 x 1024, bf16 autocast (bf16-mixed), fused AdamW, TF32.
The first-step losses of the three must agree (a correctness check of the copied weights).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable
from typing import Any, Optional

import torch

from benchmarks import harness
from benchmarks.models import BUILDERS, Shape, contenders, loss_fn, random_batch
from composer.optim import parameter_groups

NAMES = ("composed", "handwritten", "transformers", "composed_unfused")  # the default contenders; also: composed_pad64
H100_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM


def autocast(device: torch.device, bf16: Optional[bool] = None) -> Any:
    """bf16 autocast (bf16-mixed): by default on CUDA only."""
    if device.type == "cuda" if bf16 is None else bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(
    name: str, model: torch.nn.Module, ids: torch.Tensor, device: torch.device, bf16: Optional[bool] = None
) -> Callable[[], None]:
    """One AdamW training step of ``model`` (same hyper-parameters for every contender); the optimizer is
    ``step.optimizer``."""
    groups = parameter_groups(model, weight_decay=0.1)
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda" or None)

    def step() -> None:
        with autocast(device, bf16):
            loss = loss_fn(name, model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt
    return step


def flops_per_token(shape: Shape) -> float:
    """6N + attention (12 L C T) per training token, N without the position table (nanoGPT's count)."""
    c, n_layer = shape.hidden_size, shape.num_layers
    n = 12 * n_layer * c * c + shape.vocab_size * c
    return 6 * n + 12 * n_layer * c * shape.context


def options(argv: Optional[list[str]]) -> Any:
    def names(text: str) -> tuple[str, ...]:
        chosen = tuple(n for n in text.split(",") if n)
        unknown = [n for n in chosen if n != "composed" and n not in BUILDERS]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown contender(s) {', '.join(unknown)}: choose from composed, {', '.join(BUILDERS)}"
            )
        return chosen

    return harness.cli_args(
        __doc__.splitlines()[0],
        argv,
        extra=[
            (
                "--contenders",
                {
                    "type": names,
                    "default": NAMES,
                    "help": "comma-separated: composed, handwritten, "
                    "transformers, composed_unfused (head.fused_loss=false), composed_pad64 (vocabulary "
                    "padded to a multiple of 64)",
                },
            ),
            (
                "--compiled",
                {
                    "type": names,
                    "default": None,
                    "help": "contenders also run under torch.compile "
                    "(default: all; compile time is the budget on a GPU machine)",
                },
            ),
        ],
    )


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = options(argv)
    log, device, env = harness.start("train_step", args)
    shape = Shape.from_args(args, device)
    rounds = args.rounds or (3 if args.quick else 10)
    names = tuple(dict.fromkeys(("composed", "handwritten", *args.contenders)))
    log(f"{shape.describe()} on {env['device']}, {rounds} rounds, contenders {', '.join(names)}")
    models = contenders(shape, device, names)
    ids = random_batch(shape, device)

    with torch.no_grad(), autocast(device):
        first = {name: float(loss_fn(name, m, ids)) for name, m in models.items()}  # the same weights
    spread = max(first.values()) - min(first.values())
    log(f"first losses {first} (spread {spread:.2e})")
    tolerance = 1e-4 if device.type == "cpu" else 2e-2  # bf16 autocast rounds differently per kernel
    if not spread <= tolerance:
        raise AssertionError(f"the contenders' losses differ by {spread:.3g}: {first}")

    rows: list[dict[str, str]] = []
    result: dict[str, Any] = {"env": env, "shape": shape.__dict__, "first_losses": first, "variants": {}, "rows": rows}
    variants = ["eager"] + ([] if args.no_compile else ["compiled"])
    compiled = list(dict.fromkeys(["composed", *[n for n in (args.compiled or names) if n in models]]))
    if args.no_hf_compile:
        compiled = [n for n in compiled if n != "transformers"]
    for variant in variants:
        if variant == "eager":
            runners = dict(models)
        else:
            runners = {n: torch.compile(models[n]) for n in compiled}
        steps = {n: make_step(n, r, ids, device) for n, r in runners.items()}
        if variant == "compiled":
            for n, step in steps.items():  # compile outside the timed rounds
                log(f"compiling {n} ...")
                step()
        timings = harness.interleave(steps, rounds, device, warmup=1, log=log)
        summary = harness.summary(timings, shape.tokens, device)
        peaks = {}
        if device.type == "cuda" or variant == "eager":  # CPU peaks are tracked op by op: eager only
            peaks = {n: harness.peak_bytes(step, device) for n, step in steps.items()}
        with torch.no_grad(), autocast(device):
            last = {n: float(loss_fn(n, models[n], ids)) for n in runners}  # eager: no recompile
        ratios = {
            f"composed_vs_{n}": harness.speed_ratio(timings, "composed", n, device) for n in runners if n != "composed"
        }
        result["variants"][variant] = {"timings": summary, "peak_bytes": peaks, "last_losses": last, **ratios}
        log(
            f"{variant}: "
            + ", ".join(f"{n} {summary[n]['tokens_per_s']:,.0f} tok/s" for n in runners)
            + f"; {ratios}; peak MiB { ({n: round(b / 2**20) for n, b in peaks.items()}) }; losses after {last}"
        )
        clock = summary["composed"]["clock"]
        what = f"train step {variant} ({shape.describe()}; {clock} clock)"
        cpu = device.type == "cpu"
        goals = {
            "handwritten": 0.98 if cpu else 1.0 if variant == "compiled" else None,
            "transformers": 1.1 if cpu else 1.5 if variant == "eager" else None,
        }
        for n in runners:
            if n != "composed":
                rows.append(
                    harness.row(env, what, f"composed / {n} tokens/s", ratios[f"composed_vs_{n}"], goals.get(n))
                )
        best = max(runners, key=lambda n: summary[n]["tokens_per_s"] if n.startswith("composed") else 0)
        for n in dict.fromkeys(["composed", best]):
            rows.append(
                harness.row(
                    env,
                    what,
                    f"{n} tokens/s",
                    summary[n]["tokens_per_s"],
                    500_000 if (not cpu and variant == "compiled") else None,
                    fmt="{:,.0f}",
                )
            )
            if device.type == "cuda":
                mfu = summary[n]["tokens_per_s"] * flops_per_token(shape) / H100_PEAK
                rows.append(harness.row(env, what, f"{n} MFU (6N + attention vs 989 TFLOP/s)", mfu))
        if "handwritten" in peaks:
            rows.append(
                harness.row(
                    env,
                    what,
                    "peak memory composed / hand-written",
                    peaks["composed"] / peaks["handwritten"],
                    1.0,
                    higher_is_better=False,
                )
            )
        harness.save_partial("train_step", result, args)  # after each variant
    result["ok"] = all(math.isfinite(v) for v in first.values())
    return harness.finish("train_step", result, rows, args)


if __name__ == "__main__":
    run()
