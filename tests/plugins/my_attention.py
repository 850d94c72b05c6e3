"""A third-party attention for the registry tests, loaded by dotted path from YAML:

    attention: {type: tests.plugins.my_attention.MyAttention, temperature: 2.0}

Causal multi-head attention whose scores are multiplied by a learned per-head temperature.
It follows components/protocols.py (built as ``MyAttention(cfg, ctx)``) and imports nothing
from composer beyond the component interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.kv_cache import KVCache
from components.protocols import AttentionInputs, BuildContext, ComponentConfig


@dataclass
class MyAttentionConfig(ComponentConfig):
    """Causal attention with a learned per-head temperature."""

    temperature: float = 1.0


class MyAttention(nn.Module):
    Config = MyAttentionConfig

    def __init__(self, cfg: MyAttentionConfig, ctx: BuildContext):
        super().__init__()
        self.num_heads = self.num_kv_heads = ctx.num_heads
        self.head_dim = ctx.head_dim
        self.temperature = cfg.temperature
        c = ctx.hidden_size
        self.qkv = nn.Linear(c, 3 * self.num_heads * self.head_dim, bias=False)  # C -> 3 H D
        self.out = nn.Linear(self.num_heads * self.head_dim, c, bias=False)  # H D -> C
        self.log_temperature = nn.Parameter(torch.empty(self.num_heads))  # [H]

    def reset_parameters(self) -> None:
        nn.init.constant_(self.log_temperature, math.log(self.temperature))

    def make_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device) -> KVCache:
        return KVCache(batch_size, self.num_kv_heads, self.head_dim, capacity, dtype=dtype, device=device)

    def forward(
        self, hidden: Tensor, inputs: AttentionInputs, past_key_value: KVCache | None = None, use_cache: bool = False
    ) -> tuple[Tensor, KVCache | None]:
        b, t, _ = hidden.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(hidden).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, D]
        q = q * self.log_temperature.exp()[:, None, None]
        if past_key_value is not None:
            k, v, _, _ = past_key_value.update(k, v, None)  # [B, H, S, D]
        s = k.shape[2]
        mask = torch.arange(s, device=hidden.device)[None, :] <= torch.arange(s - t, s, device=hidden.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, D]
        return self.out(y.transpose(1, 2).reshape(b, t, h * d)), past_key_value if use_cache else None
