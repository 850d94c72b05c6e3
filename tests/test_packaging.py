"""The built wheel works on its own: conf/ ships inside the package (as composer.conf), so a
regular (non-editable) install composes presets from any directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys
    repo, site = sys.argv[1], sys.argv[2]
    # the venv's editable install of the checkout must not answer imports here
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p and p.rstrip("/") != repo]  # (compat mode)
    # nothing of the checkout on the path (the venv's site-packages may live inside it)
    assert not [p for p in sys.path if p.startswith(repo) and not p.startswith(sys.prefix)], sys.path

    import components
    import composer
    from composer import compose, conf_dir, load_config

    for module in (composer, components):
        assert module.__file__.startswith(site), module.__file__
    assert str(conf_dir()).startswith(site), conf_dir()
    model = compose(load_config(["model=gpt2"]).model, device="meta")
    print("gpt2", model.num_parameters())
    cfg = load_config(["model=llama3_8b", "model/attention=sliding_window", "model.attention.window=512"])
    print("llama3", compose(cfg.model, device="meta").config.attention.window)
""")


@pytest.mark.slow
def test_wheel_ships_the_config_tree(tmp_path):
    src = tmp_path / "src"  # build from a copy: the checkout stays untouched (no build/ or egg-info)
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("composer", "components", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "transformer_composer.py"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        cwd=tmp_path,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, (
        f"building the wheel failed (pyproject's build-system.requires installed?):\n{built.stderr[-3000:]}"
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        cwd=tmp_path,
        timeout=300,
        capture_output=True,
    )
    assert (site / "composer" / "conf" / "model" / "gpt2.yaml").is_file()
    assert (site / "transformer_composer.py").is_file()  # the console scripts' entry points
    assert (site / "composer" / "conf" / "model" / "attention" / "gqa.yaml").is_file()

    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(REPO), str(site)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gpt2 124439808" in out.stdout and "llama3 512" in out.stdout, out.stdout
