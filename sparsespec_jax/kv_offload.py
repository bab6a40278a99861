"""Host-memory pool for evicted requests' KV: offload in fixed-size chunks, asynchronously, and restore.

Offloading gathers a request's pages in chunks of a fixed page count (the last one padded with the reserved
padding page) and places them in the device's host memory space (pinned host memory where the platform has
it), the copy being part of the compiled gather. The chunks go in groups of powers of two, one call per group
(5 chunks: 4 + 1), because on a GPU host every call costs ~0.1-0.5 ms however little it moves: per chunk calls
made an offload or a restore cost the host ~5-9 ms. Programs compile once per group size. Nothing is waited
for: the pages are free for reuse at once, since later steps are ordered after the gather on device, and
restoring writes the chunks back into newly granted pages, again enqueued behind any copy still in flight.

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


def _chunk_slots(page_ids, page_size: int):
    """Pool slots of each chunk's pages: [chunks, pages] -> [chunks, pages * page_size]."""
    slots = page_ids[:, :, None] * page_size + jnp.arange(page_size, dtype=page_ids.dtype)
    return slots.reshape(page_ids.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("page_size",))
def offload_chunks(k_pool, v_pool, page_ids, sets, page_size: int):
    """K and V of each chunk of pages ([L, Hkv, chunks, chunk tokens, D] each) and `sets` (any pytree), in host
    memory."""
    slots = _chunk_slots(page_ids, page_size)
    return jax.device_put((k_pool[:, :, slots], v_pool[:, :, slots], sets), jax.memory.Space.Host)


@functools.partial(jax.jit, donate_argnames=("kv",))
def restore_chunks(kv: KVCache, page_ids, k_chunks, v_chunks, sets) -> tuple[KVCache, tuple | None]:
    """Write host-memory chunks (as offload_chunks made them) into the pool's pages `page_ids` [chunks, pages];
    `sets` comes back to device memory."""
    k_chunks, v_chunks, sets = jax.device_put((k_chunks, v_chunks, sets), jax.memory.Space.Device)
    slots = _chunk_slots(page_ids, kv.page_size)
    return KVCache(k=kv.k.at[:, :, slots].set(k_chunks), v=kv.v.at[:, :, slots].set(v_chunks),
                   page_size=kv.page_size), sets


HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")   # preferred first


def host_memory_kind(device: jax.Device) -> str:
    """The memory space offloaded KV is kept in: pinned host memory copies fastest over PCIe."""
    kinds = {memory.kind for memory in device.addressable_memories()}
    for kind in HOST_MEMORY_KINDS:
        if kind in kinds:
            return kind
    raise ValueError(f"host_kv_tokens: device {device} has no host memory space (has {sorted(kinds)}); "
                     f"set host_kv_tokens=0 to recompute evicted requests instead")


def power_of_two_groups(count: int) -> list[int]:
    """count as a sum of distinct powers of two, largest first (5 -> [4, 1])."""
    return [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]


@dataclasses.dataclass(eq=False)
class OffloadedKV:
    """One request's KV in host memory; arrays whose copy is still in flight are ordered before any use."""

    chunks: list[tuple]      # (k, v) per group of chunks, in host memory
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

    def _chunk_groups(self, pages: list[int]):
        """Page ids [chunks, chunk_pages] per power-of-two group of chunks, the last chunk padded."""
        num_chunks = -(-len(pages) // self.chunk_pages)
        ids = np.full(num_chunks * self.chunk_pages, PADDING_PAGE, np.int32)
        ids[:len(pages)] = pages
        ids = ids.reshape(num_chunks, self.chunk_pages)
        begin = 0
        for size in power_of_two_groups(num_chunks):
            yield ids[begin:begin + size]
            begin += size

    def offload(self, kv: KVCache, pages: list[int], sets: tuple | None) -> OffloadedKV:
        """Start copying `pages` (and the draft set) to host memory; the caller may reuse the pages at once."""
        host_memory_kind(next(iter(kv.k.sharding.device_set)))       # a clear error where there is none
        first, *rest = self._chunk_groups(pages)                      # the first group carries the set
        k_chunks, v_chunks, host_sets = offload_chunks(kv.k, kv.v, first, sets, self.page_size)
        chunks = [(k_chunks, v_chunks)] + [offload_chunks(kv.k, kv.v, ids, None, self.page_size)[:2]
                                           for ids in rest]
        self.used_pages += len(pages)
        self.peak_pages = max(self.peak_pages, self.used_pages)
        return OffloadedKV(chunks=chunks, num_pages=len(pages), sets=host_sets)

    def restore(self, kv: KVCache, record: OffloadedKV, pages: list[int]) -> tuple[KVCache, tuple | None]:
        """Write an offloaded request's KV into its newly granted pages and bring its draft set back to the
        device; frees its share of the pool."""
        first, *rest = self._chunk_groups(pages[:record.num_pages])
        first_chunks, *rest_chunks = record.chunks
        kv, sets = restore_chunks(kv, first, *first_chunks, record.sets)
        for ids, chunk in zip(rest, rest_chunks):
            kv, _ = restore_chunks(kv, ids, *chunk, None)
        self.used_pages -= record.num_pages
        return kv, sets
