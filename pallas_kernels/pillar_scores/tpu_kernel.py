"""PillarAttn score rematerialisation as a Pallas TPU kernel (Mosaic lowering).

Same contract as `reference.pillar_scores_paged_reference`. Grid (stacked layer, row, KV head, key split), all
parallel; page tables, lengths and the stack's layer indices are scalar-prefetched into SMEM. Each grid step first copies the
row's queries (all G heads of the KV head) and their LSEs into VMEM, one DMA per query token, where they
stay resident: a verify row has only k+1 queries. It then walks its range of logical key positions in
blocks of `pages_per_block` pages, double-buffering the K page DMAs exactly like the attention kernel
(V is never read), and for each block sums exp(scale * q.k - lse) over the visible (query, head) pairs,
`MAX_TILE_ROWS` pairs per matmul. Scores accumulate in the step's output block, which starts as -inf so
positions nobody sees need no pass of their own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention.tpu_kernel import (
    LANES, MAX_TILE_ROWS, MIN_GRID_STEPS, SUBLANES, check_head_dim, interpret_params, page_dma_block, round_up,
    token_dmas)
from pallas_kernels.paged_attention.triton_kernel import choose_kv_splits
from pallas_kernels.pillar_scores.reference import check_score_stack
from pallas_kernels.pool_checks import check_queries_against_pool

MAX_RESIDENT_QUERY_BYTES = 8 * 2 ** 20   # a row's resident queries must leave VMEM room for the K blocks


def _pillar_scores_kernel(layers_ref, q_start_ref, q_len_ref, kv_len_ref, table_ref, q_hbm, lse_hbm, k_hbm, out_ref,
                          q_buf, lse_buf, k_buf, kv_sems, io_sems, *, group, queries_per_chunk, pages_per_block,
                          page_size, num_pages, blocks_per_split, max_q_len, scale):
    entry, row, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    layer = layers_ref[entry]
    block_kv = pages_per_block * page_size
    num_queries = jnp.minimum(q_len_ref[row], max_q_len)
    first_token = q_start_ref[row]
    first_query_pos = kv_len_ref[row] - q_len_ref[row]                               # position of query 0
    num_keys = num_pages * page_size

    split_start = split * blocks_per_split * block_kv
    split_stop = jnp.minimum(split_start + blocks_per_split * block_kv, num_keys)
    visible_end = jnp.where(num_queries > 0, jnp.minimum(first_query_pos + num_queries, num_keys), 0)
    compute_end = jnp.clip(visible_end, split_start, split_stop)
    num_blocks = pl.cdiv(compute_end - split_start, block_kv)
    num_chunks = pl.cdiv(num_queries, queries_per_chunk)

    start_block, wait_block = page_dma_block(table_ref, row, num_pages, page_size, pages_per_block,
                                             (k_hbm.at[layer, kv_head],), (k_buf,), kv_sems)
    out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)

    @pl.when(num_blocks > 0)
    def _():
        token_dmas(num_queries, lambda t: [
            pltpu.make_async_copy(q_hbm.at[entry, first_token + t, kv_head], q_buf.at[:, t], io_sems.at[0]),
            pltpu.make_async_copy(lse_hbm.at[entry, first_token + t, kv_head], lse_buf.at[:, t], io_sems.at[1])])

        def block_bounds(block):
            first = split_start + block * block_kv
            return first, jnp.minimum(compute_end, first + block_kv)

        start_block(0, *block_bounds(0))

        def chunk_probability_sum(chunk, keys, key_pos, end):
            """Sum of exp(scale * q.k - lse) over the visible pairs of one query chunk: [1, BK]."""
            first_query = pl.multiple_of(chunk * queries_per_chunk, SUBLANES)
            chunk_slice = (slice(None), pl.ds(first_query, queries_per_chunk))
            query_index = first_query + lax.broadcasted_iota(jnp.int32, (group, queries_per_chunk, 1), 1)
            live = query_index < num_queries                                          # stale rows past q_len
            queries = jnp.where(live, q_buf[chunk_slice], 0).reshape(group * queries_per_chunk, -1)
            lse = jnp.where(live, lse_buf[chunk_slice], 0.0).reshape(-1, 1)
            query_pos = (first_query_pos + query_index).reshape(-1, 1)
            logits = lax.dot_general(queries.astype(keys.dtype), keys, (((1,), (1,)), ((), ())),
                                     precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
            visible = live.reshape(-1, 1) & (key_pos <= query_pos) & (key_pos < end)
            return jnp.sum(jnp.where(visible, jnp.exp(logits * scale - lse), 0.0), axis=0, keepdims=True)

        def body(block, carry):
            slot = block % 2

            @pl.when(block + 1 < num_blocks)
            def _():
                start_block(1 - slot, *block_bounds(block + 1))

            first, end = block_bounds(block)
            wait_block(slot, first, end)
            keys = k_buf[slot]
            key_pos = first + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
            total = lax.fori_loop(0, num_chunks,
                                  lambda chunk, acc: acc + chunk_probability_sum(chunk, keys, key_pos, end),
                                  jnp.zeros((1, block_kv), jnp.float32))
            seen_by = jnp.clip(num_queries - jnp.maximum(0, key_pos - first_query_pos), 0, num_queries)
            pairs = (group * seen_by).astype(jnp.float32)
            scores = jnp.where((key_pos < end) & (pairs > 0), total / jnp.maximum(pairs, 1.0), -jnp.inf)
            out_ref[:, pl.ds(pl.multiple_of(block * block_kv, block_kv), block_kv)] = scores
            return carry

        lax.fori_loop(0, num_blocks, body, 0)


def pillar_scores_paged_tpu(q, k_pool, layers, q_start, q_len, kv_len, page_tables, lse, *, page_size: int,
                            max_q_len: int, scale: float | None = None, pages_per_block: int | None = None,
                            kv_splits: int | None = None, interpret=False):
    """Mean attention probability of every logical key position per (stacked layer, row, KV head):
    f32[Ls, R, Hkv, P * page_size].

    pages_per_block: pages per double-buffered K block (None: enough for 128 positions, so score stores are
    lane-dense); kv_splits: key ranges per (row, KV head) (None: only when the grid would have fewer than
    MIN_GRID_STEPS steps). interpret: False on a TPU, True or a `pltpu.InterpretParams` elsewhere.
    """
    check_score_stack(q, layers, lse)
    num_stacked, num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = check_queries_against_pool(q, k_pool)
    num_rows, num_pages = page_tables.shape
    check_head_dim(head_dim)
    if max_q_len < 1 or page_size < 1:
        raise ValueError(f"max_q_len ({max_q_len}) and page_size ({page_size}) must be >= 1")
    for name, arr in (("q_start", q_start), ("q_len", q_len), ("kv_len", kv_len)):
        if arr.shape != (num_rows,):
            raise ValueError(f"{name} has shape {arr.shape}, expected ({num_rows},) to match page_tables")
    if num_rows == 0 or num_stacked == 0:               # no launch over an empty grid
        return jnp.zeros((num_stacked, num_rows, num_kv_heads, num_pages * page_size), jnp.float32)
    group = num_q_heads // num_kv_heads
    queries_per_chunk = round_up(min(max_q_len, max(1, MAX_TILE_ROWS // group)), SUBLANES)
    resident_queries = round_up(max_q_len, queries_per_chunk)
    resident_bytes = group * resident_queries * (head_dim * q.dtype.itemsize + LANES * 4)
    if resident_bytes > MAX_RESIDENT_QUERY_BYTES:
        raise ValueError(f"max_q_len {max_q_len} x {group} heads keeps {resident_bytes} bytes of queries and LSEs "
                         f"in VMEM, over the {MAX_RESIDENT_QUERY_BYTES}-byte limit: score verify rows only")
    scale = head_dim ** -0.5 if scale is None else scale
    pages_per_block = pages_per_block or max(1, LANES // page_size)
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block {pages_per_block} must be >= 1")
    block_kv = pages_per_block * page_size
    num_keys = num_pages * page_size
    num_blocks = -(-num_keys // block_kv)
    if kv_splits is None:
        kv_splits = choose_kv_splits(num_stacked * num_rows * num_kv_heads, num_blocks, MIN_GRID_STEPS)
    kv_splits = max(1, min(kv_splits, num_blocks))
    blocks_per_split = -(-num_blocks // kv_splits)
    split_len = blocks_per_split * block_kv

    kernel = functools.partial(
        _pillar_scores_kernel, group=group, queries_per_chunk=queries_per_chunk, pages_per_block=pages_per_block,
        page_size=page_size, num_pages=num_pages, blocks_per_split=blocks_per_split, max_q_len=max_q_len,
        scale=scale)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    scores = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_stacked, num_rows, num_kv_heads, kv_splits),
            in_specs=[hbm, hbm, hbm],
            out_specs=pl.BlockSpec((None, None, None, None, 1, split_len),
                                   lambda e, r, h, s, *_: (e, r, h, s, 0, 0)),
            scratch_shapes=[
                pltpu.VMEM((group, resident_queries, head_dim), q.dtype),
                pltpu.VMEM((group, resident_queries, 1), jnp.float32),
                pltpu.VMEM((2, block_kv, head_dim), k_pool.dtype),
                pltpu.SemaphoreType.DMA((1, 2)),
                pltpu.SemaphoreType.DMA((2,)),
            ]),
        out_shape=jax.ShapeDtypeStruct((num_stacked, num_rows, num_kv_heads, kv_splits, 1, split_len), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 4),
        interpret=interpret_params(interpret),
        name="pillar_scores_paged_tpu",
    )(jnp.asarray(layers, jnp.int32), q_start.astype(jnp.int32), q_len.astype(jnp.int32),
      kv_len.astype(jnp.int32), page_tables.astype(jnp.int32).reshape(-1),
      q.reshape(num_stacked, num_tokens, num_kv_heads, group, head_dim),
      lse.astype(jnp.float32).reshape(num_stacked, num_tokens, num_kv_heads, group, 1), k_pool)
    return scores.reshape(num_stacked, num_rows, num_kv_heads, kv_splits * split_len)[..., :num_keys]
