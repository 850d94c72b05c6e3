"""Every console script, run as a user would, with a table of bad arguments: each exits 2 with one
message (starting with "error:") and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

CASES = [
    ("composer-plan", ["model=no_such_preset"]),
    ("composer-plan", ["model=tiny", "batch_size=x"]),
    ("composer-plan", ["model=tiny", "device=tpu"]),
    ("composer-plan", ["model=tiny", "model.init_std=nan"]),
    ("composer-plan", ["model=tiny", "model.num_layers=100000"]),
    ("composer-components", ["no_such_family"]),
    ("composer-components", ["--yaml", "attention/no_such"]),
    ("composer-prepare", ["{tmp}/missing.txt", "{tmp}/out"]),
    ("composer-train", ["model.hidden_sise=3"]),
    ("composer-train", ["trainer.max_steps=0"]),
    ("composer-train", ["model.vocab_size=4611686018427387904"]),
    ("composer-train", ["ckpt_path={tmp}/missing.ckpt"]),
    ("composer-import", ["{tmp}/missing", "{tmp}/out"]),
    ("composer-import", ["--no-such-flag"]),
    ("composer-export", ["{tmp}/missing", "{tmp}/out"]),
    ("composer-export", ["{ckpt}", "{ckpt}"]),
    ("composer-generate", []),
    ("composer-generate", ["ckpt={ckpt}", "prompt_ids=1,2", "max_new_tokens=-1"]),
    ("composer-generate", ["ckpt={ckpt}", "prompt_ids=1,2", "device=tpu"]),
    ("composer-generate", ["ckpt={ckpt}", "prompt_ids=1,2", "temperature=nan", "do_sample=true"]),
    ("composer-report", ["{tmp}/no_such_sweep"]),
    ("composer-train", ["hydra.run.dir=/proc/no_such/run"]),
    ("composer-train", ["-m", "seed=1,2", "hydra.sweep.dir=/proc/no_such/sweep"]),
    ("composer-train", ["--config-dir", "{tmp}", "model=broken"]),
    ("composer-plan", ["--config-dir", "{tmp}", "model=broken"]),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from composer import compose
    from tests.conftest import small_model_dict

    folder = tmp_path_factory.mktemp("ckpt")
    compose(small_model_dict(), seed=0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("script, args", CASES, ids=[f"{s} {' '.join(a)}" for s, a in CASES])
def test_bad_arguments_exit_2_with_one_message(script, args, ckpt, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "broken.yaml").write_text("defaults: [tiny, _self_]\nnum_layers: [2\n")
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args]
    out = subprocess.run([str(BIN / script), *argv], capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert out.returncode == 2, (out.returncode, out.stdout[-800:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-2000:]
    message = out.stderr.strip()
    assert message.startswith(("error:", f"{script}:")), message[-1000:]
    assert message.count("error:") <= 1 and message.count(f"{script}:") <= 1, message
    assert not (tmp_path / "outputs").exists(), "a failed validation leaves nothing behind"
