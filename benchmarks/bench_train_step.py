"""Benchmark 1: one training step (forward + backward + AdamW): tokens/s and peak memory.

    python -m benchmarks.bench_train_step [--device cuda] [--quick] [--no-compile]

Contenders, same weights and the same batch: the composed ``gpt2``-shaped model, the hand-written
single-file GPT (benchmarks/handwritten_gpt.py) and transformers' GPT2LMHeadModel (SDPA), each eager
and under ``torch.compile``. CPU: 4 layers x 384 wide, 6 heads, context 256, GPT-2 vocabulary, batch 4,
float32. CUDA: GPT-2 124M, batch 16 x 1024, bf16 autocast (bf16-mixed), fused AdamW, TF32.
The first-step losses of the three must agree (a correctness check of the copied weights).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Optional

import torch

from benchmarks import harness
from benchmarks.models import Shape, contenders, loss_fn, random_batch
from composer.optim import parameter_groups

NAMES = ("composed", "handwritten", "transformers")
H100_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM


def autocast(device: torch.device, bf16: Optional[bool] = None) -> Any:
    """bf16 autocast (bf16-mixed): by default on CUDA only."""
    if device.type == "cuda" if bf16 is None else bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(name: str, model: torch.nn.Module, ids: torch.Tensor, device: torch.device,
              bf16: Optional[bool] = None) -> Callable[[], None]:
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


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = harness.cli_args(__doc__.splitlines()[0], argv)
    log = harness.logger("train_step")
    device = harness.setup_device(args.device, args.threads)
    env = harness.environment(device)
    shape = Shape.for_device(device, args.quick)
    rounds = args.rounds or (3 if args.quick else 10 if device.type == "cpu" else 20)
    log(f"{shape.describe()} on {env['device']}, {rounds} rounds")
    models = dict(zip(NAMES, contenders(shape, device), strict=True))
    ids = random_batch(shape, device)

    with torch.no_grad(), autocast(device):
        first = {name: float(loss_fn(name, m, ids)) for name, m in models.items()}
    spread = max(first.values()) - min(first.values())
    log(f"first losses {first} (spread {spread:.2e})")
    tolerance = 1e-4 if device.type == "cpu" else 2e-2  # bf16 autocast rounds differently per kernel
    if not spread <= tolerance:
        raise AssertionError(f"the contenders' losses differ by {spread:.3g}: {first}")

    result: dict[str, Any] = {"env": env, "shape": shape.__dict__, "first_losses": first, "variants": {}}
    rows = []
    variants = ["eager"] + ([] if args.no_compile else ["compiled"])
    for variant in variants:
        runners = {n: (m if variant == "eager" else torch.compile(m)) for n, m in models.items()}
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
            last = {n: float(loss_fn(n, m, ids)) for n, m in models.items()}  # eager: no recompile
        vs_hand = harness.speed_ratio(timings, "composed", "handwritten", device)
        vs_hf = harness.speed_ratio(timings, "composed", "transformers", device)
        result["variants"][variant] = {"timings": summary, "peak_bytes": peaks, "last_losses": last,
                                       "composed_vs_handwritten": vs_hand, "composed_vs_transformers": vs_hf}
        tps = summary["composed"]["tokens_per_s"]
        log(f"{variant}: composed {tps:,.0f} tok/s; x{vs_hand:.3f} hand-written, x{vs_hf:.3f} transformers; "
            f"peak MiB {({n: round(b / 2**20) for n, b in peaks.items()})}; losses after {last}")
        clock = summary["composed"]["clock"]
        what = f"train step {variant} ({shape.describe()}; {clock} clock)"
        cpu = device.type == "cpu"
        rows.append(harness.row(env, what, "composed / hand-written tokens/s", vs_hand,
                                0.98 if cpu else 1.0 if variant == "compiled" else None))
        rows.append(harness.row(env, what, "composed / transformers tokens/s", vs_hf,
                                1.1 if cpu else 1.5 if variant == "eager" else None))
        rows.append(harness.row(env, what, "composed tokens/s", tps,
                                500_000 if (not cpu and variant == "compiled") else None, fmt="{:,.0f}"))
        if device.type == "cuda":
            mfu = tps * flops_per_token(shape) / H100_PEAK
            rows.append(harness.row(env, what, "composed MFU (6N + attention vs 989 TFLOP/s)", mfu))
        if peaks:
            rows.append(harness.row(env, what, "peak memory composed / hand-written",
                                    peaks["composed"] / peaks["handwritten"], 1.0, higher_is_better=False))
    result["rows"] = rows
    result["ok"] = all(math.isfinite(v) for v in first.values())
    harness.save("train_step" + ("_quick" if args.quick else ""), result)
    if not args.no_record and not args.quick:
        harness.append_rows(rows)
    return result


if __name__ == "__main__":
    run()
