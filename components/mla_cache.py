"""The latent cache of multi-head latent attention (components/mla.py): per token, the normalised KV
latent (kv_lora_rank = L values) and the rotated rope key (qk_rope_head_dim = R values), not the
keys and values of every head.

    cache = LatentCache(batch, L, R, capacity)
    joint = cache.write_latent(latent_and_rope_key, plan)     # [B, 1, T, L + R] in, [B, 1, S, L + R] out

The two live side by side in ONE buffer, ``k`` [B, 1, S, L + R] (latent first): it is the single
key head of the absorbed form (and, its first L dims, the value), so a decode step attends over the
cache as it is, with no copy. There is no value buffer (``v`` is zero-width): values are the latent.

It is a :class:`components.kv_cache.KVCache` with that geometry, so everything else is KVCache's:
slot planning once per forward (``plan``), growth, ``reset``, ``select`` (beam pruning, finished rows)
and static caches (``make_static``, tensor slots, for a compiled decode step). MLA has no window, so
the cache never rolls.

Per token and layer it holds (L + R) x dtype bytes: DeepSeek-V3 (L 512, R 64) in bf16, 1,152 B,
against 128 heads x (192 + 128) x 2 = 81,920 B for the same attention's full K and V.
"""

from __future__ import annotations

import torch
from torch import Tensor

from components.kv_cache import KVCache, SlotWrite


class LatentCache(KVCache):
    def __init__(
        self,
        batch_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        # KVCache's bookkeeping (slot positions, validity, length) with zero-width buffers, then the
        # joint buffer: nothing of the per-head K/V geometry is allocated
        super().__init__(batch_size, 1, 0, capacity, None, dtype=dtype, device=device)
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.k = torch.zeros(batch_size, 1, self.size, kv_lora_rank + rope_dim, dtype=dtype, device=device)

    @property
    def latent(self) -> Tensor:
        """The normalised latents written so far, [B, 1, S, L] (a view)."""
        return self.k[..., : self.kv_lora_rank]

    @property
    def rope_key(self) -> Tensor:
        """The rotated rope keys, [B, 1, S, R] (a view)."""
        return self.k[..., self.kv_lora_rank :]

    def write_latent(self, joint: Tensor, plan: SlotWrite) -> Tensor:
        """Write ``joint`` [B, 1, T, L + R] (latent, rotated rope key) where ``plan`` says (KVCache.plan);
        returns what attention reads, [B, 1, S, L + R] (positions and validity: ``plan.k_pos`` /
        ``plan.k_valid``)."""
        keys, _ = self.write(joint, joint[..., :0], plan)
        return keys
