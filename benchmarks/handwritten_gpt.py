"""A single-file GPT-2 (nanoGPT style): the hand-written baseline the composed model is measured against.

The math is that of composer's ``gpt2`` preset: learned positions, pre-norm LayerNorm blocks, one fused
q|k|v projection with bias, causal SDPA, a gelu(tanh) MLP with biases, a final LayerNorm and an LM head tied
to the token embedding; GPT-2 initialisation (normal(0, 0.02), residual projections / sqrt(2 * layers)).
``load_composed`` copies a composed model's weights in, so both give the same logits and loss.

Shapes: B batch, T tokens, C hidden, H heads, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # C -> q | k | v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C]
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # [V, C]
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # [P, C]
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.checkpointing = False  # recompute every block in the backward pass
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """idx [B, T]; targets [B, T] are the NEXT tokens (-100: ignored). Returns logits [B, T, V], loss."""
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # [B, T, C]
        for block in self.h:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))  # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-100)
        return logits, loss


_NAMES = {
    "wte.weight": "embed.weight",
    "wpe.weight": "position.weight",
    "ln_f.weight": "final_norm.weight",
    "ln_f.bias": "final_norm.bias",
}
_BLOCK = {
    "ln_1": "attn_norm",
    "ln_2": "ffn_norm",
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.out",
    "mlp.c_fc": "ffn.up",
    "mlp.c_proj": "ffn.down",
}


@torch.no_grad()
def load_composed(gpt: GPT, composed: nn.Module) -> GPT:
    """Copy the weights of a composed gpt2-shaped model (same sizes) into ``gpt``."""
    src = composed.state_dict()
    for name, p in gpt.named_parameters():
        if name in _NAMES:
            key = _NAMES[name]
        else:
            _, i, rest = name.split(".", 2)  # h.{i}.<module>.<weight|bias>
            module, kind = rest.rsplit(".", 1)
            key = f"layers.{i}.{_BLOCK[module]}.{kind}"
        p.copy_(src[key])
    return gpt


def config_like(composed_config) -> GPTConfig:
    """The GPTConfig of a composed model's (resolved) ModelConfig."""
    c = composed_config
    return GPTConfig(
        vocab_size=c.padded_vocab_size,
        block_size=c.max_position_embeddings,
        n_layer=c.num_layers,
        n_head=c.num_heads,
        n_embd=c.hidden_size,
        dropout=c.dropout,
    )
