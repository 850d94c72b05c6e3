"""Benchmark 4: greedy decoding tokens/s at batch 1 and 8, composed vs transformers' ``generate``.

    python -m benchmarks.bench_decode [--device cuda] [--quick] [--no-compile] [--threads-only | --no-thread-rows]

Same weights, greedy, the same prompt (16 random tokens) and the same number of new tokens for every
contender; tokens/s counts new tokens (batch x new) per second of a whole ``generate`` call (prefill
included). Contenders: composed eager (dynamic KV cache), composed ``compile=True`` (static cache, compiled
one-token step; CUDA graphs on CUDA), transformers eager (its dynamic cache), transformers with
``cache_implementation="static"`` and its compiled forward. CPU: the 4 x 384 gpt2 shape, float32, 64 new
tokens. CUDA: GPT-2 124M in bf16, 128 new tokens.

Threads (CPU): ``generate(threads="auto")`` against torch's default thread count and one thread, wall-clock
new tokens/s at batch 1, for the char_text experiment's model (0.8M parameters, context 64, 200 new tokens:
the README's command) and the CPU shape above, on the machine as found (its 1-minute load average is in
the row) and with one CPU-bound process per core but one started by the benchmark. Not pinned to a core:
run it without taskset.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch

from benchmarks import harness
from benchmarks.models import Shape, build_composed, build_hf
from composer import compose, load_config
from composer.generation_inputs import decode_threads

PROMPT = 16
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, read before the harness sets one thread


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


# ----------------------------------------------------------------------------- threads
@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """``count`` CPU-bound processes (started here, ended here) for the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0 if procs else 0.0)  # running before the first timed call
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def char_text_model() -> torch.nn.Module:
    """The char_text experiment's model (GPT-2 wiring, 4 x 128, context 64, learned positions), vocab 65."""
    return compose(load_config(["experiment=char_text", "model.vocab_size=65"]).model, seed=0).eval()


def thread_rows(args: Any, env: dict[str, Any], log: Callable[[str], None], composed: torch.nn.Module) -> list:
    """new tokens/s of threads="auto", torch's default count and one thread (wall clock, batch 1)."""
    device, before = torch.device("cpu"), torch.get_num_threads()
    env = {**env, "device": env["device"].replace(f", {before} thread(s))", ", threads: see the row)")}
    torch.set_num_threads(DEFAULT_THREADS)  # "auto" never uses more threads than torch is set to
    cases = [("char_text model (0.8M parameters, context 64)", char_text_model(), 6, 16 if args.quick else 200)]
    if not args.quick:
        cases.append(("gpt2-shaped 4 x 384, vocab 50257", composed, PROMPT, 64))
    spinners = max(1, (os.cpu_count() or 2) - 1)
    found = "machine as found"
    conditions = [(found, 0)] if args.quick else [(found, 0), (f"plus {spinners} CPU-bound process(es)", spinners)]
    rounds = args.rounds or (1 if args.quick else 5)
    rows = []
    try:
        for condition, count in conditions:
            with busy_cores(count):
                condition = f"{condition}, 1-min load {os.getloadavg()[0]:.1f} at the start"
                for what, model, prompt, new in cases:
                    ids = torch.randint(0, 60, (1, prompt), generator=torch.Generator().manual_seed(0))
                    fns = {
                        "auto": lambda m=model, i=ids, n=new: m.generate(i, n, threads="auto"),
                        "torch_default": lambda m=model, i=ids, n=new: m.generate(i, n, threads=DEFAULT_THREADS),
                        "one_thread": lambda m=model, i=ids, n=new: m.generate(i, n, threads=1),
                    }
                    picked = str(decode_threads("auto", model, 1, device))  # a one-token step; past the window:
                    if prompt + new > model.config.max_position_embeddings:
                        window = decode_threads("auto", model, 1, device, tokens=model.config.max_position_embeddings)
                        picked += f" a token, {window} past the window"
                    log(f"threads, {condition}, {what}: auto picks {picked} (torch default {DEFAULT_THREADS})")
                    timings = harness.interleave(fns, rounds, device, warmup=1, log=log)
                    speed = {n: new / statistics.median(t.wall) for n, t in timings.items()}
                    bench = f"decode threads, {condition}: {what}, batch 1, {new} new tokens; wall clock"
                    rows.append(harness.row(env, bench, f"new tokens/s, auto (threads: {picked})", speed["auto"]))
                    rows.append(
                        harness.row(
                            env, bench, f"new tokens/s, torch default ({DEFAULT_THREADS})", speed["torch_default"]
                        )
                    )
                    rows.append(harness.row(env, bench, "new tokens/s, 1 thread", speed["one_thread"]))
                    best = max(speed["torch_default"], speed["one_thread"])
                    rows.append(harness.row(env, bench, "auto / the faster of the two", speed["auto"] / best, 0.9))
                    log(", ".join(f"{n} {v:,.0f} tok/s" for n, v in speed.items()))
    finally:
        torch.set_num_threads(before)
    return rows


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    extra = [
        ("--threads-only", {"action": "store_true", "help": "only the thread-count rows (CPU)"}),
        ("--no-thread-rows", {"action": "store_true", "help": "skip the thread-count rows"}),
    ]
    args = harness.cli_args(__doc__.splitlines()[0], argv, extra)
    log, device, env = harness.start("decode", args)
    shape = Shape.from_args(args, device)
    cuda = device.type == "cuda"
    new = 8 if args.quick else 128 if cuda else 64
    rounds = args.rounds or (2 if args.quick else 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    composed = build_composed(shape, device).to(dtype).eval()
    hf = None if args.threads_only else build_hf(composed).to(dtype).eval()
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
    for batch in () if args.threads_only else (1, 8):
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
    if device.type == "cpu" and not args.no_thread_rows:
        rows += thread_rows(args, env, log, composed)
    return harness.finish("decode", result, rows, args)


if __name__ == "__main__":
    run()
