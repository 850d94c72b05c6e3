"""Benchmark 4: greedy decoding tokens/s at batch 1 and 8, composed vs transformers' ``generate``.

    python -m benchmarks.bench_decode [--device cuda] [--quick] [--no-compile]

Same weights, greedy, the same prompt (16 random tokens) and the same number of new tokens for every
contender; tokens/s counts new tokens (batch x new) per second of a whole ``generate`` call (prefill
included). Contenders: composed eager (dynamic KV cache), composed ``compile=True`` (static cache, compiled
one-token step; CUDA graphs on CUDA), transformers eager (its dynamic cache), transformers with
``cache_implementation="static"`` and its compiled forward. CPU: the 4 x 384 gpt2 shape, float32, 64 new
tokens. CUDA: GPT-2 124M in bf16, 128 new tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from benchmarks import harness
from benchmarks.models import Shape, build_composed, build_hf

PROMPT = 16


def hf_generate(hf: torch.nn.Module, ids: torch.Tensor, new: int, static: bool) -> torch.Tensor:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    kwargs: dict[str, Any] = {}
    if static:  # transformers compiles its forward for static caches (on CPUs only when told to)
        compile_cfg = CompileConfig(fullgraph=True, mode="reduce-overhead" if ids.is_cuda else "default")
        compile_cfg._compile_all_devices = True
        kwargs = {"cache_implementation": "static", "compile_config": compile_cfg}
    cfg = GenerationConfig(
        max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs
    )
    return hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)


def contenders(
    composed: torch.nn.Module,
    hf: torch.nn.Module,
    ids: torch.Tensor,
    new: int,
    compiled: bool,
    hf_compiled: bool = True,
) -> dict[str, Callable[[], torch.Tensor]]:
    out: dict[str, Callable[[], torch.Tensor]] = {
        "composed": lambda: composed.generate(ids, new),
        "transformers": lambda: hf_generate(hf, ids, new, static=False),
    }
    if compiled:
        out["composed_compiled"] = lambda: composed.generate(ids, new, compile=True)
        if hf_compiled:
            out["transformers_static_compiled"] = lambda: hf_generate(hf, ids, new, static=True)
    return out


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = harness.cli_args(__doc__.splitlines()[0], argv)
    log, device, env = harness.start("decode", args)
    shape = Shape.from_args(args, device)
    cuda = device.type == "cuda"
    new = 8 if args.quick else 128 if cuda else 64
    rounds = args.rounds or (2 if args.quick else 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    composed = build_composed(shape, device)
    hf = build_hf(composed)
    composed, hf = composed.to(dtype).eval(), hf.to(dtype).eval()
    log(f"{shape.describe()}, {dtype}, prompt {PROMPT} + {new} new tokens, {rounds} rounds on {env['device']}")
    rows: list[dict[str, str]] = []
    result: dict[str, Any] = {
        "env": env,
        "shape": shape.__dict__,
        "new_tokens": new,
        "dtype": str(dtype),
        "batches": {},
        "rows": rows,
    }
    for batch in (1, 8):
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, shape.vocab_size, (batch, PROMPT), generator=gen).to(device)
        fns = contenders(composed, hf, ids, new, compiled=not args.no_compile, hf_compiled=not args.no_hf_compile)
        outputs = {}
        for name, fn in fns.items():  # warm-up (compiles), and the tokens for the agreement check
            log(f"batch {batch}: first call of {name} ...")
            outputs[name] = fn()[:, -new:].cpu()
        ref = outputs["transformers"]
        agree = {n: float((o == ref).float().mean()) for n, o in outputs.items()}
        log(f"batch {batch}: share of new tokens equal to transformers' {agree}")
        if not cuda and agree["composed"] < 1.0:  # float32 on CPU: greedy must match exactly
            raise AssertionError(f"greedy tokens differ from transformers': {agree}")
        timings = harness.interleave(fns, rounds, device, warmup=0, log=log)
        summary = harness.summary(timings, batch * new, device, unit="new_tokens")
        result["batches"][batch] = {"timings": summary, "agreement_with_transformers": agree}
        what = (
            f"decode batch {batch} ({shape.describe().split(', batch')[0]}, {dtype}, {new} new tokens; "
            f"{summary['composed']['clock']} clock)"
        )
        ratio = harness.speed_ratio(timings, "composed", "transformers", device)
        rows.append(
            harness.row(
                env, what, "composed / transformers generate, eager", ratio, 1.25 if (batch == 1 and not cuda) else None
            )
        )
        if not args.no_compile:
            best_hf = min(
                (n for n in ("transformers", "transformers_static_compiled") if n in timings),
                key=lambda n: timings[n].median(harness.uses_cpu_time(device)),
            )
            ratio_c = harness.speed_ratio(timings, "composed_compiled", best_hf, device)
            rows.append(harness.row(env, what, f"composed compiled / {best_hf}", ratio_c))
            rows.append(
                harness.row(
                    env,
                    what,
                    "composed compiled new tokens/s",
                    summary["composed_compiled"]["new_tokens_per_s"],
                    1000 if (cuda and batch == 1) else None,
                    fmt="{:,.0f}",
                )
            )
        rows.append(
            harness.row(
                env, what, "composed eager new tokens/s", summary["composed"]["new_tokens_per_s"], fmt="{:,.0f}"
            )
        )
        log(f"batch {batch}: " + ", ".join(f"{n} {s['new_tokens_per_s']:,.0f} tok/s" for n, s in summary.items()))
        harness.save_partial("decode", result, args)  # after each batch size
    return harness.finish("decode", result, rows, args)


if __name__ == "__main__":
    run()
