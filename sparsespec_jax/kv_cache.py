"""Paged KV cache: a static-shape device pytree plus the host-side page allocator.

The pool of every layer holds `num_pages * page_size` token slots per KV head ([L, Hkv, slots, D]); a token's
slot is `page * page_size + offset`. Page 0 is reserved as the sink for padding tokens, so a padded step can
write without a branch. The cache is donated into the jitted step, so updates happen in place.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sparsespec_jax.config import ModelConfig

PADDING_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array          # [L, Hkv, num_pages * page_size, D]
    v: jax.Array
    page_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_pages(self) -> int:
        return self.k.shape[2] // self.page_size

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> "KVCache":
        shape = (cfg.num_layers, cfg.num_kv_heads, num_pages * page_size, cfg.head_dim)
        # Zeros, not uninitialised memory: masked garbage could otherwise turn into NaN through 0 * inf.
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), page_size=page_size)

    def write(self, layer, slots: jax.Array, k_new: jax.Array, v_new: jax.Array) -> "KVCache":
        """Store this step's keys/values [N, Hkv, D] at flat slots [N] of one layer."""
        k = self.k.at[layer, :, slots].set(k_new.astype(self.k.dtype))
        v = self.v.at[layer, :, slots].set(v_new.astype(self.v.dtype))
        return KVCache(k=k, v=v, page_size=self.page_size)


class OutOfPagesError(RuntimeError):
    """The device pool has no free page left for the requested tokens."""


class PageAllocator:
    """Host-side free list of KV pages; each request owns a list of pages (its page table)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"kv cache needs at least 2 pages (1 reserved), got {num_pages}")
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, PADDING_PAGE, -1))   # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_needed(self, num_tokens: int, pages_held: int) -> int:
        return max(0, math.ceil(num_tokens / self.page_size) - pages_held)

    def grow(self, pages: list[int], num_tokens: int) -> None:
        """Extend `pages` in place so it covers `num_tokens` tokens."""
        needed = self.pages_needed(num_tokens, len(pages))
        if needed > len(self._free):
            raise OutOfPagesError(f"need {needed} pages, {len(self._free)} free")
        for _ in range(needed):
            pages.append(self._free.pop())

    def shrink(self, pages: list[int], num_tokens: int) -> None:
        """Return pages beyond what `num_tokens` tokens need (after a rollback)."""
        keep = math.ceil(num_tokens / self.page_size)
        while len(pages) > keep:
            self._free.append(pages.pop())

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        pages.clear()
