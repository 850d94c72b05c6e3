"""The import name ``composer``: a folder named composer beside a script and MosaicML Composer (which owns
the same import name) are detected, and the console scripts say what is happening and how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import transformer_composer

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def _fake_mosaicml(site: Path) -> Path:
    """A site folder holding a 'mosaicml' distribution that ships its own composer package."""
    (site / "composer").mkdir(parents=True)
    (site / "composer" / "__init__.py").write_text("from composer.trainer import Trainer  # MosaicML's\n")
    dist = site / "mosaicml-0.31.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mosaicml\nVersion: 0.31.0\n")
    (dist / "RECORD").write_text("composer/__init__.py,,\n")
    return site


def test_this_projects_package_is_found():
    assert transformer_composer.import_name_problem() is None
    assert transformer_composer.OURS == REPO / "composer" / "__init__.py" or "site-packages" in str(
        transformer_composer.OURS
    )


def test_a_folder_named_composer_beside_a_script_is_named(tmp_path):
    (tmp_path / "composer").mkdir()
    (tmp_path / "composer" / "README.md").write_text("a clone")
    (tmp_path / "script.py").write_text(
        "import importlib.util, transformer_composer as t\n"
        "spec = importlib.util.find_spec('composer')\n"
        "print('namespace' if spec.origin is None else 'package', '|', t.import_name_problem())\n"
    )
    out = _run([sys.executable, "script.py"], tmp_path)
    kind, _, problem = out.stdout.strip().partition(" | ")
    if kind == "namespace":  # a finder-based editable install: the folder hides the package, and is named
        assert f"resolves to the folder {tmp_path / 'composer'}" in problem and "rename the clone" in problem
    else:  # `make setup` (editable_mode=compat) or a wheel: the folder cannot hide the package
        assert kind == "package" and problem == "None", out
        ok = _run([sys.executable, "-c", "from composer import compose; print('ok')"], tmp_path)
        assert ok.stdout.strip() == "ok", ok.stderr


def test_mosaicml_composer_in_the_way_is_named_by_the_console_scripts(tmp_path):
    site = _fake_mosaicml(tmp_path / "site")
    out = _run([str(BIN / "composer-plan"), "model=tiny"], tmp_path, PYTHONPATH=str(site))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "mosaicml 0.31.0 (MosaicML Composer)" in out.stderr
    assert "separate virtual environment" in out.stderr and "pip uninstall mosaicml" in out.stderr


def test_mosaicml_installed_alongside_warns_on_import(tmp_path):
    site = _fake_mosaicml(tmp_path / "site")
    (site / "composer" / "__init__.py").unlink()
    (site / "composer").rmdir()  # only its metadata: this project's package is the one imported
    code = "import warnings; warnings.simplefilter('error'); import composer"
    out = _run([sys.executable, "-c", code], tmp_path, PYTHONPATH=str(site))
    assert out.returncode == 1 and "MosaicML Composer (mosaicml 0.31.0) is installed" in out.stderr
    assert _run([sys.executable, "-c", code], tmp_path).returncode == 0
