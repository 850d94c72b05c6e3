"""Benchmark: the linear-time sequence mixers against softmax attention: training-step time at T = 256,
1,024 and 4,096 with the growth exponent in T, and decoding tokens/s at a cache of 4,096 tokens.

    python -m benchmarks.bench_mixers [--device cuda] [--quick] [--mixers mamba2,gla] [--lengths 256,1024,4096]

Each contender is the same small model (2 layers x 128 wide, 4 heads, vocabulary 256, SwiGLU, RMSNorm,
float32, batch 1) with every layer's mixer replaced: ``mha`` (softmax attention, SDPA; rope) or one of the
mixers with its defaults (``mamba2``: 4 heads of 64, state 128, chunks of 64; ``gated_deltanet``: 4 heads
of 32, chunks of 64; ``gla``: 4 heads, key 16 / value 32 per head, chunks of 16). A training step is
forward + backward + AdamW; its growth exponent is log(t(4096) / t(1024)) / log 4 (1: linear; attention
tends to 2 once its T^2 term dominates; the mixers should stay at or below 1.15). Decoding: the model
prefills 4,096 tokens once (untimed), then decodes one token at a time against its cache (a KV cache of
4,096+ tokens for attention, the fixed conv + recurrent state for a mixer): tokens/s of those steps.
Contenders run interleaved (harness.interleave); on a CPU the ratios use the process CPU time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch

from benchmarks import harness
from composer import compose

MIXERS = ("mamba2", "gated_deltanet", "gla")
LENGTHS = (256, 1024, 4096)
DECODE_CONTEXT = 4096
DECODE_STEPS = 16
GOAL_EXPONENT = 1.15  # issue 16: each mixer's chunked form grows no faster than T^1.15 between 1,024 and 4,096


def config(mixer: str, context: int, quick: bool) -> dict[str, Any]:
    return {
        "vocab_size": 256,
        "hidden_size": 64 if quick else 128,
        "num_layers": 2,
        "num_heads": 4,
        "max_position_embeddings": context,
        "attention": {"type": mixer},
        "ffn": {"type": "swiglu"},
        "norm": {"type": "rmsnorm"},
        "position": {"type": "rope"},
        "head": {"type": "lm"},
    }


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model(ids, labels=ids, return_logits=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def decode_step(model: torch.nn.Module, context: int, steps: int, device: torch.device) -> Callable[[], None]:
    """One new token per call against a cache that already holds ``context`` tokens."""
    model.eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    cache = model.allocate_cache(1, context + steps + 2)
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)  # prefill, untimed
    token = ids[:, -1:]

    def step() -> None:
        with torch.inference_mode():
            model(token, past_key_values=cache, use_cache=True)

    return step


def exponent(t_short: float, t_long: float, short: int, long: int) -> float:
    return math.log(t_long / t_short) / math.log(long / short)


def options(argv: Optional[list[str]]) -> Any:
    def names(text: str) -> tuple[str, ...]:
        return tuple(n for n in text.split(",") if n)

    def lengths(text: str) -> tuple[int, ...]:
        return tuple(harness.positive_int(n) for n in text.split(",") if n)

    return harness.cli_args(
        __doc__.splitlines()[0],
        argv,
        extra=[
            ("--mixers", {"type": names, "default": MIXERS, "help": "comma-separated mixer types"}),
            ("--lengths", {"type": lengths, "default": None, "help": "training lengths (default 256,1024,4096)"}),
        ],
    )


def _timed(contenders: dict[str, Callable[[], None]], rounds: int, device, log) -> dict[str, float]:
    timings = harness.interleave(contenders, rounds=rounds, device=device, log=log)
    cpu = harness.uses_cpu_time(device)
    return {name: t.median(cpu) for name, t in timings.items()}


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = options(argv)
    if args.shape is not None or args.batch_size is not None:
        raise SystemExit(
            "bench_mixers: --shape / --batch-size do not apply: the contenders have their own shape "
            "(2 x 128, batch 1); use --quick for a smaller one, --lengths for other lengths"
        )
    log, device, env = harness.start("mixers", args)
    quick = args.quick
    lengths = args.lengths or ((64, 128, 256) if quick else LENGTHS)
    names = ("mha", *args.mixers)
    context = max(*lengths, DECODE_CONTEXT if not quick else 256) + DECODE_STEPS + 8
    width = 64 if quick else 128
    clock = "cpu" if harness.uses_cpu_time(device) else "wall"
    what = f"{width} wide x 2 layers, 4 heads, batch 1, float32; {clock} clock"
    log(f"{', '.join(names)} on {env['device']}: lengths {lengths}")
    result: dict[str, Any] = {"env": env, "lengths": lengths, "train_s": {}, "exponent": {}, "decode": {}}
    rows: list[dict[str, str]] = []

    models = {n: compose(config(n, context, quick), device=device, seed=0).train() for n in names}
    for t in lengths:
        ids = torch.randint(0, 256, (1, t), generator=torch.Generator().manual_seed(0)).to(device)
        rounds = args.rounds or (2 if quick else 5 if t <= 1024 else 3)
        seconds = _timed({n: train_step(m, ids) for n, m in models.items()}, rounds, device, log)
        result["train_s"][t] = seconds
        log(f"T={t}: " + ", ".join(f"{n} {s * 1e3:.0f} ms" for n, s in seconds.items()))
        for n, s in seconds.items():
            rows.append(harness.row(env, f"mixers train step T={t} ({what})", f"{n} tokens/s", t / s))
        harness.save_partial("mixers", result, args)
    short, long = lengths[-2], lengths[-1]
    for n in names:
        e = exponent(result["train_s"][short][n], result["train_s"][long][n], short, long)
        result["exponent"][n] = e
        goal = None if n == "mha" else GOAL_EXPONENT
        rows.append(
            harness.row(
                env, f"mixers train step ({what})", f"{n} step-time growth exponent T={short}..{long}", e, goal, False
            )
        )

    ctx = DECODE_CONTEXT if not quick else 256
    steps = {n: decode_step(m, ctx, DECODE_STEPS, device) for n, m in models.items()}
    seconds = _timed(steps, args.rounds or (4 if quick else DECODE_STEPS - 2), device, log)
    result["decode"] = {n: 1.0 / s for n, s in seconds.items()}
    for n, s in seconds.items():
        rows.append(harness.row(env, f"mixers decode at a cache of {ctx} ({what})", f"{n} tokens/s", 1.0 / s))
        if n != "mha":
            ratio = seconds["mha"] / s
            rows.append(harness.row(env, f"mixers decode at a cache of {ctx} ({what})", f"{n} / mha tokens/s", ratio))
    log("exponents " + ", ".join(f"{n} {e:.2f}" for n, e in result["exponent"].items()))
    log("decode tokens/s " + ", ".join(f"{n} {v:.0f}" for n, v in result["decode"].items()))
    return harness.finish("mixers", result, rows, args)


if __name__ == "__main__":
    run()
