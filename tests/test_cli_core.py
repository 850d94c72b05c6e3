"""composer-plan and composer-components as a user runs them: exit codes, output, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from composer.catalogue import component_yaml
from composer.registry import FAMILIES

ROOT = Path(__file__).parent.parent


def run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_plan_prints_exact_counts_and_memory():
    out = run("composer.cli.plan", "model=gpt2", "batch_size=16", "seq_len=1024", "checkpointing=every_layer")
    assert out.returncode == 0, out.stderr
    assert "124,439,808" in out.stdout
    assert "every layer checkpointed" in out.stdout and "KV cache / token" in out.stdout


def test_plan_takes_model_overrides_and_user_config_dirs(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("defaults:\n  - gpt2\n  - _self_\nname: mine\nnum_layers: 2\n")
    out = run("composer.cli.plan", "model=mine", "--config-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "mine: layers" in out.stdout


def test_plan_errors_exit_2_without_traceback():
    out = run("composer.cli.plan", "model=gpt2", "model.num_heads=7")
    assert out.returncode == 2
    assert "model.hidden_size" in out.stderr and "Traceback" not in out.stderr
    out = run("composer.cli.plan", "model=gtp2")
    assert out.returncode == 2 and "did you mean 'gpt2'" in out.stderr and "Traceback" not in out.stderr
    out = run("composer.cli.plan", "batch_size=many")
    assert out.returncode == 2 and "batch_size" in out.stderr


def test_full_traceback_on_request():
    out = run("composer.cli.plan", "model=gtp2", env={"HYDRA_FULL_ERROR": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_components_catalogue_lists_every_component():
    out = run("composer.cli.components")
    assert out.returncode == 0, out.stderr
    for registry in FAMILIES.values():
        for name in registry.names():
            assert name in out.stdout


def test_components_yaml_and_bad_family():
    out = run("composer.cli.components", "--yaml", "attention/gqa")
    assert out.returncode == 0 and out.stdout == component_yaml("attention", "gqa")
    out = run("composer.cli.components", "atention")
    assert out.returncode == 2 and "unknown family" in out.stderr and "Traceback" not in out.stderr
