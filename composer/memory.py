"""Process-memory probes of a run: the peak resident set (host) and the CUDA allocator's peak.

    start = reset_peak_memory()    # this run's count starts here (a sweep runs many jobs in one process)
    ...                            # train
    peak_memory()                  # {"peak_rss_mb": ..., "peak_gpu_mb": ...} (metrics.json's keys)

On Linux the host figures come from /proc/self/status (VmRSS, VmHWM; the high-water mark is reset
through /proc/self/clear_refs); elsewhere the peak is the process's ``ru_maxrss`` since it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import sys
from pathlib import Path
from typing import Optional

import torch


def proc_status_mb(field: str) -> Optional[float]:
    """A memory line of /proc/self/status (Linux) in MiB; None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def reset_peak_memory() -> Optional[float]:
    """Start this run's peak-memory count (a sweep runs many jobs in one process): the CUDA
    allocator's peak and, on Linux, the process's peak resident set (VmHWM, reset via clear_refs).
    Returns the resident set now (MiB; None off Linux): what the run's peak is measured from."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    release_freed_memory()
    with contextlib.suppress(OSError):  # not Linux (or not allowed): peak_rss_mb is the process's peak so far
        Path("/proc/self/clear_refs").write_text("5")
    return proc_status_mb("VmRSS")


def release_freed_memory() -> None:
    """Hand the memory an earlier run of this process freed back to the OS, so that this run's
    resident set starts low and its peak counts its own allocations: glibc keeps freed heap
    pages (a sweep's second run would otherwise reuse them unseen); malloc_trim returns them."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def peak_memory() -> dict[str, Optional[float]]:
    """``peak_rss_mb`` (host, this process) and ``peak_gpu_mb`` (CUDA allocator; None without CUDA)."""
    rss = proc_status_mb("VmHWM")
    if rss is None:
        import resource  # late: Unix only (no such module on Windows); needed off Linux only

        scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    gpu = (
        torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return {"peak_rss_mb": rss, "peak_gpu_mb": gpu}


__all__ = ["peak_memory", "proc_status_mb", "release_freed_memory", "reset_peak_memory"]
