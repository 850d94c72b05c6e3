"""Devices: turn a user's ``device`` argument into a ``torch.device`` this process can use."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import InvalidParameter, Problem


def target_device(device: Any, argument: str = "device") -> torch.device:
    """``device`` (None: CPU) as a torch.device this process can use. Raises InvalidParameter naming
    ``argument`` for a string that is no device or an accelerator this torch does not see, before
    anything is allocated (torch's own errors there come late and name neither)."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device if device is not None else "cpu")
        except (RuntimeError, TypeError):
            raise InvalidParameter(
                [Problem(argument, f"{device!r} is not a device", "use cpu, cuda or cuda:<index>")]
            ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidParameter(
                [
                    Problem(
                        argument,
                        f"{device!r}: this torch ({torch.__version__}) sees no CUDA device",
                        "use cpu, or run where a GPU and a CUDA build of torch are",
                    )
                ]
            )
        if dev.index is not None and dev.index >= count:
            raise InvalidParameter(
                [
                    Problem(
                        argument,
                        f"{device!r}: this machine has {count} CUDA device(s)",
                        f"use cuda:0 ... cuda:{count - 1}",
                    )
                ]
            )
    return dev


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def target_dtype(dtype: Any, argument: str = "dtype") -> Optional[torch.dtype]:
    """``dtype`` (None, a torch floating dtype or its name: "bfloat16", "torch.float16") as a torch.dtype;
    InvalidParameter naming ``argument`` otherwise."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else None
    if name in FLOAT_DTYPES:
        return getattr(torch, name)
    raise InvalidParameter(
        [
            Problem(
                argument,
                f"{dtype!r} is not a floating dtype",
                f"use one of {', '.join(FLOAT_DTYPES)} (a name or torch.<name>)",
            )
        ]
    )


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new tensors on ``device``: CUDA's free memory, a Linux host's MemAvailable; None
    where this process cannot tell (then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_fits(needed: int, device: torch.device, what: str) -> None:
    """InvalidParameter stating both numbers when ``needed`` bytes do not fit in what ``device`` has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise InvalidParameter(
            [
                Problem(
                    "model",
                    f"{what}: {needed / 2**30:,.2f} GiB needed on {device}, {free / 2**30:,.2f} GiB free",
                    "use a smaller model (or dtype), another device, or device='meta' to inspect it without allocating",
                )
            ]
        )
