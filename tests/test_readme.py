"""Every ```python block of README.md runs as written, each in a fresh namespace in an empty folder
(none may opt out: a block builds what it needs). A bare
expression whose trailing comment is itself a Python value (``out.logits.shape  # torch.Size([2, 16])``)
must evaluate to that value: what the README shows as a result is checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

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
