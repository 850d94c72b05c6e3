"""Run the benchmark suite (``make bench``): each benchmark in its own process, one after the other.

    python -m benchmarks.run                       # all, full size; rows appended to benchmarks/RESULTS.md
    python -m benchmarks.run --quick               # small shapes, nothing recorded (a smoke test)
    python -m benchmarks.run --only decode --device cuda

Other options (``--device``, ``--shape cpu|gpt2_124m``, ``--batch-size``, ``--rounds``, ``--threads``,
``--no-compile``, ``--no-record``) are passed to every benchmark (``gqa`` has its own shapes: not the
first two); a benchmark's own options (e.g. checkpointing's ``--modes``) go with ``--only`` that
benchmark. A failing benchmark is reported and the others still run; the exit status is 1 if any
failed. JSON results land in benchmarks/out/<name>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = {
    "train_step": "benchmarks.bench_train_step",
    "lightning": "benchmarks.bench_lightning",
    "checkpointing": "benchmarks.bench_checkpointing",
    "decode": "benchmarks.bench_decode",
    "build": "benchmarks.bench_build",
    "gqa": "benchmarks.bench_gqa",
    "moe": "benchmarks.bench_moe",
    "mixers": "benchmarks.bench_mixers",
    "families": "benchmarks.bench_families",
    "plan_memory": "benchmarks.bench_plan_memory",
}
# the options every benchmark takes (benchmarks/harness.py cli_args), listed in --help and passed to each
PASSED: list[tuple[str, dict]] = [
    ("--device", {"help": "cpu | cuda | cuda:N (default: cuda when available, else cpu)"}),
    ("--quick", {"action": "store_true", "help": "small shapes and few rounds (a smoke test)"}),
    ("--shape", {"help": "model shape: cpu | gpt2_124m (default: gpt2_124m on CUDA, cpu elsewhere)"}),
    ("--batch-size", {"help": "rows per batch (default: the shape's)"}),
    ("--rounds", {"help": "timed rounds per contender"}),
    ("--threads", {"help": "CPU intra-op threads (default 1)"}),
    ("--no-compile", {"action": "store_true", "help": "skip the torch.compile contenders"}),
    ("--no-hf-compile", {"action": "store_true", "help": "skip transformers' compiled contenders"}),
    ("--no-record", {"action": "store_true", "help": "do not append rows to RESULTS.md"}),
]
# benchmarks whose cases have their own shapes: --shape / --batch-size are not passed
OWN_SHAPES = {"gqa", "moe", "mixers", "plan_memory"}
ROOT = Path(__file__).resolve().parent.parent


def without_shape(args: list[str]) -> list[str]:
    """``args`` less ``--shape X`` / ``--batch-size N`` (either spelling: ``--shape=X`` too)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--shape", "--batch-size"):
            skip = True
        elif not a.startswith(("--shape=", "--batch-size=")):
            out.append(a)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,  # a benchmark's own options pass through whole
        description=__doc__.split("\n\n")[0],
        epilog="A benchmark's own options (e.g. bench_checkpointing's --modes) go with --only that benchmark.",
    )
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only this one (repeatable)")
    passed = p.add_argument_group("passed to every benchmark")
    for flag, kwargs in PASSED:
        passed.add_argument(flag, **kwargs)
    return p


def parse(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(benchmarks to run, the arguments each receives: the shared options given, then the others)."""
    args, rest = parser().parse_known_args(argv)
    shared: list[str] = []
    for flag, kwargs in PASSED:
        value = getattr(args, flag[2:].replace("-", "_"))
        if kwargs.get("action") == "store_true":
            shared += [flag] if value else []
        elif value is not None:
            shared += [flag, value]
    return args.only or list(BENCHMARKS), shared + rest


def main(argv: list[str] | None = None) -> int:
    names, rest = parse(argv)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    failed = []
    for name in names:
        start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] === {name} ===", flush=True)
        args_for = without_shape(rest) if name in OWN_SHAPES else rest
        if args_for != rest:
            print(f"{name}: its cases have their own shapes; --shape / --batch-size not passed", flush=True)
        code = subprocess.call([sys.executable, "-m", BENCHMARKS[name], *args_for], cwd=ROOT, env=env)
        print(
            f"[{time.strftime('%H:%M:%S')}] === {name}: {'ok' if code == 0 else f'FAILED ({code})'} in "
            f"{time.perf_counter() - start:.0f} s ===",
            flush=True,
        )
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
