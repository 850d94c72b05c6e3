"""Pre-allocated key/value caches for incremental decoding.

One :class:`KVCache` per attention layer holds keys and values [B, Hkv, S, D] in buffers
allocated once; new tokens are written in place. A sliding-window layer gets a rolling
buffer of W slots (token t lives in slot t % W), so its memory stays O(W) however long the
generation. ``slot_pos`` records which absolute token each slot holds (-1: empty) and
``valid`` whether it was a real token or padding; attention masks come from those two.

A STATIC cache (``make_static()``; ``model.allocate_cache(..., static=True)``) is written the same
way but at slots given as a tensor (``cache_position`` [T]) with ``index_copy_``, never grows, and
always returns its whole buffer (masked by ``slot_pos``): no Python number changes from one decode
step to the next, so a compiled decode step (torch.compile, CUDA graphs) is traced once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        window: Optional[int] = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        self.window = window
        self.rolling = window is not None and window < capacity
        size = window if self.rolling else capacity
        shape = (batch_size, num_kv_heads, size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [B, Hkv, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((size,), -1, dtype=torch.long, device=device)  # [S]
        self.valid = torch.ones(batch_size, size, dtype=torch.bool, device=device)  # [B, S]
        self.length = 0  # tokens written so far (dynamic caches; a static cache's count is Cache.position)
        self.static = False

    def make_static(self) -> None:
        """Fixed buffers written at tensor positions (see the module docstring); marked as static
        addresses so CUDA graphs may update them in place."""
        self.static = True
        for t in (self.k, self.v, self.slot_pos, self.valid):
            _mark_static(t)

    def reset(self) -> None:
        """Forget every token (static caches are reused between generate calls)."""
        self.slot_pos.fill_(-1)
        self.valid.fill_(True)
        self.length = 0

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

    def update(
        self, k: Tensor, v: Tensor, valid: Optional[Tensor], cache_position: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Append k, v [B, Hkv, T, D] (``valid`` [B, T] or None) and return what to attend over:
        keys, values [B, Hkv, S', D], their absolute positions [S'] and validity [B, S'].
        A static cache writes at ``cache_position`` [T] (absolute positions, a tensor)."""
        if self.static:
            return self._write_static(k, v, valid, cache_position)
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

    def _write_static(
        self, k: Tensor, v: Tensor, valid: Optional[Tensor], cache_position: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        t = k.shape[2]
        if valid is None:
            valid = torch.ones(k.shape[0], t, dtype=torch.bool, device=k.device)
        if self.rolling and t > 1:  # a chunk: attend over the old window plus the chunk, keep the last W
            keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            positions = torch.cat([self.slot_pos, cache_position])
            validity = torch.cat([self.valid, valid], dim=1)
            keep = min(t, self.size)
            self._put(
                cache_position[-keep:] % self.size,
                k[:, :, -keep:],
                v[:, :, -keep:],
                cache_position[-keep:],
                valid[:, -keep:],
            )
            return keys, values, positions, validity
        slots = cache_position % self.size if self.rolling else cache_position  # [T]
        self._put(slots, k, v, cache_position, valid)
        return self.k, self.v, self.slot_pos, self.valid

    def _put(self, slots: Tensor, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor) -> None:
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.slot_pos.index_copy_(0, slots, positions)
        self.valid.index_copy_(1, slots, valid)

    def select(self, index: Tensor) -> None:
        """Keep only the batch rows ``index`` (beam pruning, dropping finished prompts)."""
        self.k, self.v, self.valid = self.k[index], self.v[index], self.valid[index]


class Cache(list):
    """The caches of every layer (``past_key_values``), in layer order.

    A static cache (``static=True``) also counts the tokens written in ``position``, a 0-d long
    tensor on the caches' device that the model advances after each forward pass."""

    def __init__(self, layers=(), static: bool = False):
        super().__init__(layers)
        self.static = static
        self.position: Optional[Tensor] = None
        if static:
            device = self[0].k.device if self else None
            self.position = torch.zeros((), dtype=torch.long, device=device)
            _mark_static(self.position)

    @property
    def length(self) -> int:
        if self.static:
            return int(self.position)  # a host read: not for compiled code
        return self[0].length if self else 0

    def advance(self, tokens: int) -> None:
        """Static caches: ``tokens`` more were written (in place, so compiled code may call it)."""
        self.position.add_(tokens)

    def reset(self) -> None:
        for layer in self:
            layer.reset()
        if self.position is not None:
            self.position.zero_()

    def select(self, index: Tensor) -> None:
        for layer in self:
            layer.select(index)


def _mark_static(t: Tensor) -> None:
    """Tell torch.compile this buffer keeps its address (CUDA graphs then update it in place); no
    guard on its identity, so a new cache of the same shape reuses the compiled code."""
    import torch._dynamo

    try:
        torch._dynamo.mark_static_address(t, guard=False)
    except TypeError:  # torch < 2.5: no guard option
        torch._dynamo.mark_static_address(t)
