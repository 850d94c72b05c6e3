"""Shared test fixtures. Tests build everything they need: no downloads, no ../shared."""

from __future__ import annotations

import os

import pytest
import torch

# Two CPU cores: keep each test process to its share so parallel workers do not thrash.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def small_model_dict(**changes) -> dict:
    """A small valid model config (plain dict) for fast CPU tests."""
    cfg = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 4,
        "max_position_embeddings": 64,
        "attention": {"type": "mha"},
        "ffn": {"type": "mlp"},
        "norm": {"type": "layernorm"},
        "position": {"type": "learned"},
        "head": {"type": "lm"},
    }
    cfg.update(changes)
    return cfg


@pytest.fixture
def small_config() -> dict:
    return small_model_dict()


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the tiny CPU tensors of the core tests: on the shared 2-core
    machines a second OpenMP thread mostly spins and makes small ops many times slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
