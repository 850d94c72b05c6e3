"""The three GPT-2 contenders with the same weights: composed (YAML preset), hand-written, transformers.

    shape = Shape.for_device(device, quick)
    composed, handwritten, hf = contenders(shape, device)

The composed model is built from the ``gpt2`` preset with the shape's sizes; the hand-written model and
transformers' GPT2LMHeadModel (SDPA attention) receive copies of its weights (the latter through
``composer.hf.export_hf``), so all three compute the same logits. Dropout is 0 in every benchmark (the
contenders draw their dropout masks from different random streams).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from benchmarks.handwritten_gpt import GPT, config_like, load_composed


@dataclass
class Shape:
    """A gpt2-shaped model and the batch it trains on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    context: int
    vocab_size: int
    batch_size: int

    @property
    def tokens(self) -> int:
        return self.batch_size * self.context

    @classmethod
    def for_device(
        cls, device: torch.device, quick: bool = False, name: Optional[str] = None, batch_size: Optional[int] = None
    ) -> Shape:
        """The benchmark shape: ``name`` one of SHAPES (default: gpt2_124m on CUDA, cpu elsewhere; quick: a
        smoke-test size), with ``batch_size`` rows if given."""
        name = "quick" if quick else name or ("gpt2_124m" if device.type == "cuda" else "cpu")
        shape = cls(*SHAPES[name])
        return replace(shape, batch_size=batch_size) if batch_size else shape

    @classmethod
    def from_args(cls, args: Any, device: torch.device) -> Shape:
        """The shape the harness's ``--shape`` / ``--batch-size`` / ``--quick`` options ask for."""
        return cls.for_device(device, args.quick, args.shape, args.batch_size)

    def overrides(self) -> list[str]:
        return [
            "model=gpt2",
            f"model.num_layers={self.num_layers}",
            f"model.hidden_size={self.hidden_size}",
            f"model.num_heads={self.num_heads}",
            f"model.max_position_embeddings={self.context}",
            f"model.vocab_size={self.vocab_size}",
            "model.dropout=0.0",
        ]

    def describe(self) -> str:
        return (
            f"gpt2-shaped {self.num_layers} layers x {self.hidden_size} wide, {self.num_heads} heads, "
            f"vocab {self.vocab_size}, batch {self.batch_size} x {self.context}"
        )


# name -> (layers, width, heads, context, vocabulary, batch)
SHAPES = {
    "gpt2_124m": (12, 768, 12, 1024, 50257, 16),  # GPT-2 124M, batch 16 x 1024 (the CUDA shape)
    "cpu": (4, 384, 6, 256, 50257, 4),  # GPT-2's wiring and vocabulary, small enough for one core
    "quick": (2, 128, 4, 64, 1024, 2),  # a smoke test
}


def composed_config(shape: Shape, **model: Any) -> Any:
    """The resolved model config of the shape (``model`` adds ``model.<key>=<value>`` overrides)."""
    from composer.config import load_config
    from composer.schema import resolve_model_config

    extra = [f"model.{k}={v}" for k, v in model.items()]
    return resolve_model_config(load_config(shape.overrides() + extra).model)


def build_composed(shape: Shape, device: torch.device, seed: int = 0, **model: Any) -> nn.Module:
    from composer.model import compose

    return compose(composed_config(shape, **model), device=device, seed=seed)


def build_handwritten(composed: nn.Module) -> GPT:
    ref = composed.embed.weight
    return load_composed(GPT(config_like(composed.config)).to(ref.device), composed)


def build_hf(composed: nn.Module) -> nn.Module:
    """transformers' GPT2LMHeadModel with SDPA attention and the composed model's weights."""
    import transformers

    from composer.hf import export_hf

    device = composed.embed.weight.device
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(composed.to("cpu"), tmp)
        composed.to(device)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa", dtype=torch.float32)
    hf.loss_type = "ForCausalLM"
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        assert getattr(hf.config, key) == 0.0, key
    return hf.to(device).train()


def build_padded(composed: nn.Module, multiple: int = 64) -> nn.Module:
    """The composed model with its vocabulary padded to ``multiple`` rows (masked logits), same weights."""
    from composer.model import compose

    padded = compose(composed.config.replace(pad_vocab_to_multiple_of=multiple), device=composed.embed.weight.device)
    with torch.no_grad():
        for p, q in zip(padded.state_dict().values(), composed.state_dict().values(), strict=True):
            p.zero_()
            p[tuple(slice(0, n) for n in q.shape)] = q  # padding rows stay zero
    return padded


def build_unfused(composed: nn.Module) -> nn.Module:
    """The composed model with ``head.fused_loss=false`` (logits, then cross-entropy), same weights."""
    from composer.model import compose

    head = {**composed.config.to_dict()["head"], "fused_loss": False}
    unfused = compose(composed.config.replace(head=head), device=composed.embed.weight.device)
    unfused.load_state_dict(composed.state_dict())
    return unfused


BUILDERS = {
    "handwritten": build_handwritten,
    "transformers": build_hf,
    "composed_pad64": build_padded,
    "composed_unfused": build_unfused,
}


def contenders(
    shape: Shape,
    device: torch.device,
    names: tuple[str, ...] = ("composed", "handwritten", "transformers"),
    seed: int = 0,
) -> dict[str, nn.Module]:
    """The named contenders with the composed model's weights (``composed`` is always built first)."""
    composed = build_composed(shape, device, seed)
    return {name: composed if name == "composed" else BUILDERS[name](composed) for name in names}


def random_batch(shape: Shape, device: torch.device, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab_size, (shape.batch_size, shape.context), generator=gen).to(device)


def next_tokens(ids: Tensor) -> Tensor:
    """nanoGPT's targets for ``ids``: the next token at each position, -100 at the last."""
    return torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)


def loss_fn(name: str, model: nn.Module, ids: Tensor) -> Tensor:
    """The language-modelling loss of contender ``name`` on ``ids`` (labels = the inputs, shifted inside)."""
    if name.startswith("handwritten"):
        return model(ids, next_tokens(ids))[1]
    if name.startswith("transformers"):
        return model(input_ids=ids, labels=ids).loss
    return model(ids, labels=ids, return_logits=False).loss  # as composer's training step calls it
