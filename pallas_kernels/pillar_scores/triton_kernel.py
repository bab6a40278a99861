"""PillarAttn score rematerialisation as a Pallas GPU kernel (Triton lowering).

Same contract as `reference.pillar_scores_paged_reference`. Grid (stacked layer x row, KV head, key split):
a step scores all its layers in one launch, since one layer's verify rows alone are too little work to fill
a GPU (a SmolLM2 layer with 22 verify rows at 7680 tokens re-reads 25 MB of K). Each program walks its range
of logical key positions in blocks of `block_kv`, gathers only K through the page table, and sums
exp2(log2e * (scale * q.k - lse)) over the row's (query, head) pairs, tile by tile of at most `MAX_QUERY_ROWS`
pairs, so any (k+1) * G is handled. When one tile holds every pair it is loaded once per program. Positions
nobody sees are written as -inf in a second, load-free loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention.triton_kernel import (
    LOG2_E, MAX_QUERY_ROWS, MIN_DOT_ROWS, choose_kv_splits, gather_page_slots, next_power_of_2)
from pallas_kernels.pillar_scores.reference import check_score_stack
from pallas_kernels.pool_checks import check_queries_against_pool

SCORE_PROGRAMS = 1024       # measured on an H200: two splits per (row, KV head) at batch 64 beat one


def _pillar_scores_kernel(layers_ref, q_start_ref, q_len_ref, kv_len_ref, table_ref, q_ref, lse_ref, k_ref, out_ref,
                          *, group, tile_rows, num_query_tiles, block_kv, blocks_per_split, page_size, num_pages,
                          max_q_len, logit_scale2):
    num_rows = table_ref.shape[0]
    stacked, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    entry, row = stacked // num_rows, stacked % num_rows
    layer = layers_ref[entry]
    q_start = q_start_ref[row]
    num_queries = jnp.minimum(q_len_ref[row], max_q_len)
    first_query_pos = kv_len_ref[row] - q_len_ref[row]                                # position of query 0
    num_keys = num_pages * page_size

    split_start = split * blocks_per_split * block_kv
    split_stop = jnp.minimum(split_start + blocks_per_split * block_kv, num_keys)
    visible_end = jnp.where(num_queries > 0, jnp.minimum(first_query_pos + num_queries, num_keys), 0)
    compute_end = jnp.clip(visible_end, split_start, split_stop)

    def query_tile(tile):
        """Queries, log2 LSEs, positions and liveness of pairs tile*M .. tile*M + M - 1 (pair = t * G + g)."""
        pair = tile * tile_rows + jnp.arange(tile_rows, dtype=jnp.int32)
        query = pair // group
        live = query < num_queries
        token = jnp.where(live, q_start + query, 0)
        head = kv_head * group + pair % group
        return q_ref[entry, token, head, :], lse_ref[entry, token, head] * LOG2_E, first_query_pos + query, live

    def tile_probability_sum(positions, keys, tile):
        # Keys are the rows of the product so the sum over (query, head) pairs stays within each warp.
        queries, lse2, query_pos, live = tile
        logits2 = jnp.dot(keys, queries.T, precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32) * logit_scale2 - lse2[None, :]
        visible = live[None, :] & (positions[:, None] <= query_pos[None, :])
        return jnp.where(visible, jnp.exp2(logits2), 0.0).sum(axis=1)

    resident_tile = query_tile(0) if num_query_tiles == 1 else None
    num_live_tiles = pl.cdiv(num_queries * group, tile_rows)

    def store(positions, scores):
        # Lanes past the split point past the last position so they alias nothing (interpret mode writes them).
        inside = positions < split_stop
        plgpu.store(out_ref.at[entry, row, kv_head, jnp.where(inside, positions, num_keys)], scores, mask=inside)

    def score_block(block, carry):
        positions = split_start + block * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        slots = gather_page_slots(table_ref, row, positions, compute_end, page_size=page_size, num_pages=num_pages)
        keys = k_ref[layer, kv_head, slots, :]                                        # [BK, D]
        if resident_tile is not None:
            total = tile_probability_sum(positions, keys, resident_tile)
        else:
            total = lax.fori_loop(
                0, num_live_tiles,
                lambda tile, acc: acc + tile_probability_sum(positions, keys, query_tile(tile)),
                jnp.zeros((block_kv,), jnp.float32))
        seen_by = jnp.clip(num_queries - jnp.maximum(0, positions - first_query_pos), 0, num_queries)
        pairs = (group * seen_by).astype(jnp.float32)
        store(positions, jnp.where((positions < compute_end) & (pairs > 0), total / jnp.maximum(pairs, 1.0),
                                   -jnp.inf))
        return carry

    def unseen_block(block, carry):
        positions = split_start + block * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        store(positions, jnp.full((block_kv,), -jnp.inf, jnp.float32))
        return carry

    num_score_blocks = pl.cdiv(compute_end - split_start, block_kv)
    lax.fori_loop(0, num_score_blocks, score_block, jnp.int32(0))
    lax.fori_loop(num_score_blocks, pl.cdiv(split_stop - split_start, block_kv), unseen_block, jnp.int32(0))


def pillar_scores_paged(q, k_pool, layers, q_start, q_len, kv_len, page_tables, lse, *, page_size: int,
                        max_q_len: int, scale: float | None = None, block_kv: int | None = None,
                        kv_splits: int | None = None, num_warps: int = 4, num_stages: int = 2,
                        interpret: bool = False):
    """Mean attention probability of every logical key position per (stacked layer, row, KV head):
    f32[Ls, R, Hkv, P * page_size]."""
    check_score_stack(q, layers, lse)
    num_stacked, _, num_q_heads, head_dim = q.shape
    num_kv_heads = check_queries_against_pool(q, k_pool)
    num_rows, num_pages = page_tables.shape
    if head_dim < MIN_DOT_ROWS or head_dim != next_power_of_2(head_dim):
        raise ValueError(f"head_dim {head_dim} must be a power of 2 >= {MIN_DOT_ROWS} for the Triton kernel")
    if max_q_len < 1 or page_size < 1:
        raise ValueError(f"max_q_len ({max_q_len}) and page_size ({page_size}) must be >= 1")
    for name, arr in (("q_start", q_start), ("q_len", q_len), ("kv_len", kv_len)):
        if arr.shape != (num_rows,):
            raise ValueError(f"{name} has shape {arr.shape}, expected ({num_rows},) to match page_tables")
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    block_kv = block_kv or (64 if head_dim >= 128 else 128)
    if block_kv < MIN_DOT_ROWS or block_kv != next_power_of_2(block_kv):
        raise ValueError(f"block_kv {block_kv} must be a power of 2 >= {MIN_DOT_ROWS}")

    pairs_per_row = max_q_len * group
    tile_rows = max(MIN_DOT_ROWS, min(MAX_QUERY_ROWS, next_power_of_2(pairs_per_row)))
    num_query_tiles = -(-pairs_per_row // tile_rows)
    num_keys = num_pages * page_size
    num_blocks = -(-num_keys // block_kv)
    if kv_splits is None:
        kv_splits = choose_kv_splits(num_stacked * num_rows * num_kv_heads, num_blocks, SCORE_PROGRAMS)
    kv_splits = max(1, min(kv_splits, num_blocks))
    blocks_per_split = -(-num_blocks // kv_splits)

    kernel = functools.partial(
        _pillar_scores_kernel, group=group, tile_rows=tile_rows, num_query_tiles=num_query_tiles,
        block_kv=block_kv, blocks_per_split=blocks_per_split, page_size=page_size, num_pages=num_pages,
        max_q_len=max_q_len, logit_scale2=scale * LOG2_E)
    return pl.pallas_call(
        kernel,
        grid=(num_stacked * num_rows, num_kv_heads, kv_splits),
        out_shape=jax.ShapeDtypeStruct((num_stacked, num_rows, num_kv_heads, num_keys), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="pillar_scores_paged",
    )(jnp.asarray(layers, jnp.int32), q_start.astype(jnp.int32), q_len.astype(jnp.int32),
      kv_len.astype(jnp.int32), page_tables.astype(jnp.int32), q, lse.astype(jnp.float32), k_pool)
