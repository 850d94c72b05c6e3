"""Sliding-window attention: FlexAttention with a block mask vs SDPA with a boolean mask (``kernel: flex`` vs
``kernel: sdpa`` of the ``sliding_window`` attention); correctness and speed.

    python -m benchmarks.bench_flex [--device cuda] [--quick] [--batch-size N] [--rounds N] [--no-compile]

A small Mistral-shaped model (GQA, RoPE, SwiGLU, window 256 over 2048 tokens, batch 4; bf16 autocast on
CUDA); ``--shape`` does not apply (the sliding window is the question, not the GPT-2 shapes). On
CUDA: the two kernels' losses and gradients agree, training steps are timed interleaved, and the flex model
compiles with ``fullgraph=True``. On CPUs FlexAttention runs without gradients only: the forward passes are
compared (no timing).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch._dynamo.utils import counters

from benchmarks import harness
from composer.model import compose


def config(kernel: str, quick: bool) -> dict[str, Any]:
    size = (
        dict(hidden_size=128, num_layers=2, num_heads=4, max_position_embeddings=256)
        if quick
        else dict(hidden_size=512, num_layers=4, num_heads=8, max_position_embeddings=2048)
    )
    return {
        "vocab_size": 1024 if quick else 32000,
        **size,
        "dropout": 0.0,
        "attention": {"type": "sliding_window", "num_kv_heads": 2, "window": 32 if quick else 256, "kernel": kernel},
        "ffn": {"type": "swiglu"},
        "norm": {"type": "rmsnorm"},
        "position": {"type": "rope"},
        "head": {"type": "lm"},
        "tie_embeddings": False,
    }


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = harness.cli_args(__doc__.splitlines()[0], argv)
    if args.shape is not None:
        raise SystemExit(
            f"bench_flex: --shape {args.shape} does not apply: this benchmark measures its own "
            "Mistral-shaped sliding-window model; drop --shape (--batch-size and --quick size it)"
        )
    log, device, env = harness.start("flex", args)
    cuda = device.type == "cuda"
    models = {k: compose(config(k, args.quick), device=device, seed=0) for k in ("sdpa", "flex")}
    t = models["sdpa"].config.max_position_embeddings
    batch = args.batch_size or (2 if args.quick else 4)
    ids = torch.randint(
        0,
        models["sdpa"].config.vocab_size,
        (batch, t),
        device=device,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    result: dict[str, Any] = {"env": env, "tokens": batch * t, "window": models["flex"].config.attention.window}
    rows = []
    if not cuda:  # FlexAttention on CPUs: forward only
        with torch.no_grad():
            logits = {k: m(ids).logits for k, m in models.items()}
        diff = float((logits["flex"] - logits["sdpa"]).abs().max())
        log(f"CPU forward: max |flex - sdpa| logits = {diff:.2e}")
        result["max_logit_diff"] = diff
        rows.append(
            harness.row(
                env,
                "sliding window flex vs sdpa (CPU forward)",
                "max |logit difference|",
                diff,
                1e-4,
                higher_is_better=False,
                fmt="{:.2e}",
            )
        )
    else:
        losses, grads = {}, {}
        for k, m in models.items():
            with amp:
                loss = m(ids, labels=ids).loss
            loss.backward()
            losses[k] = float(loss)
            grads[k] = {n: p.grad.float().clone() for n, p in m.named_parameters()}
            m.zero_grad(set_to_none=True)
        worst = max(float((grads["flex"][n] - g).norm() / g.norm().clamp(min=1e-12)) for n, g in grads["sdpa"].items())
        log(f"losses {losses}; worst relative gradient difference {worst:.2e}")
        result.update(losses=losses, worst_relative_grad_diff=worst)
        rows.append(
            harness.row(
                env,
                "sliding window flex vs sdpa (bf16)",
                "|loss difference|",
                abs(losses["flex"] - losses["sdpa"]),
                1e-2,
                higher_is_better=False,
                fmt="{:.2e}",
            )
        )
        rows.append(
            harness.row(
                env,
                "sliding window flex vs sdpa (bf16)",
                "worst relative gradient difference",
                worst,
                5e-2,
                higher_is_better=False,
                fmt="{:.2e}",
            )
        )

        def step(m):
            def go() -> None:
                with amp:
                    loss = m(ids, labels=ids).loss
                loss.backward()
                m.zero_grad(set_to_none=True)

            return go

        timings = harness.interleave({k: step(m) for k, m in models.items()}, args.rounds or 10, device, log=log)
        summary = harness.summary(timings, batch * t, device)
        ratio = harness.speed_ratio(timings, "flex", "sdpa", device)
        result.update(timings=summary, flex_vs_sdpa=ratio)
        rows.append(
            harness.row(
                env,
                f"sliding window fwd+bwd ({batch} x {t} tokens, window {result['window']})",
                "flex / sdpa+mask tokens/s",
                ratio,
                1.0,
            )
        )
        if not args.no_compile:
            counters.clear()
            compiled = torch.compile(models["flex"], fullgraph=True)
            with amp:
                loss = compiled(ids, labels=ids).loss
            loss.backward()
            breaks = sum(counters["graph_break"].values())
            log(f"flex model compiled with fullgraph=True: loss {float(loss):.4f}, graph breaks {breaks}")
            result["compiled_loss"] = float(loss)
            rows.append(
                harness.row(
                    env,
                    "sliding window flex model under torch.compile(fullgraph=True)",
                    "graph breaks",
                    breaks,
                    0,
                    higher_is_better=False,
                    fmt="{:.0f}",
                )
            )
    result["rows"] = rows
    return harness.finish("flex", result, rows, args)


if __name__ == "__main__":
    run()
