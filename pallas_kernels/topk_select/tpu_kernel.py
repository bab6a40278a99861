"""Top-K threshold select as a Pallas TPU kernel (Mosaic lowering): counting and matmuls, no sort.

Same contract as `reference.topk_select_reference`. One grid step per (row, head), both axes parallel;
k is scalar-prefetched. The row's scores are read from HBM once, as a [C, 128] VMEM block (positions
c * 128 + lane), and mapped to order keys (see `reference.float_order_key`).

Threshold: the k-th largest key T is the largest t with count(keys >= t) >= k, found one bit at a time
from the top (sign bit first, in the unsigned order of key ^ INT32_MIN): 32 counting passes over the
VMEM-resident block. Selected: keys > T, then the lowest-position ties == T.

Compaction without scatter or cumsum (neither lowers on Mosaic): inclusive prefix counts come from two
MXU matmuls, a [C, 128] 0/1 mask times a 128 x 128 upper-triangular ones matrix (counts within each
128-lane chunk) plus a strictly lower-triangular C x C matrix times the chunk totals (offsets). The j-th
chosen position is the number of positions whose inclusive count is <= j: 128 per chunk whose end count is
<= j, plus the lanes of the one chunk where the count crosses j, gathered for every j of an output tile by
a one-hot matmul. Every matmul operand is a small integer (0/1 or <= 128), exact in bf16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention.tpu_kernel import LANES, interpret_params, round_up
from pallas_kernels.topk_select.reference import float_order_key, selected_count

INT32_MIN = -(2 ** 31)


def _exact_small_int_dot(lhs, rhs, dimension_numbers=(((1,), (0,)), ((), ()))):
    """Matmul of 0/1 and <= 128 integer operands: exact in bf16 with f32 accumulation, one MXU pass."""
    return lax.dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers,
                           preferred_element_type=jnp.float32)


def chunk_prefix_counts(mask):
    """Inclusive prefix counts of a [C, 128] mask in flat (chunk, lane) order, split as (within-chunk counts
    f32 [C, 128], exclusive chunk offsets int32 [C, 1])."""
    num_chunks = mask.shape[0]
    upper = lax.broadcasted_iota(jnp.int32, (LANES, LANES), 0) <= lax.broadcasted_iota(jnp.int32, (LANES, LANES), 1)
    local = _exact_small_int_dot(mask, upper)
    strictly_lower = (lax.broadcasted_iota(jnp.int32, (num_chunks, num_chunks), 1)
                      < lax.broadcasted_iota(jnp.int32, (num_chunks, num_chunks), 0))
    totals = jnp.broadcast_to(local[:, LANES - 1:], local.shape)
    offsets = _exact_small_int_dot(strictly_lower, totals)
    return local, offsets[:, :1].astype(jnp.int32)


def _topk_select_kernel(k_ref, scores_ref, out_ref, *, num_positions, max_k):
    row = pl.program_id(0)
    num_chunks = scores_ref.shape[0]
    wanted = jnp.clip(k_ref[row], 0, min(max_k, num_positions))

    # Rows that want nothing (padding rows, rows without a refresh) skip the search and write zeros.
    @pl.when(wanted == 0)
    def _nothing():
        out_ref[...] = jnp.zeros_like(out_ref)

    @pl.when(wanted > 0)
    def _select():
        positions = (lax.broadcasted_iota(jnp.int32, (num_chunks, LANES), 0) * LANES
                     + lax.broadcasted_iota(jnp.int32, (num_chunks, LANES), 1))
        keys = jnp.where(positions < num_positions, float_order_key(scores_ref[...]), INT32_MIN)

        def count_at_least(threshold):
            return jnp.sum((keys >= threshold).astype(jnp.int32))

        def add_bit(i, found):
            candidate = found | lax.shift_left(jnp.int32(1), 30 - i)
            return jnp.where(count_at_least(candidate) >= wanted, candidate, found)

        # Bit 31 of the unsigned order is the sign: the threshold is >= 0 iff k keys are >= 0.
        threshold = jnp.where(count_at_least(0) >= wanted, jnp.int32(0), jnp.int32(INT32_MIN))
        threshold = lax.fori_loop(0, 31, add_bit, threshold)

        above = keys > threshold
        ties_wanted = wanted - jnp.sum(above.astype(jnp.int32))
        tie = keys == threshold
        tie_local, tie_offsets = chunk_prefix_counts(tie)
        chosen = above | (tie & (tie_local.astype(jnp.int32) + tie_offsets <= ties_wanted))
        local, offsets = chunk_prefix_counts(chosen)
        chunk_end = offsets + local[:, LANES - 1:].astype(jnp.int32)                    # [C, 1] inclusive
        chunk_index = lax.broadcasted_iota(jnp.int32, (num_chunks, 1), 0)

        for first_output in range(0, out_ref.shape[-1], LANES):
            j = first_output + lax.broadcasted_iota(jnp.int32, (1, LANES), 1)             # output entries
            full_chunks = jnp.sum((chunk_end <= j).astype(jnp.int32), axis=0, keepdims=True)
            crossing = chunk_index == full_chunks                                         # one-hot [C, J]
            crossing_local = _exact_small_int_dot(local, crossing, (((0,), (0,)), ((), ())))  # [lane, J]
            crossing_offset = jnp.sum(jnp.where(crossing, offsets, 0), axis=0, keepdims=True)
            in_crossing = jnp.sum((crossing_local.astype(jnp.int32) <= j - crossing_offset).astype(jnp.int32),
                                  axis=0, keepdims=True)
            position = LANES * full_chunks + jnp.where(full_chunks < num_chunks, in_crossing, 0)
            out_ref[:, first_output:first_output + LANES] = jnp.where(j < wanted, position, 0)


def topk_select_tpu(scores, k, *, max_k: int, interpret=False):
    """Per (row, head) the k[row] largest scores: (indices int32[R, H, max_k] ascending, count int32[R]).

    Rows whose length is not a multiple of 128 are padded by one copy first; size score rows to multiples
    of 128 to avoid it. interpret: False on a TPU, True or a `pltpu.InterpretParams` elsewhere.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be [rows, heads, positions], got shape {scores.shape}")
    num_rows, num_heads, num_positions = scores.shape
    if k.shape != (num_rows,):
        raise ValueError(f"k has shape {k.shape}, expected ({num_rows},) to match scores")
    if max_k < 1 or num_positions < 1:
        raise ValueError(f"max_k ({max_k}) and the number of positions ({num_positions}) must be >= 1")
    if num_rows == 0:                                   # no launch over an empty grid
        return jnp.zeros((0, num_heads, max_k), jnp.int32), selected_count(k, max_k, num_positions)
    padded_positions = round_up(num_positions, LANES)
    scores = scores.astype(jnp.float32)
    if padded_positions != num_positions:
        scores = jnp.pad(scores, ((0, 0), (0, 0), (0, padded_positions - num_positions)))
    num_chunks = padded_positions // LANES
    padded_k = round_up(max_k, LANES)

    kernel = functools.partial(_topk_select_kernel, num_positions=num_positions, max_k=max_k)
    indices = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(num_rows, num_heads),
            in_specs=[pl.BlockSpec((None, None, num_chunks, LANES), lambda r, h, *_: (r, h, 0, 0))],
            out_specs=pl.BlockSpec((None, None, 1, padded_k), lambda r, h, *_: (r, h, 0, 0))),
        out_shape=jax.ShapeDtypeStruct((num_rows, num_heads, 1, padded_k), jnp.int32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params(interpret),
        name="topk_select_tpu",
    )(k.astype(jnp.int32), scores.reshape(num_rows, num_heads, num_chunks, LANES))
    return indices[:, :, 0, :max_k], selected_count(k, max_k, num_positions)
