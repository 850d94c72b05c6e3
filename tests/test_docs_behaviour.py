"""What the docs and the help texts say is what the tools do: the benchmark runner's options, the
summary's parameter count next to the preset's, the files a run's model/ folder holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from composer.summary import summary_rows

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runner_help_lists_the_options_it_passes_on():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    for flag in ("--quick", "--threads", "--device", "--shape", "--rounds", "--no-record", "--only"):
        assert flag in done.stdout, flag
    from benchmarks.run import parse

    names, passed = parse(["--quick", "--threads", "2", "--only", "checkpointing", "--modes", "none"])
    assert names == ["checkpointing"] and passed == ["--quick", "--threads", "2", "--modes", "none"]


def test_the_summary_says_why_the_parameter_count_differs_from_the_presets():
    """tiny has 885,888 parameters with its own vocabulary of 256 (README); on the recall data the
    vocabulary is the data's (64), and the summary says so next to the count."""
    record = {"model": "tiny", "params": 861_312, "vocab_size": 64, "preset_vocab_size": 256}
    assert dict(summary_rows(record))["model"] == (
        "tiny (861,312 parameters; vocabulary 64 from the data, the preset's is 256)"
    )
    assert dict(summary_rows({"model": "tiny", "params": 885_888, "vocab_size": 256}))["model"] == (
        "tiny (885,888 parameters)"
    )
