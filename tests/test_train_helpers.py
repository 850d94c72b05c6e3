"""Shared helpers of the training tests (no tests here): tiny run configs and CLI runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parent.parent

# A run that takes seconds: one small layer, short recall sequences, few steps.
TINY = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.max_position_embeddings=32",
    "data.vocab_size=16",
    "data.num_pairs=4",
    "data.seq_len=16",
    "data.batch_size=8",
    "data.num_val_examples=32",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_steps=2",
    "callbacks.progress_bar=none",
    "trainer.accelerator=cpu",
]


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: the test machines' cores are shared, and oversubscribed OpenMP
    threads make small CPU steps many times slower. (Each test module uses it in an autouse
    fixture or ``pytest.mark.usefixtures("one_torch_thread")``.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``composer-train <argv>`` in this process: (exit status, stdout, stderr)."""
    from composer.train import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


class Repeat(Dataset):
    """The same ready-made batch ``n`` times (use with DataLoader(batch_size=None))."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.batch


def run_inprocess(run_dir: Path, *overrides: str, console=None) -> dict:
    """``composer.run.train`` on the composed config (no Hydra app, no subprocess)."""
    from composer.config import load_config
    from composer.run import train

    overrides = [*TINY, *overrides]
    return train(load_config(overrides), run_dir, overrides, console=console)


def cli(args: Sequence[str], cwd: Path, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """``python -m composer.train <args>`` in ``cwd`` (one OpenMP thread per process)."""
    return subprocess.run(
        [sys.executable, "-m", "composer.train", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def cli_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())
