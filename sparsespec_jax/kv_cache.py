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
import numpy as np

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
    """Host-side free list of KV pages, as a numpy stack so a step's pages are handed out in one slice."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"kv cache needs at least 2 pages (1 reserved), got {num_pages}")
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = np.arange(num_pages - 1, PADDING_PAGE, -1, dtype=np.int32)   # the top holds low ids
        self._num_free = num_pages - 1

    @property
    def num_free(self) -> int:
        return self._num_free

    def pages_needed(self, num_tokens: int, pages_held: int) -> int:
        return max(0, math.ceil(num_tokens / self.page_size) - pages_held)

    def take(self, count: int) -> np.ndarray:
        """`count` free pages (int32), lowest ids first."""
        if count > self._num_free:
            raise OutOfPagesError(f"need {count} pages, {self._num_free} free")
        self._num_free -= count
        return self._free[self._num_free:self._num_free + count][::-1].copy()

    def release(self, pages: np.ndarray) -> None:
        count = len(pages)
        self._free[self._num_free:self._num_free + count] = np.asarray(pages)[::-1]
        self._num_free += count
