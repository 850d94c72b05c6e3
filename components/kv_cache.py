"""Pre-allocated key/value caches for incremental decoding.

One :class:`KVCache` per attention layer holds keys and values [B, Hkv, S, D] in buffers
allocated once; new tokens are written in place. A sliding-window layer gets a rolling
buffer of W slots (token t lives in slot t % W), so its memory stays O(W) however long the
generation. ``slot_pos`` records which absolute token each slot holds (-1: empty) and
``valid`` whether it was a real token or padding; attention masks come from those two.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class KVCache:
    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int,
                 window: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        self.window = window
        self.rolling = window is not None and window < capacity
        size = window if self.rolling else capacity
        shape = (batch_size, num_kv_heads, size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [B, Hkv, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((size,), -1, dtype=torch.long, device=device)  # [S]
        self.valid = torch.ones(batch_size, size, dtype=torch.bool, device=device)  # [B, S]
        self.length = 0  # tokens written so far

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def _grow(self, needed: int) -> None:
        """Full caches only: double the buffers when a caller writes past the capacity. A window's
        cache stops at W slots and rolls from then on (tokens 0..W-1 already sit in slot t % W)."""
        new = max(needed, 2 * self.size)
        if self.window is not None and new >= self.window:
            new, self.rolling = self.window, True
        pad = new - self.size
        self.k = torch.nn.functional.pad(self.k, (0, 0, 0, pad))
        self.v = torch.nn.functional.pad(self.v, (0, 0, 0, pad))
        self.slot_pos = torch.nn.functional.pad(self.slot_pos, (0, pad), value=-1)
        self.valid = torch.nn.functional.pad(self.valid, (0, pad), value=True)

    def update(self, k: Tensor, v: Tensor, valid: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Append k, v [B, Hkv, T, D] (``valid`` [B, T] or None) and return what to attend over:
        keys, values [B, Hkv, S', D], their absolute positions [S'] and validity [B, S']."""
        t, start = k.shape[2], self.length
        pos = torch.arange(start, start + t, device=k.device)  # [T]
        if valid is None:
            valid = torch.ones(k.shape[0], t, dtype=torch.bool, device=k.device)
        if not self.rolling and start + t > self.size:
            self._grow(start + t)
        if not self.rolling:
            end = start + t
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            self.slot_pos[start:end] = pos
            self.valid[:, start:end] = valid
            self.length = end
            return self.k[:, :, :end], self.v[:, :, :end], self.slot_pos[:end], self.valid[:, :end]
        w = self.size
        if t == 1:  # decode: the evicted token (t - W) is outside the window anyway
            slot = start % w
            self.k[:, :, slot : slot + 1] = k
            self.v[:, :, slot : slot + 1] = v
            self.slot_pos[slot] = start
            self.valid[:, slot] = valid[:, 0]
            self.length = start + 1
            return self.k, self.v, self.slot_pos, self.valid
        # a chunk: attend over the old window plus the chunk, then keep the last W tokens
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        positions = torch.cat([self.slot_pos, pos])
        validity = torch.cat([self.valid, valid], dim=1)
        keep = min(t, w)
        slots = pos[-keep:] % w
        self.k[:, :, slots] = k[:, :, -keep:]
        self.v[:, :, slots] = v[:, :, -keep:]
        self.slot_pos[slots] = pos[-keep:]
        self.valid[:, slots] = valid[:, -keep:]
        self.length = start + t
        return keys, values, positions, validity

    def select(self, index: Tensor) -> None:
        """Keep only the batch rows ``index`` (beam pruning, dropping finished prompts)."""
        self.k, self.v, self.valid = self.k[index], self.v[index], self.valid[index]


class Cache(list):
    """The caches of every layer (``past_key_values``), in layer order."""

    @property
    def length(self) -> int:
        return self[0].length if self else 0

    def select(self, index: Tensor) -> None:
        for layer in self:
            layer.select(index)
