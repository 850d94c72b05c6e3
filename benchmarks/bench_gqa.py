"""Grouped-query attention kernels: does ``sdpa_reads_grouped_heads`` pick the fastest path?

    python -m benchmarks.bench_gqa [--device cuda] [--quick] [--rounds N]

Three ways to run SDPA over fewer key/value heads than query heads (components/attention.py):
``gqa`` passes them as they are (``enable_gqa=True``), ``repeat`` copies K/V to every query head
(``repeat_interleave``), ``fold`` makes each group's query heads one head's rows (``sdpa_folding_groups``;
it needs a mask, so the causal case gives it an explicit causal one). Cases at Llama 3 8B's head layout
(32 query heads, 8 K/V heads, head dim 128; CPU: 8 / 2 / 64): a causal training pass and a padded one
(forward + backward, 4 x 1,024 tokens; CPU 2 x 512) and a decode step (8 rows, 1 query over a masked
2,048-slot cache; CPU 4 rows, 512 slots; forward only), in bfloat16 and float32 on CUDA, float32 on
CPUs. Reported per case: each path's time, the path the rule picks, and the picked path's speed over
the fastest one's (1.0: the rule picks the fastest). The three paths' outputs are compared first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import harness
from components.attention import build_mask, sdpa_folding_groups, sdpa_reads_grouped_heads

AttentionPath = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]  # (q, k, v, mask) -> attention output


def paths(groups: int, causal_mask: Optional[Tensor]) -> dict[str, AttentionPath]:
    """The three paths; ``causal_mask`` [1, 1, T, S] for the causal case (no mask given: the fold needs one,
    the others run SDPA's causal kernel), None for the masked cases."""
    causal = causal_mask is not None

    def gqa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)

    def repeat(q, k, v, mask):
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def fold(q, k, v, mask):  # folded rows are out of order: the causal case needs its mask spelled out
        return sdpa_folding_groups(q, k, v, mask if mask is not None else causal_mask)

    return {"gqa": gqa, "repeat": repeat, "fold": fold}


def cases(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    h, hkv, d = (32, 8, 128) if cuda else (8, 2, 64)
    if quick:
        h, hkv, d = 4, 2, 16
    b, t = (4, 1024) if cuda else (2, 512)
    db, s = (8, 2048) if cuda else (4, 512)
    if quick:
        b, t, db, s = 1, 64, 2, 64
    dtypes = [torch.bfloat16, torch.float32] if cuda else [torch.float32]
    out = []
    for dtype in dtypes:
        out.append(dict(name="train causal", dtype=dtype, b=b, t=t, s=t, masked=False, backward=True))
        out.append(dict(name="train padded", dtype=dtype, b=b, t=t, s=t, masked=True, backward=True))
        out.append(dict(name="decode", dtype=dtype, b=db, t=1, s=s, masked=True, backward=False))
    return [dict(c, h=h, hkv=hkv, d=d) for c in out]


def tensors(c: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> Tensor:
        x = torch.randn(*shape, generator=gen, device=device, dtype=c["dtype"])
        return x.requires_grad_(c["backward"])

    q, k, v = (
        rand(c["b"], c["h"], c["t"], c["d"]),
        rand(c["b"], c["hkv"], c["s"], c["d"]),
        rand(c["b"], c["hkv"], c["s"], c["d"]),
    )
    mask = None
    if c["masked"]:  # causal and a padded first row: its first quarter of keys are padding
        valid = torch.ones(c["b"], c["s"], dtype=torch.bool, device=device)
        valid[0, : c["s"] // 4] = False
        mask = build_mask(
            torch.arange(c["s"] - c["t"], c["s"], device=device),
            torch.arange(c["s"], device=device),
            valid,
            causal=True,
            window=None,
        )  # [B, 1, T, S], as the attention builds it
    return q, k, v, mask


def timed(
    fn: Callable, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], grad: Optional[Tensor], inner: int
) -> Callable[[], None]:
    """``inner`` calls of path ``fn``: forward and backward (with ``grad``) or, without ``grad``, forward only."""

    def go() -> None:
        for _ in range(inner):
            if grad is not None:
                fn(q, k, v, mask).backward(grad)
                q.grad = k.grad = v.grad = None
            else:
                with torch.no_grad():
                    fn(q, k, v, mask)

    return go


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = harness.cli_args(__doc__.splitlines()[0], argv)
    if args.shape is not None or args.batch_size is not None:
        raise SystemExit(
            "bench_gqa: --shape / --batch-size do not apply: the cases have their own shapes "
            "(Llama 3 8B's heads on CUDA); use --quick for small ones"
        )
    log, device, env = harness.start("gqa", args)
    cuda = device.type == "cuda"
    rounds = args.rounds or (3 if args.quick else 10 if cuda else 30)
    result: dict[str, Any] = {"env": env, "cases": []}
    rows = []
    for c in cases(device, args.quick):
        q, k, v, mask = tensors(c, device)
        causal_mask = (
            None
            if c["masked"]
            else build_mask(  # built once, outside the timed calls
                torch.arange(c["s"] - c["t"], c["s"], device=device),
                torch.arange(c["s"], device=device),
                None,
                causal=True,
                window=None,
            )
        )  # [1, 1, T, S]
        fns = paths(c["h"] // c["hkv"], causal_mask)
        with torch.no_grad():
            outs = {n: fn(q, k, v, mask).float() for n, fn in fns.items()}
        diff = max(float((o - outs["gqa"]).abs().max()) for o in outs.values())
        label = (
            f"{c['name']} {str(c['dtype']).replace('torch.', '')}: {c['b']} x {c['t']} queries over {c['s']} "
            f"keys, {c['h']} / {c['hkv']} heads, head dim {c['d']}"
        )
        inner = (5 if cuda else 1) if c["backward"] else (50 if cuda else 10)  # calls per timed sample
        grad = torch.randn_like(outs["gqa"]).to(c["dtype"]) if c["backward"] else None

        log(f"{label}: max |difference| between paths {diff:.2e}")
        if not diff <= (1e-4 if c["dtype"] == torch.float32 else 2e-2):  # bf16 kernels round differently
            raise AssertionError(f"{label}: the three paths' outputs differ by {diff:.3g}")
        timings = harness.interleave(
            {n: timed(fn, q, k, v, mask, grad, inner) for n, fn in fns.items()}, rounds, device, log=log
        )
        cpu = harness.uses_cpu_time(device)
        medians = {n: t.median(cpu) for n, t in timings.items()}
        fastest = min(medians, key=medians.get)
        picked = (
            "gqa"
            if sdpa_reads_grouped_heads(device.type, c["dtype"], c["masked"], c["d"])
            else ("fold" if c["masked"] else "repeat")
        )
        ratio = medians[fastest] / medians[picked]
        log(
            f"{label}: "
            + ", ".join(f"{n} {m * 1e3 / inner:.2f} ms" for n, m in medians.items())
            + f"; picked {picked}, fastest {fastest}, picked / fastest speed {ratio:.3f}"
        )
        result["cases"].append(
            {
                "case": label,
                "max_diff": diff,
                "ms_per_call": {n: m * 1e3 / inner for n, m in medians.items()},
                "picked": picked,
                "fastest": fastest,
                "picked_vs_fastest": ratio,
            }
        )
        rows.append(
            harness.row(
                env,
                f"GQA attention, {label}",
                f"speed of the picked path ({picked}) / the fastest ({fastest})",
                ratio,
                0.9,
            )
        )
        harness.save_partial("gqa", result, args)
    result["rows"] = rows
    return harness.finish("gqa", result, rows, args)


if __name__ == "__main__":
    run()
