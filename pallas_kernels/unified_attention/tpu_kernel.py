"""Attention of one mixed step in a single Pallas TPU launch (Mosaic lowering): sparse DRAFT rows and ragged
full-attention rows (verify, prefill, dense draft) together.

Same contract as `reference.unified_attention_reference`.

Why this shape on a TPU. A TensorCore runs its grid as a sequential loop, so there are no idle SMs for short
programs to fill (the GPU kernel's reason for one launch). What one launch buys here: one custom call instead
of two (each launch pays its own start and drain) with no copy of the draft and full rows' queries into
separate operands, and, on chips whose two TensorCores share a grid (megacore: v4, v5p), one split of all the
step's work between the cores instead of a separate, separately unbalanced, split per launch.

Work decomposition: one parallel grid axis over a static list of work items.
  * items [0, F) are full-attention tiles (row, query tile, KV split, KV head), as in
    paged_attention.tpu_kernel: all G query heads of a KV head and `queries_per_tile` query tokens of the row
    form one [G * Tq, D] tile (head-major, Tq a multiple of 8 sublanes), so each K/V page read feeds the whole
    GQA group. Queries come in and results go out with one DMA per live query token (rows are ragged).
  * items [F, F + Dd) are draft tiles (draft row, KV split, KV head): the G query heads of the KV head
    ([G, D], one DMA) over that (row, head)'s slot list.
  * each program branches on its item's kind; the scalar unit evaluates the branch, both bodies are emitted
    once. Items are listed with a tile's KV heads adjacent (same row, same KV range: the same cost), and
    grid step p runs item 2p in the first half of the grid and item 2(p - half) + 1 in the second: a megacore
    chip gives each TensorCore a contiguous half of a parallel axis, and so each core gets half of every
    row's work whatever the rows' lengths. The list is static: a grid sized to the live items would need a
    dynamic, hence sequential ("arbitrary"), axis and lose that split, while a dead item (query tile past
    its row's length, split past its context, padding row) costs one grid step and a few SMEM reads.
  * SMEM (scalar prefetch): layer, draft counts, flattened slot lists, q_start / q_len / kv_len, flattened
    page tables.
  * VMEM: one double-buffered pair of K/V blocks [2, block_kv, D] shared by both kinds (block_kv =
    pages_per_block pages for full tiles, as many listed tokens for draft tiles); the full tile's query and
    output staging [G, Tq, D] and softmax state [G * Tq, D | LANES]; the draft tile's query [G, D] and
    softmax state [G, D | LANES], which also stages its results. Running max and sum are broadcast over
    128 lanes.
  * DMA: a full tile copies each live page of a block as one [page_size, D] slab per pool, a draft tile each
    listed token as one [1, D] row per pool; block b+1's copies fly while block b is computed.
  * split-KV: `kv_splits` / `draft_kv_splits` contiguous KV ranges per tile (default: only as many as the
    two TensorCores need to balance), merged by log-sum-exp afterwards in jnp.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention.reference import owned_tokens
from pallas_kernels.paged_attention.tpu_kernel import (
    LANES, MAX_TILE_ROWS, MIN_GRID_STEPS, SUBLANES, check_head_dim, finish_softmax, init_softmax, interpret_params,
    online_softmax_step, page_dma_block, round_up, token_dmas)
from pallas_kernels.paged_attention.triton_kernel import merge_kv_splits
from pallas_kernels.pool_checks import check_queries_against_pool
from pallas_kernels.unified_attention.triton_kernel import balanced_kv_splits


class _Scratch(NamedTuple):
    """The kernel's VMEM buffers and DMA semaphores, in `_scratch_shapes` order."""
    k_blocks: Any              # [2, block_kv, D]
    v_blocks: Any
    full_q: Any                # [G, Tq, D]
    full_out: Any              # [G, Tq, D] f32
    full_lse: Any              # [G, Tq, LANES] f32
    full_state: tuple          # acc [G * Tq, D], max and sum [G * Tq, LANES], f32
    draft_q: Any               # [G, D]
    draft_state: tuple         # acc [G, D], max and sum [G, LANES], f32
    kv_sems: Any               # [2 pools, 2 slots]
    io_sems: Any               # [3]: queries in, outputs out, LSEs out

    @classmethod
    def from_refs(cls, refs):
        (k_blocks, v_blocks, full_q, full_out, full_lse, full_acc, full_max, full_sum, draft_q, draft_acc, draft_max,
         draft_sum, kv_sems, io_sems) = refs
        return cls(k_blocks, v_blocks, full_q, full_out, full_lse, (full_acc, full_max, full_sum), draft_q,
                   (draft_acc, draft_max, draft_sum), kv_sems, io_sems)


def _scratch_shapes(*, group, queries_per_tile, block_kv, head_dim, q_dtype, kv_dtype):
    tile, tile_rows = (group, queries_per_tile), group * queries_per_tile
    return [
        pltpu.VMEM((2, block_kv, head_dim), kv_dtype),
        pltpu.VMEM((2, block_kv, head_dim), kv_dtype),
        pltpu.VMEM((*tile, head_dim), q_dtype),
        pltpu.VMEM((*tile, head_dim), jnp.float32),
        pltpu.VMEM((*tile, LANES), jnp.float32),
        pltpu.VMEM((tile_rows, head_dim), jnp.float32),
        pltpu.VMEM((tile_rows, LANES), jnp.float32),
        pltpu.VMEM((tile_rows, LANES), jnp.float32),
        pltpu.VMEM((group, head_dim), q_dtype),
        pltpu.VMEM((group, head_dim), jnp.float32),
        pltpu.VMEM((group, LANES), jnp.float32),
        pltpu.VMEM((group, LANES), jnp.float32),
        pltpu.SemaphoreType.DMA((2, 2)),
        pltpu.SemaphoreType.DMA((3,)),
    ]


def _digits(index, radices):
    """Mixed-radix digits of index, most significant first, the leading digit unbounded:
    _digits(i, (b, c)) = (i // (b * c), (i // c) % b, i % c)."""
    digits = []
    for radix in reversed(radices):
        digits.append(index % radix)
        index = index // radix
    return (index, *reversed(digits))


def _dealt_item(step, num_items: int):
    """The item grid step `step` runs: even items fill the first half of the grid, odd items the second."""
    half = (num_items + 1) // 2
    return jnp.where(step < half, 2 * step, 2 * (step - half) + 1)


def _stream_kv_blocks(num_blocks, start, wait, compute):
    """compute(block, slot) for each of num_blocks KV blocks held in two VMEM slots; start(block, slot) issues
    a block's DMAs and wait(block, slot) awaits them. Block b+1's DMAs are issued before block b is awaited."""

    @pl.when(num_blocks > 0)
    def _():
        start(0, 0)

    def body(block, carry):
        slot = block % 2

        @pl.when(block + 1 < num_blocks)
        def _():
            start(block + 1, 1 - slot)

        wait(block, slot)
        compute(block, slot)
        return carry

    lax.fori_loop(0, num_blocks, body, 0)


def _attend_kv_block(queries, k_block, v_block, first, end, scale, state, horizon=None):
    """Fold KV entries [first, end), rows [0, end - first) of the [block_kv, D] blocks, into the softmax state
    of queries [M, D]; horizon [M, 1] is the last key position each query row sees (None: every entry)."""
    block_kv = k_block.shape[0]
    key = first + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    loaded = (first + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)) < end
    values = jnp.where(loaded, v_block, 0)                             # rows past end hold stale data
    logits = lax.dot_general(queries.astype(k_block.dtype), k_block, (((1,), (1,)), ((), ())),
                             precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    visible = key < end
    if horizon is not None:
        visible = visible & (key <= horizon)
    online_softmax_step(jnp.where(visible, logits * scale, -jnp.inf), values, *state)


def _slot_dma_block(slot_ref, list_base, hbm_refs, buffers, sems):
    """(start, wait), each called as f(slot, first, end): one DMA per pool of each listed token of entries
    [first, end) of the list at slot_ref[list_base:], a [1, D] row into row (entry - first) of buffers[slot]."""

    def for_entries(action):
        def run(slot, first, end):
            def body(entry, carry):
                pool_slot = slot_ref[list_base + first + entry]
                for index, (hbm, buffer) in enumerate(zip(hbm_refs, buffers)):
                    copy = pltpu.make_async_copy(hbm.at[pl.ds(pool_slot, 1)], buffer.at[slot, pl.ds(entry, 1)],
                                                 sems.at[index, slot])
                    getattr(copy, action)()
                return carry

            lax.fori_loop(0, end - first, body, 0)

        return run

    return for_entries("start"), for_entries("wait")


def _full_tile(item, layer, rows, hbm, scratch: _Scratch, *, num_drafts, num_kv_heads, group, queries_per_tile,
               num_query_tiles, kv_splits, blocks_per_split, pages_per_block, page_size, num_pages, kv_limit,
               max_q_len, scale):
    """One (row, query tile, KV split, KV head): causal attention of the tile's queries over the row's pages."""
    q_start_ref, q_len_ref, kv_len_ref, table_ref = rows
    q_hbm, k_hbm, v_hbm, out_hbm, lse_hbm = hbm
    row, query_tile, split, kv_head = _digits(item, (num_query_tiles, kv_splits, num_kv_heads))
    block_kv = pages_per_block * page_size
    num_queries = jnp.minimum(q_len_ref[row], max_q_len)
    first_query = query_tile * queries_per_tile
    tile_queries = jnp.clip(num_queries - first_query, 0, queries_per_tile)
    first_token = q_start_ref[row] + first_query                       # counted from the first full-row token
    first_query_pos = kv_len_ref[row] - q_len_ref[row] + first_query

    # Keys the tile sees end after its last live query; the split owns one slice of that range.
    visible_end = jnp.where(tile_queries > 0, jnp.minimum(first_query_pos + tile_queries, kv_limit), 0)
    split_start = split * blocks_per_split * block_kv
    split_end = jnp.minimum(visible_end, split_start + blocks_per_split * block_kv)
    num_blocks = jnp.maximum(0, pl.cdiv(split_end - split_start, block_kv))
    start_block, wait_block = page_dma_block(
        table_ref, row, num_pages, page_size, pages_per_block, (k_hbm.at[layer, kv_head], v_hbm.at[layer, kv_head]),
        (scratch.k_blocks, scratch.v_blocks), scratch.kv_sems)

    def block_bounds(block):
        first = split_start + block * block_kv
        return first, jnp.minimum(split_end, first + block_kv)

    @pl.when(tile_queries > 0)
    def _():
        token_dmas(tile_queries, lambda t: [pltpu.make_async_copy(
            q_hbm.at[num_drafts + first_token + t, kv_head], scratch.full_q.at[:, t], scratch.io_sems.at[0])])
        query_index = lax.broadcasted_iota(jnp.int32, (group, queries_per_tile, 1), 1)
        live_query = query_index < tile_queries                                       # [G, Tq, 1]
        queries = jnp.where(live_query, scratch.full_q[...], 0).reshape(group * queries_per_tile, -1)
        horizon = jnp.where(live_query, first_query_pos + query_index, -1).reshape(-1, 1)
        init_softmax(*scratch.full_state)

        def compute(block, slot):
            _attend_kv_block(queries, scratch.k_blocks[slot], scratch.v_blocks[slot], *block_bounds(block), scale,
                             scratch.full_state, horizon)

        _stream_kv_blocks(num_blocks, lambda block, slot: start_block(slot, *block_bounds(block)),
                          lambda block, slot: wait_block(slot, *block_bounds(block)), compute)
        out, lse = finish_softmax(*scratch.full_state)
        scratch.full_out[...] = out.reshape(scratch.full_out.shape)
        scratch.full_lse[...] = lse.reshape(scratch.full_lse.shape)
        token_dmas(tile_queries, lambda t: [
            pltpu.make_async_copy(scratch.full_out.at[:, t], out_hbm.at[split, first_token + t, kv_head],
                                  scratch.io_sems.at[1]),
            pltpu.make_async_copy(scratch.full_lse.at[:, t], lse_hbm.at[split, first_token + t, kv_head],
                                  scratch.io_sems.at[2])])


def _draft_tile(item, layer, drafts, hbm, scratch: _Scratch, *, num_kv_heads, kv_splits, blocks_per_split, block_kv,
                list_len, scale):
    """One (draft row, KV split, KV head): the G query heads over that head's listed slots."""
    count_ref, slot_ref = drafts
    q_hbm, k_hbm, v_hbm, out_hbm, lse_hbm = hbm
    row, split, kv_head = _digits(item, (kv_splits, num_kv_heads))
    split_start = split * blocks_per_split * block_kv
    split_end = jnp.minimum(jnp.minimum(count_ref[row], list_len), split_start + blocks_per_split * block_kv)
    num_blocks = jnp.maximum(0, pl.cdiv(split_end - split_start, block_kv))
    start_block, wait_block = _slot_dma_block(
        slot_ref, (row * num_kv_heads + kv_head) * list_len, (k_hbm.at[layer, kv_head], v_hbm.at[layer, kv_head]),
        (scratch.k_blocks, scratch.v_blocks), scratch.kv_sems)

    def block_bounds(block):
        first = split_start + block * block_kv
        return first, jnp.minimum(split_end, first + block_kv)

    query_copy = pltpu.make_async_copy(q_hbm.at[row, kv_head], scratch.draft_q, scratch.io_sems.at[0])
    query_copy.start()
    query_copy.wait()
    queries = scratch.draft_q[...]                                                    # [G, D]
    init_softmax(*scratch.draft_state)

    def compute(block, slot):
        _attend_kv_block(queries, scratch.k_blocks[slot], scratch.v_blocks[slot], *block_bounds(block), scale,
                         scratch.draft_state)

    _stream_kv_blocks(num_blocks, lambda block, slot: start_block(slot, *block_bounds(block)),
                      lambda block, slot: wait_block(slot, *block_bounds(block)), compute)
    acc_ref, max_ref, _ = scratch.draft_state
    out, lse = finish_softmax(*scratch.draft_state)
    acc_ref[...] = out                                  # the finished state's buffers stage the results
    max_ref[...] = lse
    copies = (pltpu.make_async_copy(acc_ref, out_hbm.at[split, row, kv_head], scratch.io_sems.at[1]),
              pltpu.make_async_copy(max_ref, lse_hbm.at[split, row, kv_head], scratch.io_sems.at[2]))
    for copy in copies:
        copy.start()
    for copy in copies:
        copy.wait()


def _unified_attention_kernel(layer_ref, count_ref, slot_ref, q_start_ref, q_len_ref, kv_len_ref, table_ref,
                              q_hbm, k_hbm, v_hbm, draft_out_hbm, draft_lse_hbm, full_out_hbm, full_lse_hbm,
                              *scratch_refs, num_full_items, num_items, full_tiling, draft_tiling):
    scratch = _Scratch.from_refs(scratch_refs)
    item = _dealt_item(pl.program_id(0), num_items)
    layer = layer_ref[0]
    if num_full_items:
        @pl.when(item < num_full_items)
        def _():
            _full_tile(item, layer, (q_start_ref, q_len_ref, kv_len_ref, table_ref),
                       (q_hbm, k_hbm, v_hbm, full_out_hbm, full_lse_hbm), scratch, **full_tiling)
    if num_items > num_full_items:
        @pl.when(item >= num_full_items)
        def _():
            _draft_tile(item - num_full_items, layer, (count_ref, slot_ref),
                        (q_hbm, k_hbm, v_hbm, draft_out_hbm, draft_lse_hbm), scratch, **draft_tiling)


def _check_inputs(q, k_pool, v_pool, slot_ids, count, q_start, q_len, kv_len, page_tables, *, page_size,
                  max_q_len):
    """Raise ValueError naming the first argument whose shape or value the kernel cannot serve."""
    num_kv_heads = check_queries_against_pool(q, k_pool, v_pool)
    check_head_dim(q.shape[-1])
    if v_pool.dtype != k_pool.dtype:
        raise ValueError(f"v_pool dtype {v_pool.dtype} differs from k_pool dtype {k_pool.dtype}; the K/V blocks "
                         f"share one VMEM layout")
    if slot_ids.ndim != 3 or slot_ids.shape[1] != num_kv_heads or slot_ids.shape[0] > q.shape[0]:
        raise ValueError(f"slot_ids has shape {slot_ids.shape}; expected (draft rows <= {q.shape[0]} tokens, "
                         f"{num_kv_heads}, budget)")
    if count.shape != slot_ids.shape[:1]:
        raise ValueError(f"count has shape {count.shape}; expected ({slot_ids.shape[0]},), one per draft row")
    if page_tables.ndim != 2:
        raise ValueError(f"page_tables has shape {page_tables.shape}; expected (rows, pages)")
    for name, values in (("q_start", q_start), ("q_len", q_len), ("kv_len", kv_len)):
        if values.shape != page_tables.shape[:1]:
            raise ValueError(f"{name} has shape {values.shape}; expected ({page_tables.shape[0]},), one per row of "
                             f"page_tables {page_tables.shape}")
    if max_q_len < 1:
        raise ValueError(f"max_q_len ({max_q_len}) must be >= 1")
    if page_size < 1 or page_size % SUBLANES:
        raise ValueError(f"page_size {page_size} must be a positive multiple of {SUBLANES} sublanes for the TPU "
                         f"kernel (each page is one DMA into a sublane-aligned VMEM block)")


def _nonempty(values):
    """SMEM refs cannot be empty: a flat int32 array, with one zero entry (read by no program) if it has none."""
    values = values.astype(jnp.int32).reshape(-1)
    return values if values.size else jnp.zeros((1,), jnp.int32)


def unified_attention_tpu(q, k_pool, v_pool, layer, slot_ids, count, q_start, q_len, kv_len, page_tables, *,
                          page_size: int, max_q_len: int, scale: float | None = None,
                          pages_per_block: int | None = None, kv_splits: int | None = None,
                          draft_kv_splits: int | None = None, owned: jax.Array | None = None, interpret=False):
    """Draft and full-attention rows of one step in one launch; returns (out f32[N, Hq, D], lse f32[N, Hq]).

    pages_per_block: pages per double-buffered KV block of a full tile, whose size (pages_per_block *
    page_size positions) is also the number of listed tokens per block of a draft tile (None: enough pages for
    128 positions, one lane-dense logits tile); kv_splits / draft_kv_splits: KV ranges per full / draft tile,
    merged afterwards (None: `balanced_kv_splits` towards MIN_GRID_STEPS items). interpret: False on a TPU,
    True or a `pltpu.InterpretParams` to run the TPU interpreter elsewhere.
    owned: `owned_tokens` of the rows, from a caller running many layers over the same rows (None: computed
    here).
    """
    _check_inputs(q, k_pool, v_pool, slot_ids, count, q_start, q_len, kv_len, page_tables, page_size=page_size,
                  max_q_len=max_q_len)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_q_heads // num_kv_heads
    num_drafts, list_len = slot_ids.shape[0], slot_ids.shape[2]
    num_rows, num_pages = page_tables.shape
    num_full_tokens = num_tokens - num_drafts
    if num_tokens == 0 or num_drafts + num_rows == 0:      # no launch over an empty grid: nobody owns a token
        return (jnp.zeros((num_tokens, num_q_heads, head_dim), jnp.float32),
                jnp.full((num_tokens, num_q_heads), -jnp.inf, jnp.float32))
    scale = head_dim ** -0.5 if scale is None else scale
    pages_per_block = pages_per_block or max(1, LANES // page_size)
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block {pages_per_block} must be >= 1")
    block_kv = pages_per_block * page_size
    queries_per_tile = round_up(min(max_q_len, max(1, MAX_TILE_ROWS // group)), SUBLANES)
    num_query_tiles = -(-max_q_len // queries_per_tile)
    full_blocks = max(1, -(-(num_pages * page_size) // block_kv))
    draft_blocks = max(1, -(-list_len // block_kv))
    full_tiles, draft_tiles = num_rows * num_query_tiles * num_kv_heads, num_drafts * num_kv_heads
    auto_full, auto_draft = balanced_kv_splits(full_tiles, full_blocks * block_kv, draft_tiles,
                                               draft_blocks * block_kv, min_chunk=block_kv,
                                               target_programs=MIN_GRID_STEPS)
    full_splits = max(1, min(kv_splits or auto_full, full_blocks))
    draft_splits = max(1, min(draft_kv_splits or auto_draft, draft_blocks))
    num_full_items = full_tiles * full_splits
    num_items = num_full_items + draft_tiles * draft_splits

    full_tiling = dict(num_drafts=num_drafts, num_kv_heads=num_kv_heads, group=group,
                       queries_per_tile=queries_per_tile, num_query_tiles=num_query_tiles, kv_splits=full_splits,
                       blocks_per_split=-(-full_blocks // full_splits), pages_per_block=pages_per_block,
                       page_size=page_size, num_pages=max(1, num_pages), kv_limit=num_pages * page_size,
                       max_q_len=max_q_len, scale=scale)
    draft_tiling = dict(num_kv_heads=num_kv_heads, kv_splits=draft_splits,
                        blocks_per_split=-(-draft_blocks // draft_splits), block_kv=block_kv,
                        list_len=list_len, scale=scale)
    kernel = functools.partial(_unified_attention_kernel, num_full_items=num_full_items, num_items=num_items,
                               full_tiling=full_tiling, draft_tiling=draft_tiling)

    def parts(splits, tokens):
        return (jax.ShapeDtypeStruct((splits, max(1, tokens), num_kv_heads, group, head_dim), jnp.float32),
                jax.ShapeDtypeStruct((splits, max(1, tokens), num_kv_heads, group, LANES), jnp.float32))

    hbm = pl.BlockSpec(memory_space=pl.ANY)
    draft_out, draft_lse, full_out, full_lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=7,
            grid=(num_items,),
            in_specs=[hbm, hbm, hbm],
            out_specs=[hbm, hbm, hbm, hbm],
            scratch_shapes=_scratch_shapes(group=group, queries_per_tile=queries_per_tile, block_kv=block_kv,
                                           head_dim=head_dim, q_dtype=q.dtype, kv_dtype=k_pool.dtype)),
        out_shape=(*parts(draft_splits, num_drafts), *parts(full_splits, num_full_tokens)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret_params(interpret),
        name="unified_attention_tpu",
    )(jnp.asarray(layer, jnp.int32).reshape(1), _nonempty(count), _nonempty(slot_ids),
      _nonempty(q_start), _nonempty(q_len), _nonempty(kv_len), _nonempty(page_tables),
      q.reshape(num_tokens, num_kv_heads, group, head_dim), k_pool, v_pool)

    def merged(out_parts, lse_parts, splits, tokens):
        return merge_kv_splits(out_parts[:, :tokens].reshape(splits, tokens, num_q_heads, head_dim),
                               lse_parts[:, :tokens, ..., 0].reshape(splits, tokens, num_q_heads))

    draft_out, draft_lse = merged(draft_out, draft_lse, draft_splits, num_drafts)
    full_out, full_lse = merged(full_out, full_lse, full_splits, num_full_tokens)
    # Full-row tokens that no row owns were never written: give them the reference's zeros / -inf.
    owned = owned_tokens(q_start, q_len, max_q_len, num_full_tokens) if owned is None else owned
    full_out = jnp.where(owned[:, None, None], full_out, 0.0)
    full_lse = jnp.where(owned[:, None], full_lse, -jnp.inf)
    return jnp.concatenate([draft_out, full_out]), jnp.concatenate([draft_lse, full_lse])
