"""Output heads: language modelling (next-token logits) and sequence classification.

The head sees the final hidden states [B, T, C] (after the final norm) and the padding mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.linear_cross_entropy import auto_chunk_size, linear_cross_entropy
from composer.contract import (
    HEAD,
    IGNORE_INDEX,
    BuildContext,
    ComponentConfig,
    Cost,
    CostCall,
    HeadBase,
    inherit,
    linear_flops,
    option,
    param_count,
)


@dataclass
class LMHeadConfig(ComponentConfig):
    """Next-token logits; weight tied to the input embedding when model.tie_embeddings is true."""

    bias: bool = option(False, help="learn a per-token logit bias")
    logit_softcap: Optional[float] = option(
        None, help="cap logits with c*tanh(x/c) (Gemma 2: 30; at most 1e4)", max=1e4
    )
    fused_loss: bool = option(
        True,
        help="the training step's loss straight from the hidden states, chunk by chunk, without "
        "[tokens, vocab] logits; false: logits, then cross-entropy",
    )
    loss_chunk_size: Optional[int] = option(
        None,
        min=1,
        help="tokens per chunk of the fused loss (null: 128 MiB of float32 logits on a CPU, 1 GiB on a GPU)",
    )

    def resolve(self, model, check) -> None:
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            check.fail("logit_softcap", f"{self.logit_softcap} must be positive", "use null for no cap")
        if self.loss_chunk_size is not None and not self.fused_loss:
            check.fail(
                "loss_chunk_size",
                f"{self.loss_chunk_size} is set but fused_loss is false",
                "set fused_loss=true, or loss_chunk_size=null",
            )


@HEAD.register("lm", config=LMHeadConfig)
class LMHead(HeadBase):
    def __init__(self, cfg: LMHeadConfig, ctx: BuildContext):
        super().__init__()
        vocab = ctx.embedding_rows  # padded V
        self.proj = nn.Linear(ctx.hidden_size, vocab, bias=cfg.bias)  # C -> V
        self.softcap = cfg.logit_softcap
        self.vocab_size = ctx.vocab_size
        self.fused_loss = cfg.fused_loss
        self.loss_chunk_size = cfg.loss_chunk_size
        self.register_buffer("pad_mask", torch.zeros(vocab, dtype=torch.bool), persistent=False)  # [V]
        self._weight_t: Optional[Tensor] = None  # [C, V] while decoding on a CPU (decode_layout)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.pad_mask.device.type != "meta":  # filled when the model is materialised
            self.pad_mask.fill_(False)
            self.pad_mask[self.vocab_size :] = True

    def label_space(self) -> tuple[bool, int]:
        return True, self.vocab_size

    def tie(self, embedding: nn.Embedding) -> bool:
        if self.proj.weight.shape != embedding.weight.shape:
            return False
        self.proj.weight = embedding.weight
        return True

    def tied_to(self, embedding: nn.Embedding) -> bool:
        return self.proj.weight is embedding.weight

    def cost(self, call: CostCall) -> Cost:
        """The head's matmul; what the loss keeps: with the fused loss only the head's input, and one
        chunk of logits at a time (transient); without it the float32 log-softmax, and the gradients of
        the log-softmax and of the logits at the start of the backward pass."""
        c, v, a = self.proj.in_features, self.proj.out_features, call.activation_bytes
        tokens = call.tokens
        if self.fused_loss:
            chunk = min(self.loss_chunk_size or auto_chunk_size(tokens, v, call.device), tokens)
            copy = 0 if a == 4 else 4  # the float32 copy of 16-bit logits
            # one chunk's logits (and their float32 copy), rewritten in place into log-softmax and gradient;
            # the head's gradients, made in the forward pass
            transient = chunk * v * (a + copy) + (v + tokens) * c * 4
            notes = (f"fused loss: logits of {chunk} tokens at a time (head.fused_loss, head.loss_chunk_size)",)
            return Cost(param_count(self), linear_flops(self), a * c, transient=transient, notes=notes)
        return Cost(param_count(self), linear_flops(self), a * c + 4 * v, transient=8 * v * tokens)

    @contextmanager
    def decode_layout(self) -> Iterator[None]:
        """While decoding without gradients on a CPU: logits from a [C, V] contiguous copy of the weight.
        A few rows against a [V, C] weight is a matrix-vector product that CPU BLAS runs about twice as
        fast in this layout (it streams the weight row by row); the copy lives only inside the block."""
        if self.proj.weight.device.type != "cpu":
            yield
            return
        self._weight_t = self.proj.weight.detach().t().contiguous()  # [C, V]
        try:
            yield
        finally:
            self._weight_t = None

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:  # -> [B, T, V]
        weight_t = self._weight_t
        if weight_t is not None and not torch.is_grad_enabled():
            logits = hidden @ weight_t  # [B, T, C] @ [C, V]
            if self.proj.bias is not None:
                logits = logits + self.proj.bias
        else:
            logits = self.proj(hidden)
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if self.pad_mask.shape[0] > self.vocab_size:  # padded vocabulary: padding ids never win
            logits = logits.masked_fill(self.pad_mask, float("-inf"))
        return logits

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Next-token cross-entropy: position t predicts labels[t + 1]; IGNORE_INDEX is skipped.

        The labels are shifted (not the logits, whose copy would cost B T V floats): the last
        position gets IGNORE_INDEX and the loss reads the logits [B T, V] as they are."""
        targets = next_token_targets(labels)  # [B, T]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )

    def fused(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """The same loss as ``loss(self(hidden), labels)`` from the final hidden states [B, T, C],
        ``loss_chunk_size`` tokens at a time (components.linear_cross_entropy): at most one chunk of
        logits [chunk, V] is alive, nothing is recomputed, and the gradients are made in this pass."""
        targets = next_token_targets(labels).reshape(-1)  # [B T]
        flat = hidden.reshape(-1, hidden.shape[-1])  # [B T, C]
        return linear_cross_entropy(
            flat,
            self.proj.weight,
            self.proj.bias,
            targets,
            self.loss_chunk_size,
            softcap=self.softcap,
            vocab=self.vocab_size,
        )


def next_token_targets(labels: Tensor) -> Tensor:
    """[B, T] labels aligned with the inputs -> [B, T] targets: position t gets labels[t + 1], the
    last position IGNORE_INDEX."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


@dataclass(kw_only=True)
class ClassificationHeadConfig(ComponentConfig):
    """Sequence classification: pool the hidden states, then a linear layer to class logits."""

    num_classes: int = option(help="number of classes", min=2, bound="num_classes")
    pooling: str = option(
        "last", help="last | mean | first (token whose state is classified)", choices=("last", "mean", "first")
    )
    dropout: Optional[float] = option(None, help="dropout before the classifier (null: model.dropout)")

    def resolve(self, model, check) -> None:
        inherit(self, "dropout", model.dropout)


@HEAD.register("classification", config=ClassificationHeadConfig)
class ClassificationHead(HeadBase):
    def __init__(self, cfg: ClassificationHeadConfig, ctx: BuildContext):
        super().__init__()
        self.pooling = cfg.pooling
        self.dropout = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(ctx.hidden_size, cfg.num_classes)  # C -> K

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:  # -> [B, K]
        b, t, _ = hidden.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
        mask = attention_mask[:, -t:].bool()  # [B, T]
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            idx = torch.arange(t, device=hidden.device).expand(b, t)
            # last: the last real token; first: the first real token (works for either padding side)
            score = torch.where(mask, idx, -1) if self.pooling == "last" else torch.where(mask, -idx, -t)
            pick = score.argmax(dim=1)  # [B]
            pooled = hidden[torch.arange(b, device=hidden.device), pick]
        return self.proj(self.dropout(pooled))

    def label_space(self) -> tuple[bool, int]:
        return False, self.proj.out_features

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    def cost(self, call: CostCall) -> Cost:  # keeps the hidden states it pools
        return Cost(param_count(self), linear_flops(self), call.activation_bytes * self.proj.in_features)
