"""Dense families against transformers: one training step of a Qwen3-shaped and a Gemma-2-shaped model.

    python -m benchmarks.bench_families [--device cuda] [--quick] [--no-compile] [--rounds N]

For each family a random model is built by transformers itself (``Qwen3ForCausalLM`` with SDPA attention,
``Gemma2ForCausalLM`` with eager attention, the only kind transformers runs Gemma 2 with), saved, and
imported with ``composer.hf.import_hf``, so the two contenders hold the same weights and see the same
batch; their first-step losses must agree. The step is forward + backward + AdamW, eager and under
``torch.compile``. CPU: 4 layers x 256 wide, 4 query heads
(2 key/value heads, head dim 64), context 256, vocabulary 8,192, batch 4, float32, one thread (ratios by
CPU time). Reported: composed / transformers tokens/s per row (goal >= 1.0).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import harness
from composer.hf import import_hf

NAME = "families"


def hf_configs(quick: bool) -> dict[str, Any]:
    import transformers as T  # late: transformers is the reference here (an optional extra)

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=64) if quick else {}
    common = dict(
        vocab_size=512 if quick else 8192,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64 if not quick else 16,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    common.update(size)
    return {
        "qwen3": T.Qwen3Config(**common),
        "gemma2": T.Gemma2Config(**common, sliding_window=128, query_pre_attn_scalar=64, attn_logit_softcapping=None),
    }


def build_pair(cfg: Any, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers' model, the composed import of it) with the same random weights."""
    import transformers as T  # late: transformers is the reference here (an optional extra)

    torch.manual_seed(0)
    theirs = T.AutoModelForCausalLM.from_config(cfg)
    theirs.save_pretrained(folder)
    return theirs, import_hf(folder)


def loss_of(kind: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if kind == "transformers":
        logits = model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return model(ids, labels=ids).loss


def make_step(kind: str, model: torch.nn.Module, ids: torch.Tensor) -> tuple[Callable[[], float], Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        loss = loss_of(kind, model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, opt


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = harness.cli_args(__doc__.splitlines()[0], argv)
    log, device, env = harness.start(NAME, args)
    rounds = args.rounds or (2 if args.quick else 5)
    batch = args.batch_size or (2 if args.quick else 4)
    result: dict[str, Any] = {"env": env, "families": {}}
    rows = []
    for family, cfg in hf_configs(args.quick).items():
        with tempfile.TemporaryDirectory() as tmp:
            theirs, ours = build_pair(cfg, Path(tmp))
        theirs, ours = theirs.to(device).train(), ours.to(device).train()
        ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_position_embeddings), device=device)
        with torch.no_grad():
            a, b = loss_of("transformers", theirs, ids).item(), loss_of("composed", ours, ids).item()
        assert abs(a - b) < 1e-3 * max(1.0, abs(a)), f"{family}: first losses differ ({a} vs {b})"
        modes = ["eager"] + ([] if args.no_compile else ["compiled"])
        fam = result["families"][family] = {"first_loss": a}
        for mode in modes:
            contenders = {}
            for kind, model in (("composed", ours), ("transformers", theirs)):
                m = torch.compile(model) if mode == "compiled" else model
                contenders[kind] = make_step(kind, m, ids)[0]
            log(f"{family} {mode}: timing {rounds} rounds")
            timings = harness.interleave(contenders, rounds, device, warmup=2 if mode == "compiled" else 1, log=log)
            ratio = harness.speed_ratio(timings, "composed", "transformers", device)
            fam[mode] = {"ratio": ratio, **harness.summary(timings, batch * cfg.max_position_embeddings, device)}
            log(f"{family} {mode}: composed / transformers = {ratio:.2f}")
            rows.append(
                harness.row(env, NAME, f"{family}-shaped train step, composed / transformers ({mode})", ratio, 1.0)
            )
        harness.save_partial(NAME, result, args)
    return harness.finish(NAME, result, rows, args)


if __name__ == "__main__":
    run()
