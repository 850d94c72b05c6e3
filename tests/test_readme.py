"""Every ```python block of README.md runs as written, each in a fresh namespace in an empty folder
(none may opt out: a block builds what it needs). A bare
expression whose trailing comment is itself a Python value (``out.logits.shape  # torch.Size([2, 16])``)
must evaluate to that value: what the README shows as a result is checked too.
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_helpers import cli_env

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, i = i + 1, i + 1
            while lines[i].strip() != "```":
                i += 1
            blocks.append((start, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def shown_results(code: str) -> list[tuple[int, str, str]]:
    """(line, expression, comment) for each bare expression statement with a trailing comment."""
    lines = code.splitlines()
    out = []
    for node in ast.parse(code).body:
        if isinstance(node, ast.Expr) and node.lineno == node.end_lineno:
            line = lines[node.lineno - 1]
            expr = ast.get_source_segment(code, node)
            rest = line[node.end_col_offset :].strip()
            if rest.startswith("#"):
                out.append((node.lineno, expr, rest[1:].strip()))
    return out


def as_value(comment: str, namespace: dict) -> tuple[bool, object]:
    """(True, value) if the comment is a Python expression that evaluates, else (False, None)."""
    try:
        return True, eval(comment, dict(namespace))  # noqa: S307  (the README's own text)
    except Exception:  # prose, not a value
        return False, None


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands in an empty folder
    threads = torch.get_num_threads()
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
    assert torch.get_num_threads() == threads  # generation restores torch's thread count
    for lineno, expr, comment in shown_results(code):
        ok, want = as_value(comment, namespace)
        if ok:
            got = eval(expr, namespace)  # noqa: S307
            assert got == want, f"README.md:{line + lineno - 1}: {expr} is {got!r}, the README says {comment}"
    capsys.readouterr()


def test_the_shown_results_are_checked():
    """The check above is not vacuous: the first block's shape comment is read as a value."""
    results = shown_results(BLOCKS[0][1])
    assert any(ok for ok, _ in (as_value(c, {"torch": torch}) for _, _, c in results))


def bash_commands_after(marker: str) -> list[str]:
    """The commands of the first ```bash block after the README line holding ``marker``: continuation
    lines joined, trailing comments dropped."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    start = next(i for i in range(start, len(lines)) if lines[i].strip() == "```bash") + 1
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "```")
    text = "\n".join(lines[start:end]).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_hybrid_walkthrough_runs_as_written(tmp_path):
    """README "A hybrid of linear-time mixers ...": plan a preset hybrid and a pattern, train the pattern,
    generate from what it wrote, each through its console script (the run folder pinned to find it)."""
    commands = bash_commands_after("A hybrid of linear-time mixers")
    assert [c[0] for c in commands] == ["composer-plan", "composer-plan", "composer-train", "composer-generate"]
    run = tmp_path / "run"
    for argv in commands:
        if argv[0] == "composer-train":
            argv = [*argv, f"hydra.run.dir={run}", "trainer.cpu_threads=1"]
        if argv[0] == "composer-generate":
            argv = [a.replace("outputs/<date>/<time>/model", str(run / "model")) for a in argv] + ["device=cpu"]
        exe = Path(sys.executable).with_name(argv[0])
        res = subprocess.run(
            [str(exe), *argv[1:]], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, (argv, res.stderr[-2000:])
        if argv[0] == "composer-plan" and "bamba_9b" in argv:
            assert "12.00 KiB" in res.stdout  # the KV cache per token the README's comment states
    assert (run / "model").is_dir() and res.stdout.strip()
