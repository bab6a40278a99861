"""Ragged paged attention as a Pallas GPU kernel (Triton lowering).

Same contract as `reference.ragged_paged_attention_reference`; one launch serves decode rows (1 query),
verify rows (k+1 causal queries) and prefill chunks.

Work decomposition:
  * grid (row, KV head, query tile x KV split). All G query heads of a KV head and several of the row's
    query tokens form one [M, D] query tile (row m is token m // G, head m % G), so every K/V block that
    is gathered from the pool feeds M query rows at once: GQA shares each page load.
  * the row's logical KV positions are cut into `kv_splits` contiguous ranges (flash-decoding) so short
    batches still fill the GPU, equal shares of the row's own length (`split_range`); each split runs an
    online softmax over blocks of `block_kv` positions, translating positions to pool slots through the page
    table (an ordinary input ref on GPU).
  * a small jnp epilogue merges the splits by their log-sum-exp.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention.reference import owned_tokens
from pallas_kernels.pool_checks import check_queries_against_pool

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
MIN_DOT_ROWS = 16          # smallest M (and K-block) the Triton matrix instructions accept
MAX_QUERY_ROWS = 128       # query rows (tokens x heads) per tile
WIDE_TILE_ROWS = 64        # from this many query rows a tile is compute-heavy enough to prefer short KV steps
STREAMING_PROGRAMS = 512   # long KV walks: ~4 programs per SM of an H100/H200 hide the page-gather latency


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def choose_kv_splits(programs_without_split: int, num_kv_blocks: int,
                     target_programs: int = STREAMING_PROGRAMS) -> int:
    """Split the KV range only as much as needed to reach target_programs programs (splits cost a merge)."""
    wanted = -(-target_programs // max(1, programs_without_split))
    return max(1, min(wanted, num_kv_blocks))


def split_range(end, split, kv_splits: int, block_kv: int):
    """Positions [start, stop) that split `split` of kv_splits walks of [0, end): equal shares in whole blocks,
    sized from `end` (the row's own length) rather than the bucketed page table, whose padding would otherwise
    leave most rows' last splits empty and their first ones with all the work. stop <= start: nothing."""
    per_split = pl.cdiv(pl.cdiv(end, block_kv), kv_splits) * block_kv
    start = split * per_split
    return start, jnp.minimum(end, start + per_split)


def gather_page_slots(table_ref, row, positions, limit, *, page_size: int, num_pages: int):
    """Pool slot of each logical position of `row`; positions >= limit map to slot 0..page_size-1 of page 0.

    Page-table entries past the row's length may hold anything, so they are never used as addresses.
    """
    live = positions < limit
    page_index = jnp.minimum(lax.div(positions, page_size), num_pages - 1)
    pages = jnp.where(live, table_ref[row, page_index], 0)
    return pages * page_size + lax.rem(positions, page_size)


def online_softmax_update(carry, logits2, values):
    """One flash-attention step in base 2: logits2 are log2-scaled logits, -inf where masked."""
    acc, running_max, running_sum = carry
    new_max = jnp.maximum(running_max, logits2.max(axis=1))
    safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    correction = jnp.exp2(running_max - safe_max)
    probs = jnp.exp2(logits2 - safe_max[:, None])
    running_sum = running_sum * correction + probs.sum(axis=1)
    acc = acc * correction[:, None] + jnp.dot(probs.astype(values.dtype), values,
                                              precision=lax.Precision.HIGHEST,
                                              preferred_element_type=jnp.float32)
    return acc, new_max, running_sum


def finish_softmax(acc, running_max, running_sum):
    """Normalised output and natural-log LSE; rows that saw no key give zeros and -inf."""
    seen = running_sum > 0
    out = acc / jnp.where(seen, running_sum, 1.0)[:, None]
    lse = jnp.where(seen, (running_max + jnp.log2(jnp.where(seen, running_sum, 1.0))) * LN_2, -jnp.inf)
    return out, lse


def merge_kv_splits(out_parts, lse_parts):
    """Combine per-split normalised outputs [S, ..., D] and LSEs [S, ...] into one softmax."""
    if out_parts.shape[0] == 1:
        return out_parts[0], lse_parts[0]
    lse = jax.nn.logsumexp(lse_parts, axis=0)
    weights = jnp.exp(lse_parts - jnp.where(jnp.isfinite(lse), lse, 0.0)[None])
    weights = jnp.where(jnp.isfinite(lse_parts), weights, 0.0)
    return jnp.einsum("s...,s...d->...d", weights, out_parts), lse


def _ragged_paged_attention_kernel(layer_ref, q_start_ref, q_len_ref, kv_len_ref, table_ref, q_ref, k_ref, v_ref,
                                   out_ref, lse_ref, *, group, queries_per_tile, tile_rows, block_kv, kv_splits,
                                   page_size, num_pages, max_q_len, logit_scale2):
    row, kv_head, tile_and_split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    query_tile, split = tile_and_split // kv_splits, tile_and_split % kv_splits
    layer = layer_ref[0]
    num_queries = jnp.minimum(q_len_ref[row], max_q_len)
    first_query_pos = kv_len_ref[row] - q_len_ref[row]                              # position of query 0
    first_query = query_tile * queries_per_tile

    tile_row = jnp.arange(tile_rows, dtype=jnp.int32)
    query = first_query + tile_row // group
    query_live = (tile_row < queries_per_tile * group) & (query < num_queries)
    token = jnp.where(query_live, q_start_ref[row] + query, 0)
    head = kv_head * group + tile_row % group
    queries = q_ref[token, head, :]                                                   # [M, D]
    query_pos = first_query_pos + query                                               # causal horizon per tile row

    # Keys this tile can see end at the last live query's position; the split owns a share of that range.
    tile_has_queries = first_query < num_queries
    visible_end = first_query_pos + jnp.minimum(first_query + queries_per_tile, num_queries)
    visible_end = jnp.where(tile_has_queries, jnp.minimum(visible_end, num_pages * page_size), 0)
    split_start, split_end = split_range(visible_end, split, kv_splits, block_kv)
    num_blocks = jnp.maximum(0, pl.cdiv(split_end - split_start, block_kv))

    def body(block, carry):
        positions = split_start + block * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        slots = gather_page_slots(table_ref, row, positions, split_end, page_size=page_size, num_pages=num_pages)
        keys = k_ref[layer, kv_head, slots, :]                                        # [BK, D]
        values = v_ref[layer, kv_head, slots, :]
        logits2 = jnp.dot(queries, keys.T, precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32) * logit_scale2
        visible = ((positions[None, :] <= query_pos[:, None]) & (positions[None, :] < split_end)
                   & query_live[:, None])
        return online_softmax_update(carry, jnp.where(visible, logits2, -jnp.inf), values)

    head_dim = queries.shape[-1]
    init = (jnp.zeros((tile_rows, head_dim), jnp.float32), jnp.full((tile_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((tile_rows,), jnp.float32))
    out, lse = finish_softmax(*lax.fori_loop(0, num_blocks, body, init))

    # Masked-off rows point past the last token so they alias no live row (interpret mode scatters them too).
    store_token = jnp.where(query_live, token, out_ref.shape[1])
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    plgpu.store(out_ref.at[split, store_token[:, None], head[:, None], dims[None, :]], out, mask=query_live[:, None])
    plgpu.store(lse_ref.at[split, store_token, head], lse, mask=query_live)


def ragged_paged_attention(q, k_pool, v_pool, layer, q_start, q_len, kv_len, page_tables, *,
                           page_size: int, max_q_len: int, scale: float | None = None,
                           block_kv: int | None = None, kv_splits: int | None = None,
                           num_warps: int = 4, num_stages: int | None = None, owned: jax.Array | None = None,
                           interpret: bool = False):
    """Ragged paged attention over the whole pool; returns (out f32[N, Hq, D], lse f32[N, Hq]).

    block_kv: KV positions per inner step (power of 2, >= 16); kv_splits: KV ranges per (row, head, tile)
    merged afterwards; num_stages: software-pipeline depth of the K/V loads. None picks what measured
    fastest on an H200 (bench/results/kernels_h200.md): short steps with deep pipelines for wide query
    tiles (verify, prefill), longer steps for decode tiles, and splits only when rows are too few.
    owned: `owned_tokens` of the rows, from a caller running many layers over the same rows (None: computed
    here).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = check_queries_against_pool(q, k_pool, v_pool)
    num_rows, num_pages = page_tables.shape
    if head_dim < MIN_DOT_ROWS or head_dim != next_power_of_2(head_dim):
        raise ValueError(f"head_dim {head_dim} must be a power of 2 >= {MIN_DOT_ROWS} for the Triton kernel")
    if max_q_len < 1 or page_size < 1:
        raise ValueError(f"max_q_len ({max_q_len}) and page_size ({page_size}) must be >= 1")
    for name, arr in (("q_start", q_start), ("q_len", q_len), ("kv_len", kv_len)):
        if arr.shape != (num_rows,):
            raise ValueError(f"{name} has shape {arr.shape}, expected ({num_rows},) to match page_tables")
    group = num_q_heads // num_kv_heads
    if group > MAX_QUERY_ROWS:
        raise ValueError(f"{group} query heads per KV head exceed the tile limit {MAX_QUERY_ROWS}")
    scale = head_dim ** -0.5 if scale is None else scale
    queries_per_tile = max(1, min(max_q_len, MAX_QUERY_ROWS // group))
    tile_rows = max(MIN_DOT_ROWS, next_power_of_2(queries_per_tile * group))
    wide_tile = tile_rows >= WIDE_TILE_ROWS
    block_kv = block_kv or (32 if wide_tile else 64)
    num_stages = num_stages or (4 if wide_tile else 3)
    if block_kv < MIN_DOT_ROWS or block_kv != next_power_of_2(block_kv):
        raise ValueError(f"block_kv {block_kv} must be a power of 2 >= {MIN_DOT_ROWS}")
    num_query_tiles = -(-max_q_len // queries_per_tile)
    num_kv_blocks = -(-(num_pages * page_size) // block_kv)
    if kv_splits is None:
        kv_splits = choose_kv_splits(num_rows * num_kv_heads * num_query_tiles, num_kv_blocks)
    kv_splits = max(1, min(kv_splits, num_kv_blocks))

    kernel = functools.partial(
        _ragged_paged_attention_kernel, group=group, queries_per_tile=queries_per_tile, tile_rows=tile_rows,
        block_kv=block_kv, kv_splits=kv_splits, page_size=page_size,
        num_pages=num_pages, max_q_len=max_q_len, logit_scale2=scale * LOG2_E)
    out_parts, lse_parts = pl.pallas_call(
        kernel,
        grid=(num_rows, num_kv_heads, num_query_tiles * kv_splits),
        out_shape=(jax.ShapeDtypeStruct((kv_splits, num_tokens, num_q_heads, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((kv_splits, num_tokens, num_q_heads), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(jnp.asarray(layer, jnp.int32).reshape(1), q_start.astype(jnp.int32), q_len.astype(jnp.int32),
      kv_len.astype(jnp.int32), page_tables.astype(jnp.int32), q, k_pool, v_pool)

    out, lse = merge_kv_splits(out_parts, lse_parts)
    # Tokens no row owns were never written: give them the reference's zeros / -inf.
    owned = owned_tokens(q_start, q_len, max_q_len, num_tokens) if owned is None else owned
    out = jnp.where(owned[:, None, None], out, 0.0)
    lse = jnp.where(owned[:, None], lse, -jnp.inf)
    return out, lse
