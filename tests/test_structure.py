"""The tree keeps its one-way shape: import contracts hold, no project module is imported inside a
function (but a command-line entry point deferring its heavy half), every late import says why, and
product files stay under 600 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = [p for pkg in ("composer", "components") for p in sorted((REPO / pkg).rglob("*.py"))]
# command-line entry points may defer their heavy half until the config has validated
ENTRY_POINTS = {"composer/train.py", "composer/report.py", "composer/prepare.py"}
MAX_LINES = 600


def _late_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, the line's text) of every import inside a function."""
    source = path.read_text()
    lines = source.splitlines()
    out = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                out += [(node.lineno, a.name, lines[node.lineno - 1]) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                out.append((node.lineno, module, lines[node.lineno - 1]))
    return sorted(set(out))


def _is_project(module: str) -> bool:
    return module.startswith(".") or module.split(".")[0] in ("composer", "components")


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_inside_functions_are_late_third_party_ones_with_a_reason(path):
    rel = str(path.relative_to(REPO))
    for line, module, text in _late_imports(path):
        if _is_project(module):
            assert rel in ENTRY_POINTS or rel.startswith("composer/cli/"), (
                f"{rel}:{line} imports {module} inside a function: import it at the top (a cycle? then the "
                "layering is wrong, see ARCHITECTURE.md)"
            )
        assert "# late:" in text, f"{rel}:{line}: a late import of {module} needs a '# late: <reason>' comment"


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(REPO)))
def test_product_files_stay_small(path):
    assert len(path.read_text().splitlines()) < MAX_LINES, f"{path.relative_to(REPO)}: split it by concern"


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), "import-linter is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "broken" not in out.stdout.lower().replace("0 broken", "")
