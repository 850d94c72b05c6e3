"""composer-plan: parameters, FLOPs, KV cache and training memory of a model, without allocating it.

composer-plan model=llama3_8b batch_size=8 seq_len=2048 precision=bf16-mixed checkpointing=every_layer
composer-plan model=tiny batch_size=32 precision=32-true device=cpu fused_attention=false   # a CPU step
composer-plan model=gpt2 model.num_layers=6 --config-dir my_configs
"""

from __future__ import annotations

import sys

from ..config import load_config, split_overrides, with_model_problems
from ..errors import ConfigError
from ..plan import plan
from ..plan_render import render
from ..schema import resolve_model_config
from . import drop_leftovers, parse_value, run, take_config_dirs

OPTIONS = ("batch_size", "seq_len", "precision", "checkpointing", "fused_attention", "device")
USAGE = __doc__


def main_(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    dirs, argv = take_config_dirs(argv)
    opts, overrides = split_overrides(argv, OPTIONS)
    try:
        cfg = drop_leftovers(load_config(overrides, config_dirs=dirs), overrides)
    except ConfigError as exc:
        raise with_model_problems(exc, lambda c: resolve_model_config(c.model), config_dirs=dirs) from None
    report = plan(
        cfg.model,
        batch_size=parse_value("batch_size", opts.get("batch_size", "1"), int, "an integer"),
        seq_len=parse_value("seq_len", opts["seq_len"], int, "an integer") if "seq_len" in opts else None,
        precision=opts.get("precision", "bf16-mixed"),
        checkpointing=opts.get("checkpointing"),
        fused_attention=opts.get("fused_attention", "true").lower() in ("1", "true", "yes"),
        device=opts.get("device", "cuda"),
    )
    render(report)
    return 0


def main() -> None:
    sys.exit(run(main_))


if __name__ == "__main__":
    main()
