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

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SlotWrite:
    """One forward's write into a cache: ``kind`` append (a full cache: slots past the last) | ring
    (tokens at ``slots``) | chunk (a ring buffer taking a chunk: attention reads the old window plus
    the chunk, the last W tokens are kept). ``positions`` [T] are the new tokens' absolute positions,
    ``k_pos`` [S] / ``k_valid`` [B, S] the positions and validity of what attention reads after the
    write, ``new_valid`` [B, T] the new tokens' validity; ``size`` / ``rolling``: the buffer after it."""

    kind: str
    positions: Tensor
    k_pos: Tensor
    k_valid: Tensor
    new_valid: Tensor
    slots: Optional[Tensor] = None
    size: int = 0
    rolling: bool = False
    static: bool = False


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

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

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

    def _grown(self, needed: int) -> tuple[int, bool]:
        """(size, rolling) after a write that needs ``needed`` slots: a full cache doubles; a window's
        cache stops at W slots and rolls from then on (tokens 0..W-1 already sit in slot t % W)."""
        if self.rolling or needed <= self.size:
            return self.size, self.rolling
        new = max(needed, 2 * self.size)
        if self.window is not None and new >= self.window:
            return self.window, True
        return new, False

    def _resize(self, size: int, rolling: bool) -> None:
        pad = size - self.size
        self.rolling = rolling
        if pad > 0:
            self.k = F.pad(self.k, (0, 0, 0, pad))
            self.v = F.pad(self.v, (0, 0, 0, pad))
            self.slot_pos = F.pad(self.slot_pos, (0, pad), value=-1)
            self.valid = F.pad(self.valid, (0, pad), value=True)

    # ------------------------------------------------------------------ writing: plan once, write per layer
    def plan(self, t: int, key_valid: Optional[Tensor] = None, cache_position: Optional[Tensor] = None) -> SlotWrite:
        """Where a write of ``t`` new tokens goes and what attention then reads, without writing
        anything: the caches of every layer of one geometry are written in lockstep, so the model plans
        once per forward with one of them. ``key_valid``: [B, past + t] (static: [B, t]) or None;
        ``cache_position`` [t]: the slots of a static cache."""
        b, device = self.valid.shape[0], self.valid.device
        valid = key_valid[:, -t:] if key_valid is not None else torch.ones(b, t, dtype=torch.bool, device=device)
        if self.static:
            return self._plan_static(t, valid, cache_position)
        start = self.length
        pos = torch.arange(start, start + t, device=device)  # [T]
        size, rolling = self._grown(start + t)
        slot_pos, slot_valid = self.slot_pos, self.valid
        if size > self.size:  # the buffers grow first
            slot_pos = F.pad(slot_pos, (0, size - self.size), value=-1)
            slot_valid = F.pad(slot_valid, (0, size - self.size), value=True)
        if not rolling:
            k_pos, k_valid = torch.cat([slot_pos[:start], pos]), torch.cat([slot_valid[:, :start], valid], dim=1)
            return SlotWrite("append", pos, k_pos, k_valid, valid, size=size)
        if t == 1:  # decode: the evicted token (t - W) is outside the window anyway
            slots = pos % size
            return SlotWrite(
                "ring",
                pos,
                slot_pos.index_copy(0, slots, pos),
                slot_valid.index_copy(1, slots, valid),
                valid,
                slots=slots,
                size=size,
                rolling=True,
            )
        # a chunk: attend over the old window plus the chunk, then keep the last W tokens
        return SlotWrite(
            "chunk",
            pos,
            torch.cat([slot_pos, pos]),
            torch.cat([slot_valid, valid], dim=1),
            valid,
            slots=pos[-min(t, size) :] % size,
            size=size,
            rolling=True,
        )

    def _plan_static(self, t: int, valid: Tensor, cache_position: Tensor) -> SlotWrite:
        size = self.size
        if self.rolling and t > 1:  # a chunk: attend over the old window plus the chunk, keep the last W
            return SlotWrite(
                "chunk",
                cache_position,
                torch.cat([self.slot_pos, cache_position]),
                torch.cat([self.valid, valid], dim=1),
                valid,
                slots=cache_position[-min(t, size) :] % size,
                size=size,
                rolling=True,
                static=True,
            )
        slots = cache_position % size if self.rolling else cache_position  # [T]
        return SlotWrite(
            "ring",
            cache_position,
            self.slot_pos.index_copy(0, slots, cache_position),
            self.valid.index_copy(1, slots, valid),
            valid,
            slots=slots,
            size=size,
            rolling=self.rolling,
            static=True,
        )

    def write(self, k: Tensor, v: Tensor, plan: SlotWrite) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, D] where ``plan`` says; returns the keys and values to attend over,
        [B, Hkv, S, D] (their positions and validity are ``plan.k_pos`` and ``plan.k_valid``)."""
        t = k.shape[2]
        if plan.size != self.size or plan.rolling != self.rolling:
            self._resize(plan.size, plan.rolling)
        if plan.kind == "append":
            start, end = self.length, self.length + t
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            self.slot_pos[start:end] = plan.positions
            self.valid[:, start:end] = plan.new_valid
            self.length = end
            return self.k[:, :, :end], self.v[:, :, :end]
        if not plan.static:
            self.length += t
        if plan.kind == "ring":
            self._put(plan.slots, k, v, plan.positions, plan.new_valid)
            return self.k, self.v
        keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # a chunk
        keep = plan.slots.shape[0]
        self._put(plan.slots, k[:, :, -keep:], v[:, :, -keep:], plan.positions[-keep:], plan.new_valid[:, -keep:])
        return keys, values

    def update(
        self, k: Tensor, v: Tensor, valid: Optional[Tensor] = None, cache_position: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Plan and write in one call (for a component that keeps its own cache): append k, v
        [B, Hkv, T, D] (``valid`` [B, T] or None) and return what to attend over: keys, values
        [B, Hkv, S', D], their absolute positions [S'] and validity [B, S']."""
        plan = self.plan(k.shape[2], valid, cache_position)
        keys, values = self.write(k, v, plan)
        return keys, values, plan.k_pos, plan.k_valid

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

    def __init__(self, layers=(), static: bool = False, device=None):
        super().__init__(layers)
        self.static = static
        self.position: Optional[Tensor] = None
        if static:
            if device is None:  # the caches' device (the model passes it: a layer's cache may be no KVCache)
                device = self[0].k.device if self else None
            self.position = torch.zeros((), dtype=torch.long, device=device)
            _mark_static(self.position)

    @property
    def length(self) -> int:
        if self.static:
            return int(self.position)  # a host read: not for compiled code
        return next((layer.length for layer in self if layer is not None), 0)

    def advance(self, tokens: int) -> None:
        """Static caches: ``tokens`` more were written (in place, so compiled code may call it)."""
        self.position.add_(tokens)

    def reset(self) -> None:
        for layer in self:
            if layer is not None:
                layer.reset()
        if self.position is not None:
            self.position.zero_()

    def select(self, index: Tensor) -> None:
        for layer in self:
            if layer is not None:
                layer.select(index)


def _mark_static(t: Tensor) -> None:
    """Tell torch.compile this buffer keeps its address (CUDA graphs then update it in place); no
    guard on its identity, so a new cache of the same shape reuses the compiled code."""
    import torch._dynamo  # late: 2 s to import, only static caches need it

    try:
        torch._dynamo.mark_static_address(t, guard=False)
    except TypeError:  # torch < 2.5: no guard option
        torch._dynamo.mark_static_address(t)
