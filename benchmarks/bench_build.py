"""Benchmark 5: build time of every preset on the meta device, and checkpoint load vs a bare safetensors load.

    python -m benchmarks.bench_build [--device cuda] [--quick]

Build: ``compose(cfg, device="meta")`` per preset (the config already composed by Hydra; that time is
reported beside it); median of the rounds after one warm-up call. Load: ``ComposedModel.from_pretrained``
vs ``safetensors.torch.load_file`` of the same model.safetensors onto the same device, both forcing every
byte to be read (each tensor is summed); interleaved, the file warm in the page cache for both.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks import harness
from benchmarks.models import Shape, build_composed
from composer.config import conf_dir, load_config
from composer.model import ComposedModel, compose


def presets() -> list[str]:
    return sorted(p.stem for p in (Path(conf_dir()) / "model").glob("*.yaml") if not p.stem.startswith("_"))


def time_build(name: str, rounds: int) -> dict[str, float]:
    t0 = time.perf_counter()
    cfg = load_config([f"model={name}"]).model
    config_s = time.perf_counter() - t0
    compose(cfg, device="meta")  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        model = compose(cfg, device="meta")
        times.append(time.perf_counter() - t0)
    return {
        "compose_meta_s": statistics.median(times),
        "max_s": max(times),
        "load_config_s": config_s,
        "params": model.num_parameters(),
    }


def read_all(state: Any) -> float:
    """Sum every tensor (forces the bytes to be read from the file / mapping)."""
    tensors = state.values() if isinstance(state, dict) else state.state_dict().values()
    unique = {t.data_ptr(): t for t in tensors}.values()  # a tied weight is read once
    return sum(float(t.sum(dtype=torch.float64)) for t in unique)


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from safetensors.torch import load_file

    args = harness.cli_args(__doc__.splitlines()[0], argv)
    log, device, env = harness.start("build", args)
    rounds = args.rounds or (2 if args.quick else 5)
    rows = []
    builds = {}
    for name in presets():
        builds[name] = time_build(name, rounds)
        log(
            f"{name}: compose(device='meta') {builds[name]['compose_meta_s'] * 1e3:.1f} ms "
            f"({builds[name]['params']:,} parameters; Hydra config {builds[name]['load_config_s'] * 1e3:.0f} ms)"
        )
        rows.append(
            harness.row(
                env,
                f"build {name} ({builds[name]['params'] / 1e6:,.0f}M parameters)",
                "compose(device='meta') seconds",
                builds[name]["compose_meta_s"],
                1.0 if name == "llama3_8b" else None,
                higher_is_better=False,
                fmt="{:.3f}",
                unit=" s",
            )
        )

    shape = Shape.from_args(args, device)
    model = build_composed(shape, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        file = Path(tmp) / "model.safetensors"
        size = file.stat().st_size
        dev = str(device)
        fns = {
            "from_pretrained": lambda: read_all(ComposedModel.from_pretrained(tmp, device=dev)),
            "safetensors_load_file": lambda: read_all(load_file(str(file), device=dev)),
        }
        sums = {n: fn() for n, fn in fns.items()}
        if abs(sums["from_pretrained"] - sums["safetensors_load_file"]) > 1e-9 * max(1.0, abs(sums["from_pretrained"])):
            raise AssertionError(f"the two loads read different data: {sums}")
        timings = harness.interleave(fns, rounds * 2, device, warmup=1, log=log)
    summary = harness.summary(timings, size / 2**20, device, unit="MiB")
    ratio = harness.speed_ratio(timings, "safetensors_load_file", "from_pretrained", device)  # time ratio
    log(f"load {size / 2**20:.0f} MiB: from_pretrained takes x{ratio:.3f} the time of a bare load_file")
    rows.append(
        harness.row(
            env,
            f"checkpoint load ({size / 2**20:.0f} MiB to {dev}; {summary['from_pretrained']['clock']} clock)",
            "from_pretrained time / safetensors load_file time",
            ratio,
            1.2,
            higher_is_better=False,
        )
    )
    result = {
        "env": env,
        "builds": builds,
        "load": {"bytes": size, "timings": summary, "time_ratio": ratio},
        "rows": rows,
    }
    return harness.finish("build", result, rows, args)


if __name__ == "__main__":
    run()
