"""Benchmark 3: gradient checkpointing modes x precisions: peak memory and tokens/s next to ``plan``'s estimate.

    python -m benchmarks.bench_checkpointing [--device cuda] [--quick]
    python -m benchmarks.bench_checkpointing --shape gpt2_124m --batch-size 8 --modes none,every_layer --no-unfused

Settings: composed gpt2-shaped model with checkpointing none / every_layer / every_2 / attention / ffn (with
the default fused loss; and none / every_layer with ``head.fused_loss=false``: logits, then cross-entropy, as
the hand-written model and transformers do), plus the hand-written model without and with
per-block checkpointing (the reference cost), each in 32-true and bf16-mixed. Within a precision the
settings' training steps are interleaved (tokens/s). Peak memory of a step = the model's own resident bytes
(weights + AdamW state) + the peak allocated during the step above what was allocated before it (gradients,
activations, transients): CUDA from the caching allocator, CPU from live tensor storages (eager).
``composer.plan.plan(...)`` estimates the same total for the same setting; the ratio estimate / measured is
reported (goal: within 15%).
"""

from __future__ import annotations

import argparse
import gc
from typing import Any, Optional

import torch

from benchmarks import harness
from benchmarks.bench_train_step import make_step
from benchmarks.models import Shape, build_composed, build_handwritten, random_batch
from composer.plan import plan

MODES = ("none", "every_layer", "every_2", "attention", "ffn")


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Weights + optimizer state (tied weights once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    state = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    return sum(seen.values()) + state


def settings(modes: tuple[str, ...] = MODES, unfused: bool = True) -> list[tuple[str, str, dict]]:
    """(name, checkpointing mode, extra model options) of the composed contenders: each of ``modes`` with
    the fused loss, and (``unfused``) none and every_layer with ``head.fused_loss=false``."""
    plain = {"head.fused_loss": False}
    return [(f"composed/{m}", m, {}) for m in modes] + [
        (f"composed/{m}+unfused_loss", m, plain) for m in ("none", "every_layer") if unfused
    ]


def run_precision(
    shape: Shape,
    device: torch.device,
    precision: str,
    rounds: int,
    log: Any,
    modes: tuple[str, ...] = MODES,
    unfused: bool = True,
) -> dict[str, Any]:
    ids = random_batch(shape, device)
    models: dict[str, torch.nn.Module] = {}
    plans: dict[str, Any] = {}
    for name, mode, extra in settings(modes, unfused):
        model = build_composed(shape, device, **extra)
        model.set_gradient_checkpointing(mode)
        models[name] = model
        plans[name] = plan(
            model.config, batch_size=shape.batch_size, seq_len=shape.context, precision=precision, device=device.type
        )
    for flag in (False, True):
        hand = build_handwritten(models["composed/none"])
        hand.checkpointing = flag
        models["handwritten/" + ("every_layer" if flag else "none")] = hand
    steps, opts = {}, {}
    for name, model in models.items():
        steps[name], opts[name] = make_step_with_opt(name, model, ids, device, precision)
    for step in steps.values():  # creates the optimizer state (part of the resident bytes)
        step()
    out: dict[str, Any] = {}
    for name, step in steps.items():
        peak = harness.peak_bytes(step, device)
        own = resident_bytes(models[name], opts[name])
        out[name] = {"measured_bytes": own + peak, "resident_bytes": own, "step_peak_bytes": peak}
        if name in plans:
            est = plans[name].memory.total
            out[name].update(plan_bytes=est, plan_over_measured=est / (own + peak))
        log(
            f"{precision} {name}: {(own + peak) / 2**20:,.0f} MiB measured"
            + (
                f", plan {out[name]['plan_bytes'] / 2**20:,.0f} MiB (x{out[name]['plan_over_measured']:.3f})"
                if name in plans
                else ""
            )
        )
    timings = harness.interleave(steps, rounds, device, warmup=0, log=log)
    summary = harness.summary(timings, shape.tokens, device)
    for name in steps:
        out[name]["tokens_per_s"] = summary[name]["tokens_per_s"]
        out[name]["clock"] = summary[name]["clock"]
    del models, steps, opts
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def make_step_with_opt(
    name: str, model: torch.nn.Module, ids: torch.Tensor, device: torch.device, precision: str
) -> tuple[Any, torch.optim.Optimizer]:
    step = make_step(name, model, ids, device, bf16=precision == "bf16-mixed")
    return step, step.optimizer


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    def modes(text: str) -> tuple[str, ...]:
        chosen = tuple(m for m in text.split(",") if m)
        wrong = sorted(set(chosen) - set(MODES))
        if wrong or not {"none", "every_layer"} <= set(chosen):
            raise argparse.ArgumentTypeError(
                f"{text!r}: a comma-separated subset of {','.join(MODES)} that includes none and every_layer"
            )
        return chosen

    args = harness.cli_args(
        __doc__.splitlines()[0],
        argv,
        extra=[
            (
                "--precisions",
                {
                    "default": None,
                    "help": "comma-separated (default: 32-true,bf16-mixed on CUDA; 32-true on "
                    "CPUs, where bf16 matmuls without native support take minutes per step)",
                },
            ),
            (
                "--modes",
                {
                    "type": modes,
                    "default": MODES,
                    "help": "checkpointing modes of the composed model, "
                    f"comma-separated (default: {','.join(MODES)}; none and every_layer are always needed)",
                },
            ),
            (
                "--no-unfused",
                {
                    "action": "store_true",
                    "help": "skip the head.fused_loss=false settings (each model "
                    "of a setting stays resident: at GPT-2 124M on a CPU memory runs out before time)",
                },
            ),
        ],
    )
    log, device, env = harness.start("checkpointing", args)
    shape = Shape.from_args(args, device)
    rounds = args.rounds or (1 if args.quick else 3)
    log(f"{shape.describe()} on {env['device']}, {rounds} rounds")
    rows: list[dict[str, str]] = []
    result: dict[str, Any] = {"env": env, "shape": shape.__dict__, "precisions": {}, "rows": rows}
    default = "32-true,bf16-mixed" if device.type == "cuda" or args.quick else "32-true"
    for precision in (args.precisions or default).split(","):
        res = run_precision(shape, device, precision, rounds, log, args.modes, not args.no_unfused)
        result["precisions"][precision] = res
        detail = f"({shape.describe()}; {res['composed/none']['clock']} clock)"
        what = f"checkpointing {precision} {detail}"
        for name, r in res.items():
            if "plan_over_measured" in r:
                rows.append(
                    harness.row(
                        env,
                        f"checkpointing {precision} {name} {detail}",
                        "plan estimate / measured peak memory",
                        r["plan_over_measured"],
                        None,
                    )
                )
                rows[-1]["goal"], rows[-1]["met"] = (
                    "0.85 - 1.15",
                    "yes" if abs(r["plan_over_measured"] - 1) <= 0.15 else "**no**",
                )
        none, every = res["composed/none"], res["composed/every_layer"]
        rows.append(
            harness.row(
                env,
                what,
                "peak memory every_layer / none",
                every["measured_bytes"] / none["measured_bytes"],
                2 / 3,
                higher_is_better=False,
            )
        )
        if not args.no_unfused:
            plain, plain_every = res["composed/none+unfused_loss"], res["composed/every_layer+unfused_loss"]
            rows.append(
                harness.row(
                    env,
                    what,
                    "peak memory every_layer / none, both with the unfused loss",
                    plain_every["measured_bytes"] / plain["measured_bytes"],
                )
            )
            rows.append(
                harness.row(
                    env,
                    what,
                    "peak memory none: fused / unfused loss",
                    none["measured_bytes"] / plain["measured_bytes"],
                )
            )
        cost = every["tokens_per_s"] / none["tokens_per_s"]
        hand = res["handwritten/every_layer"]["tokens_per_s"] / res["handwritten/none"]["tokens_per_s"]
        rows.append(
            harness.row(env, what, "every_layer speed cost: composed (tok/s ratio) / hand-written's", cost / hand, 0.98)
        )
        log(
            f"{precision}: every_layer memory x{every['measured_bytes'] / none['measured_bytes']:.3f}, speed "
            f"x{cost:.3f} (hand-written x{hand:.3f})"
        )
        harness.save_partial("checkpointing", result, args)  # after each precision
    return harness.finish("checkpointing", result, rows, args)


if __name__ == "__main__":
    run()
