"""Ragged paged attention as a Pallas TPU kernel (Mosaic lowering).

Same contract as `reference.ragged_paged_attention_reference`; one launch serves decode rows (1 query),
verify rows (k+1 causal queries) and prefill chunks.

Work decomposition:
  * grid (row, KV head, query tile x KV split), every axis parallel (megacore chips split it across their
    TensorCores). Page tables, lengths and the layer index are scalar-prefetched into SMEM.
  * the G query heads of a KV head and `queries_per_tile` of the row's query tokens form one [G * Tq, D]
    tile, head-major (row m is head m // Tq, query m % Tq) with Tq a multiple of 8 sublanes, so the
    [G, Tq, D] VMEM buffers reshape to the matmul tile for free and every K/V block feeds all G heads.
  * queries are copied in and results copied out with one small DMA per live query token: rows are
    ragged and may sit anywhere in the flat token batch, so no fixed block could be written back without
    clobbering a neighbouring row.
  * the row's visible KV range is walked in blocks of `pages_per_block` pages: each page is one DMA of a
    [page_size, D] slab from the HBM pool into a double-buffered VMEM block, the next block's DMAs are in
    flight while the current one is computed. Online softmax state (running max and sum, broadcast over
    128 lanes, and the f32 accumulator) lives in VMEM scratch.
  * head_dim below 128 occupies part of the lanes (Mosaic pads the vregs); larger head_dims must be
    multiples of 128.
  * `kv_splits` cuts each row's KV range into contiguous ranges (split-KV) merged by log-sum-exp afterwards,
    so a few long rows still give every TensorCore work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention.reference import owned_tokens
from pallas_kernels.paged_attention.triton_kernel import choose_kv_splits, merge_kv_splits
from pallas_kernels.pool_checks import check_queries_against_pool

LANES = 128                # vreg lane count: last-dim tile of every TPU generation
SUBLANES = 8               # vreg sublane count for 32-bit values
MAX_TILE_ROWS = 128        # query rows (heads x tokens) per tile: one MXU pass on v5e, half on v6e
MIN_GRID_STEPS = 4         # split the KV range until the grid has this many steps (2 TensorCores, balance)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def interpret_params(interpret) -> pltpu.InterpretParams | bool:
    """`interpret` as pallas_call wants it for a TPU kernel: True means the default TPU interpreter."""
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def check_head_dim(head_dim: int) -> None:
    """Mosaic tiles the last dim by 128 lanes: a smaller head_dim fills part of each vreg, a larger one whole vregs."""
    if head_dim > LANES and head_dim % LANES:
        raise ValueError(f"head_dim {head_dim} must be <= {LANES} or a multiple of {LANES} for the TPU kernel")


def page_dma_block(table_ref, row, num_pages, page_size, pages_per_block, hbm_refs, buffers, sems):
    """(start, wait), each called as f(slot, first, end): the page DMAs of KV positions [first, end) of one block.

    Each live page (one holding a position < end) is one DMA per pool of a [page_size, D] slab, layer and
    KV head already selected in `hbm_refs`, into `buffers[slot]` at the page's offset in the block. Dead
    pages are never read: page-table entries past a row's length may hold anything.
    """

    def live_pages(first, end):
        return jnp.clip(pl.cdiv(end - first, page_size), 0, pages_per_block)

    def copies(slot, first, page):
        logical_page = jnp.minimum(first // page_size + page, num_pages - 1)
        pool_page = table_ref[row * num_pages + logical_page]
        return [pltpu.make_async_copy(hbm.at[pl.ds(pool_page * page_size, page_size)],
                                      buffer.at[slot, pl.ds(page * page_size, page_size)], sems.at[index, slot])
                for index, (hbm, buffer) in enumerate(zip(hbm_refs, buffers))]

    def for_live_pages(action):
        def run(slot, first, end):
            def body(page, carry):
                for copy in copies(slot, first, page):
                    getattr(copy, action)()
                return carry

            lax.fori_loop(0, live_pages(first, end), body, 0)

        return run

    return for_live_pages("start"), for_live_pages("wait")


def online_softmax_step(logits, values, acc_ref, max_ref, sum_ref):
    """Fold one block of logits [M, BK] (-inf where masked) and values [BK, D] into the VMEM softmax state."""
    max_prev = max_ref[...]                                                           # [M, LANES]
    max_next = jnp.maximum(max_prev, jnp.max(logits, axis=1, keepdims=True))
    safe_max = jnp.where(max_next == -jnp.inf, 0.0, max_next)
    correction = jnp.exp(max_prev - safe_max)
    probs = jnp.exp(logits - safe_max[:, :1])
    sum_ref[...] = sum_ref[...] * correction + jnp.sum(probs, axis=1, keepdims=True)
    acc_ref[...] = acc_ref[...] * correction[:, :1] + jnp.dot(
        probs.astype(values.dtype), values, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    max_ref[...] = max_next


def finish_softmax(acc_ref, max_ref, sum_ref):
    """Normalised output [M, D] and natural-log LSE [M, LANES]; rows that saw no key give zeros and -inf."""
    total = sum_ref[...]
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    out = acc_ref[...] / safe_total[:, :1]
    lse = jnp.where(seen, max_ref[...] + jnp.log(safe_total), -jnp.inf)
    return out, lse


def init_softmax(acc_ref, max_ref, sum_ref):
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)


def token_dmas(count, make_copies):
    """Start, then wait for, the copies make_copies(t) for t < count: per-query-token transfers of a ragged tile."""

    def each(action):
        def body(t, carry):
            for copy in make_copies(t):
                getattr(copy, action)()
            return carry

        lax.fori_loop(0, count, body, 0)

    each("start")
    each("wait")


def _ragged_paged_attention_kernel(layer_ref, q_start_ref, q_len_ref, kv_len_ref, table_ref,
                                   q_hbm, k_hbm, v_hbm, out_hbm, lse_hbm,
                                   q_buf, k_buf, v_buf, out_buf, lse_buf, acc_ref, max_ref, sum_ref,
                                   kv_sems, io_sems, *, group, queries_per_tile, pages_per_block, page_size,
                                   num_pages, kv_splits, blocks_per_split, max_q_len, scale):
    row, kv_head, tile_and_split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    query_tile, split = tile_and_split // kv_splits, tile_and_split % kv_splits
    layer = layer_ref[0]
    block_kv = pages_per_block * page_size
    num_queries = jnp.minimum(q_len_ref[row], max_q_len)
    first_query = query_tile * queries_per_tile
    tile_queries = jnp.clip(num_queries - first_query, 0, queries_per_tile)
    first_token = q_start_ref[row] + first_query
    first_query_pos = kv_len_ref[row] - q_len_ref[row] + first_query               # position of tile query 0

    # Keys this tile sees end after its last live query; the split owns one slice of that range.
    visible_end = jnp.where(tile_queries > 0,
                            jnp.minimum(first_query_pos + tile_queries, num_pages * page_size), 0)
    split_start = split * blocks_per_split * block_kv
    split_end = jnp.minimum(visible_end, split_start + blocks_per_split * block_kv)
    num_blocks = jnp.maximum(0, pl.cdiv(split_end - split_start, block_kv))

    start_block, wait_block = page_dma_block(
        table_ref, row, num_pages, page_size, pages_per_block,
        (k_hbm.at[layer, kv_head], v_hbm.at[layer, kv_head]), (k_buf, v_buf), kv_sems)

    @pl.when(tile_queries > 0)
    def _():
        token_dmas(tile_queries, lambda t: [pltpu.make_async_copy(q_hbm.at[first_token + t, kv_head],
                                                                    q_buf.at[:, t], io_sems.at[0])])
        tile_shape = (group, queries_per_tile)
        query_index = lax.broadcasted_iota(jnp.int32, (*tile_shape, 1), 1)
        live_query = query_index < tile_queries                                      # [G, Tq, 1]
        queries = jnp.where(live_query, q_buf[...], 0).reshape(group * queries_per_tile, -1)
        query_pos = (first_query_pos + query_index).reshape(-1, 1)                   # [M, 1]
        live_row = live_query.reshape(-1, 1)
        init_softmax(acc_ref, max_ref, sum_ref)

        def block_bounds(block):
            first = split_start + block * block_kv
            return first, jnp.minimum(split_end, first + block_kv)

        @pl.when(num_blocks > 0)
        def _():
            start_block(0, *block_bounds(0))

        def body(block, carry):
            slot = block % 2

            @pl.when(block + 1 < num_blocks)
            def _():
                start_block(1 - slot, *block_bounds(block + 1))

            first, end = block_bounds(block)
            wait_block(slot, first, end)
            key_pos = first + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
            loaded = (first + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)) < end
            keys = k_buf[slot]
            values = jnp.where(loaded, v_buf[slot], 0)                               # unloaded rows: stale
            logits = lax.dot_general(queries.astype(keys.dtype), keys, (((1,), (1,)), ((), ())),
                                     precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
            visible = (key_pos <= query_pos) & (key_pos < end) & live_row
            online_softmax_step(jnp.where(visible, logits * scale, -jnp.inf), values, acc_ref, max_ref, sum_ref)
            return carry

        lax.fori_loop(0, num_blocks, body, 0)
        out, lse = finish_softmax(acc_ref, max_ref, sum_ref)
        out_buf[...] = out.reshape(out_buf.shape)
        lse_buf[...] = lse.reshape(lse_buf.shape)
        token_dmas(tile_queries, lambda t: [
            pltpu.make_async_copy(out_buf.at[:, t], out_hbm.at[split, first_token + t, kv_head], io_sems.at[1]),
            pltpu.make_async_copy(lse_buf.at[:, t], lse_hbm.at[split, first_token + t, kv_head], io_sems.at[2])])


def ragged_paged_attention_tpu(q, k_pool, v_pool, layer, q_start, q_len, kv_len, page_tables, *,
                               page_size: int, max_q_len: int, scale: float | None = None,
                               pages_per_block: int | None = None, kv_splits: int | None = None,
                               owned: jax.Array | None = None, interpret=False):
    """Ragged paged attention over the whole pool; returns (out f32[N, Hq, D], lse f32[N, Hq]).

    pages_per_block: pages per double-buffered KV block (None: enough for 128 positions, one lane-dense
    logits tile); kv_splits: KV ranges per (row, head, query tile) merged afterwards (None: only when the
    grid would have fewer than MIN_GRID_STEPS steps). interpret: False on a TPU, True or a
    `pltpu.InterpretParams` to run the TPU interpreter elsewhere.
    owned: `owned_tokens` of the rows, from a caller running many layers over the same rows (None: computed
    here).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = check_queries_against_pool(q, k_pool, v_pool)
    num_rows, num_pages = page_tables.shape
    check_head_dim(head_dim)
    if max_q_len < 1 or page_size < 1:
        raise ValueError(f"max_q_len ({max_q_len}) and page_size ({page_size}) must be >= 1")
    for name, arr in (("q_start", q_start), ("q_len", q_len), ("kv_len", kv_len)):
        if arr.shape != (num_rows,):
            raise ValueError(f"{name} has shape {arr.shape}, expected ({num_rows},) to match page_tables")
    if num_rows == 0:                                   # no launch over an empty grid: nobody owns a token
        return (jnp.zeros((num_tokens, num_q_heads, head_dim), jnp.float32),
                jnp.full((num_tokens, num_q_heads), -jnp.inf, jnp.float32))
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    pages_per_block = pages_per_block or max(1, LANES // page_size)
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block {pages_per_block} must be >= 1")
    queries_per_tile = round_up(min(max_q_len, max(1, MAX_TILE_ROWS // group)), SUBLANES)
    num_query_tiles = -(-max_q_len // queries_per_tile)
    block_kv = pages_per_block * page_size
    num_kv_blocks = -(-(num_pages * page_size) // block_kv)
    if kv_splits is None:
        kv_splits = choose_kv_splits(num_rows * num_kv_heads * num_query_tiles, num_kv_blocks, MIN_GRID_STEPS)
    kv_splits = max(1, min(kv_splits, num_kv_blocks))
    blocks_per_split = -(-num_kv_blocks // kv_splits)

    tile = (group, queries_per_tile)
    kernel = functools.partial(
        _ragged_paged_attention_kernel, group=group, queries_per_tile=queries_per_tile,
        pages_per_block=pages_per_block, page_size=page_size, num_pages=num_pages, kv_splits=kv_splits,
        blocks_per_split=blocks_per_split, max_q_len=max_q_len, scale=scale)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    out_parts, lse_parts = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_rows, num_kv_heads, num_query_tiles * kv_splits),
            in_specs=[hbm, hbm, hbm],
            out_specs=[hbm, hbm],
            scratch_shapes=[
                pltpu.VMEM((*tile, head_dim), q.dtype),
                pltpu.VMEM((2, block_kv, head_dim), k_pool.dtype),
                pltpu.VMEM((2, block_kv, head_dim), v_pool.dtype),
                pltpu.VMEM((*tile, head_dim), jnp.float32),
                pltpu.VMEM((*tile, LANES), jnp.float32),
                pltpu.VMEM((group * queries_per_tile, head_dim), jnp.float32),
                pltpu.VMEM((group * queries_per_tile, LANES), jnp.float32),
                pltpu.VMEM((group * queries_per_tile, LANES), jnp.float32),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.SemaphoreType.DMA((3,)),
            ]),
        out_shape=(jax.ShapeDtypeStruct((kv_splits, num_tokens, num_kv_heads, group, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((kv_splits, num_tokens, num_kv_heads, group, LANES), jnp.float32)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret_params(interpret),
        name="ragged_paged_attention_tpu",
    )(jnp.asarray(layer, jnp.int32).reshape(1), q_start.astype(jnp.int32), q_len.astype(jnp.int32),
      kv_len.astype(jnp.int32), page_tables.astype(jnp.int32).reshape(-1),
      q.reshape(num_tokens, num_kv_heads, group, head_dim), k_pool, v_pool)

    out, lse = merge_kv_splits(out_parts.reshape(kv_splits, num_tokens, num_q_heads, head_dim),
                               lse_parts[..., 0].reshape(kv_splits, num_tokens, num_q_heads))
    # Tokens no row owns were never written: give them the reference's zeros / -inf.
    owned = owned_tokens(q_start, q_len, max_q_len, num_tokens) if owned is None else owned
    return jnp.where(owned[:, None, None], out, 0.0), jnp.where(owned[:, None], lse, -jnp.inf)
