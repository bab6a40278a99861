"""Host-memory pool for evicted requests' KV: offload in fixed-size chunks, asynchronously, and restore.

Offloading gathers a request's pages chunk by chunk into fresh device arrays and starts their device-to-host
copies at once (copy_to_host_async); the pages are free for reuse immediately, since later steps are ordered
after the gather on device. Copies that have landed are turned into host arrays when polled, which drops the
device copies. Restoring writes the chunks into newly granted pages. Chunks have a fixed page count (the last
one padded with the reserved padding page), so the gather and scatter compile once.

The pool's capacity is counted in tokens (whole pages); a request is offloaded only if all of it fits, and
the pool's peak use is tracked so the configured bound can be checked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsespec_jax.kv_cache import PADDING_PAGE, KVCache


def _page_slots(page_ids, page_size: int):
    return (page_ids[:, None] * page_size + jnp.arange(page_size, dtype=page_ids.dtype)).reshape(-1)


@functools.partial(jax.jit, static_argnames=("page_size",))
def gather_pages(k_pool, v_pool, page_ids, page_size: int):
    """K and V of the listed pages: ([L, Hkv, pages * page_size, D], same)."""
    slots = _page_slots(page_ids, page_size)
    return k_pool[:, :, slots], v_pool[:, :, slots]


@functools.partial(jax.jit, donate_argnames=("kv",))
def scatter_pages(kv: KVCache, page_ids, k_chunk, v_chunk) -> KVCache:
    slots = _page_slots(page_ids, kv.page_size)
    return KVCache(k=kv.k.at[:, :, slots].set(k_chunk), v=kv.v.at[:, :, slots].set(v_chunk),
                   page_size=kv.page_size)


@dataclasses.dataclass(eq=False)
class OffloadedKV:
    """One request's KV in host memory (chunks still landing are device arrays with a copy in flight)."""

    chunks: list[tuple]      # (k, v) per chunk of pages
    num_pages: int
    sets: tuple | None       # (positions [L, Hkv, C], count) of the request's draft token set, logical positions


class HostKVPool:
    def __init__(self, capacity_tokens: int, page_size: int, chunk_tokens: int = 1024):
        if capacity_tokens < 0:
            raise ValueError(f"host_kv_tokens: must be >= 0, got {capacity_tokens}")
        self.capacity_pages = capacity_tokens // page_size
        self.page_size = page_size
        self.chunk_pages = max(1, chunk_tokens // page_size)
        self.used_pages = 0
        self.peak_pages = 0
        self._landing: list[OffloadedKV] = []

    @property
    def used_tokens(self) -> int:
        return self.used_pages * self.page_size

    @property
    def peak_tokens(self) -> int:
        return self.peak_pages * self.page_size

    def fits(self, num_pages: int) -> bool:
        return 0 < num_pages and self.used_pages + num_pages <= self.capacity_pages

    def _chunks_of(self, pages: list[int]):
        for begin in range(0, len(pages), self.chunk_pages):
            ids = pages[begin:begin + self.chunk_pages]
            yield np.asarray(ids + [PADDING_PAGE] * (self.chunk_pages - len(ids)), np.int32), len(ids)

    def offload(self, kv: KVCache, pages: list[int], sets: tuple | None) -> OffloadedKV:
        """Start copying `pages` (and the draft set) to host memory; the caller may reuse the pages at once."""
        chunks = []
        for ids, _ in self._chunks_of(pages):
            k_chunk, v_chunk = gather_pages(kv.k, kv.v, ids, self.page_size)
            k_chunk.copy_to_host_async()
            v_chunk.copy_to_host_async()
            chunks.append((k_chunk, v_chunk))
        if sets is not None:
            for array in sets:
                array.copy_to_host_async()
        record = OffloadedKV(chunks=chunks, num_pages=len(pages), sets=sets)
        self.used_pages += len(pages)
        self.peak_pages = max(self.peak_pages, self.used_pages)
        self._landing.append(record)
        return record

    def poll(self) -> None:
        """Move landed copies into host arrays, releasing their device buffers."""
        still = []
        for record in self._landing:
            arrays = [a for chunk in record.chunks for a in chunk] + list(record.sets or ())
            if all(not isinstance(a, jax.Array) or a.is_ready() for a in arrays):
                self._to_host(record)
            else:
                still.append(record)
        self._landing = still

    @staticmethod
    def _to_host(record: OffloadedKV) -> None:
        record.chunks = [(np.asarray(k), np.asarray(v)) for k, v in record.chunks]
        if record.sets is not None:
            record.sets = tuple(np.asarray(a) for a in record.sets)

    def restore(self, kv: KVCache, record: OffloadedKV, pages: list[int]) -> KVCache:
        """Write an offloaded request's KV into its newly granted pages; frees its share of the pool."""
        if record in self._landing:
            self._landing.remove(record)
            self._to_host(record)
        for (ids, _), (k_chunk, v_chunk) in zip(self._chunks_of(pages[:record.num_pages]), record.chunks):
            kv = scatter_pages(kv, ids, k_chunk, v_chunk)
        self.used_pages -= record.num_pages
        return kv
