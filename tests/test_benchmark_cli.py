"""The benchmark scripts' command lines: a bad option stops them at once, with the option named and no
traceback. (The benchmarks themselves run with `make bench`, never in the test suite; these run them as
subprocesses from the repository root, as `make bench` does.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--no-record", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("bench_train_step", ["--batch-size", "0"], "argument --batch-size: '0' is not a whole number >= 1"),
        ("bench_checkpointing", ["--rounds", "two"], "argument --rounds: 'two' is not a whole number >= 1"),
        ("bench_flex", ["--shape", "cpu"], "--shape cpu does not apply"),
        ("bench_gqa", ["--batch-size", "4"], "--shape / --batch-size do not apply"),
        ("bench_train_step", ["--contenders", "composed,fast"], "argument --contenders: unknown contender(s) fast"),
        ("bench_decode", ["--device", "tpu:x"], "--device: 'tpu:x' is not a device"),
        ("bench_plan_memory", ["--stacks", "mamba3_gqa"], "argument --stacks: 'mamba3_gqa': a comma-separated subset"),
        ("bench_plan_memory", ["--shape", "cpu"], "--shape / --batch-size do not apply"),
    ],
)
def test_a_bad_option_is_named_without_a_traceback(module, args, message):
    done = bench(module, *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_says_so():
    done = bench("bench_build", "--device", "cuda", "--quick")
    assert done.returncode != 0
    assert "--device: 'cuda': this torch" in done.stderr and "sees no CUDA device" in done.stderr
    assert "Traceback" not in done.stderr
