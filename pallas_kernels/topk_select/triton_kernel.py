"""Top-K threshold select as a Pallas GPU kernel (Triton lowering), not a sort.

Same contract as `reference.topk_select_reference`. One program per (row, head):
  1. map each float to an int32 key whose signed order is the float order;
  2. build the k-th largest key T bit by bit, sign first (32 counting passes: keep a bit when at least k
     keys are >= the candidate);
  3. keep every key > T and the lowest-positioned keys == T until k are kept, writing positions at their
     prefix-sum rank, so the output is in ascending position order.
Rows of up to `max_resident` positions are read from memory once and stay in registers for all passes;
longer rows are walked in chunks of `max_resident` in every pass (re-read, mostly from L2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention.triton_kernel import next_power_of_2
from pallas_kernels.topk_select.reference import float_order_key, selected_count

INT32_MIN = -(2 ** 31)
INT31_MAX = 2 ** 31 - 1
PAD_CHUNK = 1024           # output entries zero-filled per store


def _topk_select_kernel(k_ref, scores_ref, out_ref, *, num_positions, chunk, num_chunks, max_k):
    row, head = pl.program_id(0), pl.program_id(1)
    wanted = jnp.clip(k_ref[row], 0, min(max_k, num_positions))

    def load_chunk(index):
        """Positions, liveness and order keys of one chunk; positions past the row get INT32_MIN."""
        positions = index * chunk + jnp.arange(chunk, dtype=jnp.int32)
        live = positions < num_positions
        scores = scores_ref[row, head, jnp.minimum(positions, num_positions - 1)]
        return positions, live, jnp.where(live, float_order_key(scores), INT32_MIN)

    def chunk_sum(per_chunk, keys_of_chunk):
        """Sum of per_chunk(keys) over the row (an int32 scalar)."""
        if num_chunks == 1:
            return per_chunk(keys_of_chunk(0))
        return lax.fori_loop(0, num_chunks, lambda c, acc: acc + per_chunk(keys_of_chunk(c)), jnp.int32(0))

    resident = load_chunk(0)[2] if num_chunks == 1 else None
    signed_keys = (lambda c: resident) if resident is not None else (lambda c: load_chunk(c)[2])

    # The sign of the threshold first; then every key is mapped into [0, 2**31) so that counting
    # key >= candidate is a subtraction and a sign-bit extraction (no overflow, no compare-select).
    nonnegative = chunk_sum(lambda keys: jnp.sum((keys >= 0).astype(jnp.int32)), signed_keys)
    negative_threshold = nonnegative < wanted

    def magnitude_keys(keys):
        """Order-preserving 31-bit keys within the threshold's sign; the other sign saturates (padding -> 0)."""
        return jnp.where(negative_threshold, jnp.where(keys >= 0, INT31_MAX, keys & INT31_MAX),
                         jnp.maximum(keys, 0))

    resident_magnitudes = magnitude_keys(resident) if resident is not None else None

    def magnitudes(c):
        return resident_magnitudes if resident is not None else magnitude_keys(load_chunk(c)[2])

    def count_at_least(candidate):
        below = chunk_sum(lambda keys: jnp.sum(lax.shift_right_logical(keys - candidate, 31)), magnitudes)
        return num_chunks * chunk - below

    def add_bit(i, threshold):
        candidate = threshold | lax.shift_left(jnp.int32(1), 30 - i)
        return jnp.where(count_at_least(candidate) >= wanted, candidate, threshold)

    magnitude_threshold = lax.fori_loop(0, 31, add_bit, jnp.int32(0))
    threshold = jnp.where(negative_threshold, magnitude_threshold | INT32_MIN, magnitude_threshold)

    # Selection works on the signed keys again (re-read; the row is still in cache).
    final_chunk = (lambda c: load_chunk(0)) if num_chunks == 1 else load_chunk
    final_resident = final_chunk(0) if num_chunks == 1 else None
    chunk_data = (lambda c: final_resident) if num_chunks == 1 else final_chunk
    greater = chunk_sum(lambda keys: jnp.sum((keys > threshold).astype(jnp.int32)), lambda c: chunk_data(c)[2])
    ties_wanted = wanted - greater

    def write_chunk(index, carry):
        ties_before, written_before = carry
        positions, live, keys = chunk_data(index)
        any_wanted = wanted > 0
        tie = (keys == threshold) & live & any_wanted
        tie_rank = ties_before + lax.cumsum(tie.astype(jnp.int32), axis=0)
        chosen = ((keys > threshold) & live & any_wanted) | (tie & (tie_rank <= ties_wanted))
        chosen_count = chosen.astype(jnp.int32)
        slot = written_before + lax.cumsum(chosen_count, axis=0) - 1
        # Unchosen lanes point past the end so they alias no chosen one (interpret mode writes them).
        plgpu.store(out_ref.at[row, head, jnp.where(chosen, slot, max_k)], positions, mask=chosen)
        return ties_before + jnp.sum(tie.astype(jnp.int32)), written_before + jnp.sum(chosen_count)

    lax.fori_loop(0, num_chunks, write_chunk, (jnp.int32(0), jnp.int32(0)))

    pad_width = min(PAD_CHUNK, next_power_of_2(max_k))
    for start in range(0, max_k, pad_width):
        entries = start + jnp.arange(pad_width, dtype=jnp.int32)
        unused = (entries >= wanted) & (entries < max_k)
        plgpu.store(out_ref.at[row, head, jnp.where(unused, entries, max_k)], jnp.zeros_like(entries), mask=unused)


def topk_select(scores, k, *, max_k: int, max_resident: int = 16384, num_warps: int = 8, num_stages: int = 1,
                interpret: bool = False):
    """Per (row, head) the k[row] largest scores: (indices int32[R, H, max_k] ascending, count int32[R])."""
    if scores.ndim != 3:
        raise ValueError(f"scores must be [rows, heads, positions], got shape {scores.shape}")
    num_rows, num_heads, num_positions = scores.shape
    if k.shape != (num_rows,):
        raise ValueError(f"k has shape {k.shape}, expected ({num_rows},) to match scores")
    if max_k < 1 or num_positions < 1:
        raise ValueError(f"max_k ({max_k}) and the number of positions ({num_positions}) must be >= 1")
    if max_resident != next_power_of_2(max_resident):
        raise ValueError(f"max_resident {max_resident} must be a power of 2")
    chunk = min(max_resident, next_power_of_2(num_positions))
    num_chunks = -(-num_positions // chunk)

    kernel = functools.partial(_topk_select_kernel, num_positions=num_positions, chunk=chunk,
                               num_chunks=num_chunks, max_k=max_k)
    indices = pl.pallas_call(
        kernel,
        grid=(num_rows, num_heads),
        out_shape=jax.ShapeDtypeStruct((num_rows, num_heads, max_k), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="topk_select",
    )(k.astype(jnp.int32), scores.astype(jnp.float32))
    return indices, selected_count(k, max_k, num_positions)
