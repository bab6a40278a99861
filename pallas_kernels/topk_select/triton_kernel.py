"""Top-K threshold select as a Pallas GPU kernel (Triton lowering), not a sort.

Same contract as `reference.topk_select_reference`. One program per (row, head) finds the k-th largest
order key T (see `reference.float_order_key`) by counting, then writes every position whose key is > T and
the lowest positions whose key == T, each at its prefix-sum rank (so in ascending position order).

Finding T: one count decides its sign; every key is then mapped to a 31-bit magnitude within that sign.
T's magnitude is built bit by bit, keeping a bit when at least k keys are >= the candidate. Counting is
the whole cost, so bits 30..16 and then 15..1 are found on 15-bit fields packed two per int32 word
(a SIMD-within-a-register compare: with a guard bit above each field, (field | guard) - candidate keeps
the guard iff field >= candidate), halving the work of 30 of the 31 passes; bit 0 takes one plain count.
For the second group, keys whose high field is above T's count as the largest field value and keys below
as zero, so the same count stays exact.

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
FIELD_MAX = 0x7FFF                  # a 15-bit field
GUARD_BITS = INT32_MIN + 0x8000     # 0x80008000: the guard bit above each of the two packed fields
LANE_ONES = 0x10001                 # broadcasts a field value into both lanes
MIN_CHUNK = 32
PAD_CHUNK = 1024                    # output entries zero-filled per store


def _count_packed_at_least(words, candidate):
    """How many of the 2 * words.size packed 15-bit fields are >= candidate (1 <= candidate <= FIELD_MAX)."""
    survivors = lax.shift_right_logical((words - candidate * LANE_ONES) & GUARD_BITS, 15)
    lanes = jnp.sum(survivors)          # two 16-bit lane counts, each <= words.size: no carry between them
    return (lanes & 0xFFFF) + lax.shift_right_logical(lanes, 16)


def _pack_fields(first, second):
    return lax.shift_left(first, 16) | second | GUARD_BITS


def _topk_select_kernel(k_ref, scores_ref, out_ref, *, num_positions, chunk, num_chunks, max_k):
    row, head = pl.program_id(0), pl.program_id(1)
    wanted = jnp.clip(k_ref[row], 0, min(max_k, num_positions))
    half = chunk // 2

    def load_half(index, which):
        """Positions, liveness and order keys of half `which` of chunk `index`; padding gets INT32_MIN."""
        positions = index * chunk + which * half + jnp.arange(half, dtype=jnp.int32)
        live = positions < num_positions
        scores = scores_ref[row, head, jnp.minimum(positions, num_positions - 1)]
        return positions, live, jnp.where(live, float_order_key(scores), INT32_MIN)

    def load_keys(index):
        return load_half(index, 0)[2], load_half(index, 1)[2]

    def row_sum(per_chunk, chunk_values, resident_values):
        """Sum over the row's chunks of per_chunk(*values), values held resident when the row is one chunk."""
        if resident_values is not None:
            return per_chunk(*resident_values)
        return lax.fori_loop(0, num_chunks, lambda c, acc: acc + per_chunk(*chunk_values(c)), jnp.int32(0))

    def count(condition):
        return lambda *halves: sum(jnp.sum(condition(h).astype(jnp.int32)) for h in halves)

    # Rows that want nothing (padding rows, rows without a refresh) skip the search: only the zero fill runs.
    @pl.when(wanted > 0)
    def _select():
        one_chunk = num_chunks == 1
        resident_keys = load_keys(0) if one_chunk else None
        negative_threshold = row_sum(count(lambda keys: keys >= 0), load_keys, resident_keys) < wanted

        def magnitudes(keys):
            """Order-preserving 31-bit keys within the threshold's sign; the other sign saturates (padding -> 0)."""
            return jnp.where(negative_threshold, jnp.where(keys >= 0, INT31_MAX, keys & INT31_MAX),
                             jnp.maximum(keys, 0))

        def chunk_magnitudes(index):
            return tuple(map(magnitudes, load_keys(index)))

        resident_magnitudes = tuple(map(magnitudes, resident_keys)) if one_chunk else None

        def search_field(packed_words):
            """Largest 15-bit value v with at least `wanted` packed fields >= v."""
            resident_words = packed_words(*resident_magnitudes) if one_chunk else None

            def words_of_chunk(index):
                return (packed_words(*chunk_magnitudes(index)),)

            def add_bit(i, found):
                candidate = found | lax.shift_left(jnp.int32(1), 14 - i)
                at_least = row_sum(lambda words: _count_packed_at_least(words, candidate), words_of_chunk,
                                   None if resident_words is None else (resident_words,))
                return jnp.where(at_least >= wanted, candidate, found)

            return lax.fori_loop(0, 15, add_bit, jnp.int32(0))

        high = search_field(lambda first, second: _pack_fields(first >> 16, second >> 16))

        def low_field(magnitude):
            field = magnitude >> 16
            return jnp.where(field > high, FIELD_MAX, jnp.where(field == high, (magnitude >> 1) & FIELD_MAX, 0))

        low = search_field(lambda first, second: _pack_fields(low_field(first), low_field(second)))
        with_bit0 = lax.shift_left(high, 16) | lax.shift_left(low, 1) | 1
        keep_bit0 = row_sum(count(lambda m: m >= with_bit0), chunk_magnitudes, resident_magnitudes) >= wanted
        magnitude_threshold = jnp.where(keep_bit0, with_bit0, with_bit0 - 1)
        threshold = jnp.where(negative_threshold, magnitude_threshold | INT32_MIN, magnitude_threshold)

        # Selection works on the signed keys again (re-read: the row is still in cache).
        final_keys = load_keys(0) if one_chunk else None
        ties_wanted = wanted - row_sum(count(lambda keys: keys > threshold), load_keys, final_keys)

        def write_half(positions, live, keys, ties_before, written_before):
            tie = (keys == threshold) & live
            tie_rank = ties_before + lax.cumsum(tie.astype(jnp.int32), axis=0)
            chosen = ((keys > threshold) & live) | (tie & (tie_rank <= ties_wanted))
            chosen_count = chosen.astype(jnp.int32)
            slot = written_before + lax.cumsum(chosen_count, axis=0) - 1
            # Unchosen lanes point past the end so they alias no chosen one (interpret mode writes them).
            plgpu.store(out_ref.at[row, head, jnp.where(chosen, slot, max_k)], positions, mask=chosen)
            return ties_before + jnp.sum(tie.astype(jnp.int32)), written_before + jnp.sum(chosen_count)

        def write_chunk(index, carry):
            for which in (0, 1):
                positions, live, keys = load_half(index, which)
                if final_keys is not None:
                    keys = final_keys[which]
                carry = write_half(positions, live, keys, *carry)
            return carry

        lax.fori_loop(0, num_chunks, write_chunk, (jnp.int32(0), jnp.int32(0)))

    pad_width = min(PAD_CHUNK, next_power_of_2(max_k))
    for start in range(0, max_k, pad_width):
        entries = start + jnp.arange(pad_width, dtype=jnp.int32)
        unused = (entries >= wanted) & (entries < max_k)
        plgpu.store(out_ref.at[row, head, jnp.where(unused, entries, max_k)], jnp.zeros_like(entries), mask=unused)


def topk_select(scores, k, *, max_k: int, max_resident: int = 8192, num_warps: int = 4, num_stages: int = 1,
                interpret: bool = False):
    """Per (row, head) the k[row] largest scores: (indices int32[R, H, max_k] ascending, count int32[R])."""
    if scores.ndim != 3:
        raise ValueError(f"scores must be [rows, heads, positions], got shape {scores.shape}")
    num_rows, num_heads, num_positions = scores.shape
    if k.shape != (num_rows,):
        raise ValueError(f"k has shape {k.shape}, expected ({num_rows},) to match scores")
    if max_k < 1 or num_positions < 1:
        raise ValueError(f"max_k ({max_k}) and the number of positions ({num_positions}) must be >= 1")
    if max_resident < MIN_CHUNK or max_resident != next_power_of_2(max_resident):
        raise ValueError(f"max_resident {max_resident} must be a power of 2 >= {MIN_CHUNK}")
    chunk = max(MIN_CHUNK, min(max_resident, next_power_of_2(num_positions)))
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
