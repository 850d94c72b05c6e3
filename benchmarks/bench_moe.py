"""Mixture-of-experts expert compute: grouped products against the per-expert loop.

    python -m benchmarks.bench_moe [--device cuda] [--quick] [--rounds N]

One MoE layer (router + SwiGLU experts, components/moe.py) trained a step: forward and backward of
1,024 tokens (4 x 256) at hidden size 128 with experts 64 wide (fine-grained experts, Qwen3-MoE's
width-to-hidden ratio; CUDA: hidden 1,024, experts 512 wide, 8,192 tokens, bfloat16), at 8, 64 and 128
experts with top-k 2 and 8. Three ``expert_compute`` paths on the same weights: ``loop`` (one expert at
a time, the reference), ``grouped`` (the slots sorted by expert, one torch._grouped_mm per projection)
and ``padded`` (one bmm over [E, max load, C]). Their outputs and input gradients are compared first.
Reported per case: tokens/s of each path and grouped / loop (targets: >= 2 at 64 experts top-8, >= 1
at 8 experts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from benchmarks import harness
from composer.contract import BuildContext
from composer.registry import FFN
from composer.schema import resolve_model_config

PATHS = ("loop", "grouped", "padded")
GOALS = {(64, 8): 2.0, (8, 2): 1.0, (8, 8): 1.0}


def shape(device: torch.device, quick: bool) -> dict[str, Any]:
    if quick:
        return dict(c=32, i=16, tokens=128, dtype=torch.float32)
    if device.type == "cuda":
        return dict(c=1024, i=512, tokens=8192, dtype=torch.bfloat16)
    return dict(c=128, i=64, tokens=1024, dtype=torch.float32)


def build(s: dict[str, Any], experts: int, top_k: int, compute: str, device: torch.device) -> torch.nn.Module:
    """The MoE as composer builds it (weights from one seed: every path gets the same ones)."""
    ffn = {
        "type": "moe",
        "num_experts": experts,
        "top_k": top_k,
        "expert": {"type": "swiglu", "intermediate_size": s["i"]},
        "expert_compute": compute,
    }
    model = {"vocab_size": 64, "hidden_size": s["c"], "num_layers": 1, "num_heads": 4}
    cfg = resolve_model_config({**model, "max_position_embeddings": 64, "ffn": ffn, "norm": "rmsnorm"})
    torch.manual_seed(0)
    moe = FFN.build(cfg.layer(0).ffn, BuildContext(s["c"], 64, 64, 1)).to(device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return moe.to(s["dtype"])


def step(moe: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def go() -> torch.Tensor:
        x.grad = None
        moe.zero_grad(set_to_none=True)
        y, aux = moe(x)
        (y.float().square().mean() + aux).backward()
        return y

    return go


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = harness.cli_args(__doc__.splitlines()[0], argv)
    if args.shape is not None or args.batch_size is not None:
        raise SystemExit("bench_moe: --shape / --batch-size do not apply: the cases have their own shapes")
    log, device, env = harness.start("moe", args)
    s = shape(device, args.quick)
    rounds = args.rounds or (2 if args.quick else 10)
    result: dict[str, Any] = {"env": env, "shape": {k: str(v) for k, v in s.items()}, "cases": []}
    rows = []
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(s["tokens"], s["c"], generator=gen).to(device, s["dtype"]).requires_grad_()
    for experts, top_k in [(8, 2), (8, 8), (64, 2), (64, 8), (128, 2), (128, 8)]:
        moes = {p: build(s, experts, top_k, p, device) for p in PATHS}
        steps = {p: step(m, x) for p, m in moes.items()}
        outs = {}
        for p, fn in steps.items():
            outs[p] = (fn().detach().float(), x.grad.detach().float().clone())
        diff = max(float((o - outs["loop"][i]).abs().max()) for o2 in outs.values() for i, o in enumerate(o2))
        tol = 1e-4 if s["dtype"] == torch.float32 else 5e-2
        label = (
            f"MoE layer train step, {experts} experts top-{top_k}: {s['tokens']} tokens, hidden {s['c']}, "
            f"SwiGLU experts {s['i']} wide, {str(s['dtype']).replace('torch.', '')}"
        )
        log(f"{label}: kernel {moes['grouped'].experts.kernel(x)}, max |difference| to the loop {diff:.2e}")
        if not diff <= tol:
            raise AssertionError(f"{label}: the paths differ by {diff:.3g}")
        timings = harness.interleave(steps, rounds, device, log=log)
        summary = harness.summary(timings, s["tokens"], device)
        ratio = harness.speed_ratio(timings, "grouped", "loop", device)
        padded = harness.speed_ratio(timings, "padded", "loop", device)
        tps = {p: summary[p]["tokens_per_s"] for p in PATHS}
        log(
            f"{label}: " + ", ".join(f"{p} {v:,.0f} tokens/s" for p, v in tps.items()) + f"; grouped / loop {ratio:.2f}"
        )
        result["cases"].append(
            {"case": label, "max_diff": diff, "timings": summary, "grouped_vs_loop": ratio, "padded_vs_loop": padded}
        )
        rows.append(harness.row(env, label, "grouped / loop tokens/s", ratio, GOALS.get((experts, top_k))))
        rows.append(harness.row(env, label, "padded / loop tokens/s", padded))
        rows.append(harness.row(env, label, "grouped tokens/s", tps["grouped"], fmt="{:,.0f}"))
        harness.save_partial("moe", result, args)
    result["rows"] = rows
    return harness.finish("moe", result, rows, args)


if __name__ == "__main__":
    run()
