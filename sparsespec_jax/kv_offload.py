"""Host-memory pool for evicted requests' KV: offload in fixed-size chunks, asynchronously, and restore.

Offloading gathers a request's pages chunk by chunk on the device and moves each chunk into the device's host
memory space (pinned host memory where the platform has it) with `jax.device_put`. Both are enqueued, never
waited for: the pages are free for reuse at once, since later steps are ordered after the gather on device,
and the gathered chunk lives only until its copy has landed. Restoring moves the chunks back and writes them
into newly granted pages, again enqueued behind any copy still in flight. No call here blocks the host.
Chunks have a fixed page count (the last one padded with the reserved padding page), so the gather and scatter
compile once.

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


HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")   # preferred first


def host_memory_kind(device: jax.Device) -> str:
    """The memory space offloaded KV is kept in: pinned host memory copies fastest over PCIe."""
    kinds = {memory.kind for memory in device.addressable_memories()}
    for kind in HOST_MEMORY_KINDS:
        if kind in kinds:
            return kind
    raise ValueError(f"host_kv_tokens: device {device} has no host memory space (has {sorted(kinds)}); "
                     f"set host_kv_tokens=0 to recompute evicted requests instead")


def _moved(array: jax.Array, memory_kind: str) -> jax.Array:
    """`array` in another memory space of the same devices (an enqueued copy)."""
    return jax.device_put(array, array.sharding.with_memory_kind(memory_kind))


@dataclasses.dataclass(eq=False)
class OffloadedKV:
    """One request's KV in host memory; arrays whose copy is still in flight are ordered before any use."""

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
            yield np.asarray(ids + [PADDING_PAGE] * (self.chunk_pages - len(ids)), np.int32)

    def offload(self, kv: KVCache, pages: list[int], sets: tuple | None) -> OffloadedKV:
        """Start copying `pages` (and the draft set) to host memory; the caller may reuse the pages at once."""
        host = host_memory_kind(next(iter(kv.k.sharding.device_set)))
        chunks = [tuple(_moved(chunk, host) for chunk in gather_pages(kv.k, kv.v, ids, self.page_size))
                  for ids in self._chunks_of(pages)]
        record = OffloadedKV(chunks=chunks, num_pages=len(pages),
                             sets=None if sets is None else tuple(_moved(array, host) for array in sets))
        self.used_pages += len(pages)
        self.peak_pages = max(self.peak_pages, self.used_pages)
        return record

    def restore(self, kv: KVCache, record: OffloadedKV, pages: list[int]) -> tuple[KVCache, tuple | None]:
        """Write an offloaded request's KV into its newly granted pages and bring its draft set back to the
        device; frees its share of the pool."""
        for ids, (k_chunk, v_chunk) in zip(self._chunks_of(pages[:record.num_pages]), record.chunks):
            kv = scatter_pages(kv, ids, _moved(k_chunk, "device"), _moved(v_chunk, "device"))
        self.used_pages -= record.num_pages
        sets = None if record.sets is None else tuple(_moved(array, "device") for array in record.sets)
        return kv, sets
