"""The shared benchmark harness: contenders run interleaved in one process, medians, ratios, results.

    timings = interleave({"composed": step_a, "handwritten": step_b}, rounds=10, device=device)
    ratio = speed_ratio(timings, "composed", "handwritten")          # > 1: composed is faster
    save("train_step", {"timings": summary(timings, tokens), ...})   # benchmarks/out/train_step.json
    append_rows([row("train step", "composed / hand-written", ratio, goal=0.98)])  # benchmarks/RESULTS.md

Contenders run A B C A B C ... so a change in machine load hits them alike; the statistic is the
median. Each call is timed by the wall clock (after a device synchronisation on CUDA) and, on CPUs,
also by the process CPU time: on a shared machine the CPU time counts only this process's work, so
it is the figure ratios are taken from there (the wall clock is reported beside it).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("BENCH_OUT", HERE / "out"))
RESULTS = Path(os.environ.get("BENCH_RESULTS", HERE / "RESULTS.md"))


# ----------------------------------------------------------------------------- the machine
def setup_device(device: str, threads: Optional[int] = None) -> torch.device:
    """The device to run on; CPUs get ``threads`` intra-op threads (default 1: contenders then never wait on
    each other's OpenMP threads on a shared machine, and CPU time measures the work exactly). CUDA gets TF32."""
    from composer.errors import ConfigError
    from composer.model import target_device

    try:
        dev = target_device(device, "--device")
    except ConfigError as exc:
        raise SystemExit(f"invalid benchmark arguments: {exc.problems[0]}") from None
    if dev.type == "cpu":
        torch.set_num_threads(threads or 1)
    elif dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} thread(s))"


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures depend on: device, versions, threads, load, date."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_1min": load,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds per call of one contender: wall clock and process CPU time (CPU devices)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median(self, use_cpu: bool) -> float:
        return statistics.median(self.cpu if use_cpu and self.cpu else self.wall)


def interleave(
    contenders: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device,
    warmup: int = 1,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Timing]:
    """Run every contender ``warmup`` times (untimed), then ``rounds`` times each, interleaved."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
            sync(device)
    timings = {name: Timing() for name in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            gc.collect()
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            timings[name].wall.append(time.perf_counter() - w0)
            if device.type == "cpu":
                timings[name].cpu.append(time.process_time() - c0)
        if log:
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {t.wall[-1] * 1e3:.0f} ms" for n, t in timings.items()))
    return timings


def uses_cpu_time(device: torch.device) -> bool:
    """Ratios on CPUs come from CPU time (single-threaded runs), on accelerators from the wall clock."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def speed_ratio(timings: dict[str, Timing], a: str, b: str, device: torch.device) -> float:
    """Speed of ``a`` relative to ``b`` (> 1: a is faster), from medians."""
    cpu = uses_cpu_time(device)
    return timings[b].median(cpu) / timings[a].median(cpu)


def summary(timings: dict[str, Timing], work: float, device: torch.device, unit: str = "tokens") -> dict[str, Any]:
    """Per contender: median seconds (wall, CPU) and ``work`` per second (``unit``/s) by the ratio clock."""
    out = {}
    cpu = uses_cpu_time(device)
    for name, t in timings.items():
        med = t.median(cpu)
        out[name] = {
            "median_wall_s": statistics.median(t.wall),
            "median_cpu_s": statistics.median(t.cpu) if t.cpu else None,
            f"{unit}_per_s": work / med,
            "clock": "cpu" if cpu else "wall",
            "samples_wall_s": [round(x, 5) for x in t.wall],
        }
    return out


# ----------------------------------------------------------------------------- memory
class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active and still alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self._seen or key in inputs or storage.nbytes() == 0:  # views and in-place results
                    continue
                self._seen[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, key)
        return out


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the peak of tensor storages created inside ``fn`` and
    alive at the same time (tracked op by op; eager code only: compiled kernels allocate out of sight)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    mode = _LiveBytes()
    with mode:
        fn()
    return mode.peak


def absolute_peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """CUDA: the whole process's peak allocated bytes during ``fn()`` (weights and optimizer state included);
    None elsewhere."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# ----------------------------------------------------------------------------- results
def save(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as benchmarks/out/<name>.json (atomically) and return the path."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


HEADER = "| date | device | torch | benchmark | measured | value | goal | met |\n|---|---|---|---|---|---|---|---|\n"


def row(
    env: dict[str, Any],
    benchmark: str,
    measured: str,
    value: float,
    goal: Optional[float] = None,
    higher_is_better: bool = True,
    fmt: str = "{:.3g}",
    unit: str = "",
) -> dict[str, str]:
    """One RESULTS.md row: ``measured`` names the figure (e.g. "composed / hand-written, tokens/s")."""
    if goal is None:
        met = ""
    else:
        met = "yes" if (value >= goal if higher_is_better else value <= goal) else "**no**"
    sign = ">=" if higher_is_better else "<="
    return {
        "date": env["date"],
        "device": env["device"],
        "torch": env["torch"],
        "benchmark": benchmark,
        "measured": measured,
        "value": fmt.format(value) + unit,
        "goal": "" if goal is None else f"{sign} {fmt.format(goal)}{unit}",
        "met": met,
    }


def append_rows(rows: list[dict[str, str]], path: Path = RESULTS) -> None:
    """Append ``rows`` to the results table at the end of RESULTS.md (creating the table if needed)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if HEADER not in text:
        text = text.rstrip("\n") + "\n\n" + HEADER
    elif not text.endswith("\n"):
        text += "\n"
    for r in rows:
        cells = [
            str(r[k]).replace("|", "/")
            for k in ("date", "device", "torch", "benchmark", "measured", "value", "goal", "met")
        ]
        text += "| " + " | ".join(cells) + " |\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def start(name: str, args: Any) -> tuple[Callable[[str], None], torch.device, dict[str, Any]]:
    """What every benchmark does first: its logger, the device set up from ``args``, the environment."""
    device = setup_device(args.device, args.threads)
    return logger(name), device, environment(device)


def save_partial(name: str, result: dict[str, Any], args: Any) -> Path:
    """Save ``result`` as benchmarks/out/<name>[_quick].json (also between stages: a time limit then
    keeps what was measured)."""
    return save(name + ("_quick" if args.quick else ""), result)


def finish(name: str, result: dict[str, Any], rows: list[dict[str, str]], args: Any) -> dict[str, Any]:
    """Save ``result`` (save_partial) and, unless ``--quick`` or ``--no-record``, append ``rows`` to
    RESULTS.md. Returns ``result``."""
    save_partial(name, result, args)
    if not args.no_record and not args.quick:
        append_rows(rows)
    return result


def logger(name: str) -> Callable[[str], None]:
    """A timestamped progress printer for benchmark ``name``."""

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {message}", flush=True)

    return log


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the option in its error)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def cli_args(description: str, argv: Optional[list[str]] = None, extra: list[tuple[str, dict]] = ()):
    """The options every benchmark script takes (plus ``extra`` (flag, argparse keywords) pairs)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    for flag, kwargs in extra:
        p.add_argument(flag, **kwargs)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few rounds (a smoke test)")
    from benchmarks.models import SHAPES

    p.add_argument(
        "--shape",
        choices=[name for name in SHAPES if name != "quick"],
        default=None,  # quick: --quick
        help="model shape (default: gpt2_124m on CUDA, cpu elsewhere; see benchmarks/models.py SHAPES)",
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="rows per batch (default: the shape's)")
    p.add_argument("--rounds", type=positive_int, default=None, help="timed rounds per contender")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU intra-op threads (default 1)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    p.add_argument("--no-hf-compile", action="store_true", help="skip transformers' compiled contenders")
    p.add_argument("--no-record", action="store_true", help="do not append rows to RESULTS.md")
    return p.parse_args(argv)
