"""Small helpers of the data side that need neither torch nor Lightning (so composer-prepare starts fast)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.options import IGNORE_INDEX, is_int, is_number
from ..errors import Problem

__all__ = ["IGNORE_INDEX"]  # re-exported: the data modules' label padding


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """A NumPy generator that depends only on ``seed`` and the integers in ``stream``."""
    return np.random.default_rng([seed % 2**63, *stream])


def check_positive(values: dict[str, Any]) -> list[Problem]:
    """Problems for each ``data.<key>`` that is not a positive integer."""
    return [
        Problem(f"data.{k}", f"{v!r} must be a positive integer", "set it to an integer >= 1")
        for k, v in values.items()
        if not is_int(v) or v < 1
    ]


def stream_problems(seq_len: Any, batch_size: Any, num_workers: Any) -> list[Problem]:
    """Problems with the options every data module has."""
    problems = check_positive({"seq_len": seq_len, "batch_size": batch_size})
    if not is_int(num_workers) or num_workers < 0:
        problems.append(
            Problem(
                "data.num_workers",
                f"{num_workers!r} must be an integer >= 0",
                "use 0 (load in the training process) or a small worker count",
            )
        )
    return problems


def missing_path(path: Any, key: str = "data.path") -> list[Problem]:
    if path is None or str(path) in ("", "???"):
        return [Problem(key, "no path given", f"set {key}=<file or folder> on the command line", missing=True)]
    return []


def check_fraction(value: Any, key: str = "val_fraction") -> list[Problem]:
    ok = is_number(value) and 0 < value < 1
    return (
        []
        if ok
        else [
            Problem(
                f"data.{key}",
                f"{value!r} must be a number strictly between 0 and 1",
                "e.g. 0.1 keeps the last 10% for validation",
            )
        ]
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32."""
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")  # little-endian on disk, on every machine


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, os.replace."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:  # permissions from the umask, like any new file
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
