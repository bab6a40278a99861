"""Attention of one mixed step in a single Pallas GPU launch (Triton lowering): sparse DRAFT rows and ragged
full-attention rows (verify, prefill, dense draft) together.

Same contract as `reference.unified_attention_reference`. Why one launch: a step of the unified scheduler holds
~B·k/(k+1) draft rows with short slot lists and ~B/(k+1) verify rows with long page walks. Two launches each
end in a tail that leaves SMs idle and each pays its own launch; in one launch the short draft programs fill
the SMs around the long full-attention programs.

Work decomposition: one flat program axis.
  * programs [0, F) are full-attention tiles, ordered (row, KV head, KV split, query tile). As in
    paged_attention, a tile holds all G query heads of a KV head for several query tokens of the row, so each
    K/V block gathered through the page table feeds the whole GQA group.
  * programs [F, F + Dp) are draft tiles, ordered (draft row, KV head, KV split): the G query heads of a KV
    head over that (row, head)'s slot list, as in sparse_attention.
  The long full-attention programs come first so the GPU starts them first and the short draft programs fill
  in behind (measured faster than drafts first). KV splits of both kinds are sized to walk about the same number of KV positions, so programs take
  similar time; a small jnp epilogue merges the splits by log-sum-exp, as for the other kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention.reference import owned_tokens
from pallas_kernels.paged_attention.triton_kernel import (
    LOG2_E, MAX_QUERY_ROWS, MIN_DOT_ROWS, STREAMING_PROGRAMS, WIDE_TILE_ROWS, finish_softmax, gather_page_slots,
    merge_kv_splits, next_power_of_2, online_softmax_update, split_range)

DRAFT_BLOCK_KV = 32


def balanced_kv_splits(full_tiles: int, full_positions: int, draft_tiles: int, draft_positions: int, *,
                       min_chunk: int, target_programs: int = STREAMING_PROGRAMS) -> tuple[int, int]:
    """KV splits (full, draft) such that every program walks about the same number of KV positions and the
    launch holds about target_programs programs.

    A draft tile walks a short slot list, a full tile a whole context: without splits a few long full programs
    would finish alone after every draft program is done. Splits cost a merge, so chunks never get shorter
    than needed to reach target_programs (nor than min_chunk, one KV block).
    """
    total_positions = full_tiles * full_positions + draft_tiles * draft_positions
    chunk = max(min_chunk, -(-total_positions // target_programs))
    return max(1, -(-full_positions // chunk)), max(1, -(-draft_positions // chunk))


def _attend(queries, num_blocks, load_block, logit_scale2):
    """Online softmax of a [M, D] query tile over num_blocks KV blocks; load_block(block) gives
    (keys [BK, D], values [BK, D], visible [M or 1, BK]). Returns (out [M, D], lse [M])."""

    def body(block, carry):
        keys, values, visible = load_block(block)
        logits2 = jnp.dot(queries, keys.T, precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32) * logit_scale2
        return online_softmax_update(carry, jnp.where(visible, logits2, -jnp.inf), values)

    tile_rows, head_dim = queries.shape
    init = (jnp.zeros((tile_rows, head_dim), jnp.float32), jnp.full((tile_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((tile_rows,), jnp.float32))
    return finish_softmax(*lax.fori_loop(0, num_blocks, body, init))


def _store_tile(out_ref, lse_ref, split, token, head, live, out, lse):
    """Write a tile's live rows to parts [splits, tokens, Hq, (D)]; dead rows are aimed past the last token so
    they alias no live element (interpret mode scatters masked rows too)."""
    token = jnp.where(live, token, out_ref.shape[1])
    dims = jnp.arange(out.shape[1], dtype=jnp.int32)
    plgpu.store(out_ref.at[split, token[:, None], head[:, None], dims[None, :]], out, mask=live[:, None])
    plgpu.store(lse_ref.at[split, token, head], lse, mask=live)


def _full_row_tile(program, layer, refs, *, num_drafts, num_kv_heads, group, queries_per_tile, tile_rows,
                   num_query_tiles, kv_splits, block_kv, page_size, num_pages, max_q_len, logit_scale2):
    """One (row, KV head, KV split, query tile) of the full-attention rows: causal over the row's pages."""
    q_start_ref, q_len_ref, kv_len_ref, table_ref, q_ref, k_ref, v_ref, out_ref, lse_ref = refs
    query_tile = program % num_query_tiles
    split = (program // num_query_tiles) % kv_splits
    kv_head = (program // (num_query_tiles * kv_splits)) % num_kv_heads
    row = program // (num_query_tiles * kv_splits * num_kv_heads)

    row_queries = jnp.minimum(q_len_ref[row], max_q_len)
    row_first_position = kv_len_ref[row] - q_len_ref[row]          # position of the row's first query
    tile_first_query = query_tile * queries_per_tile
    tile_row = jnp.arange(tile_rows, dtype=jnp.int32)
    query = tile_first_query + tile_row // group
    live = (tile_row < queries_per_tile * group) & (query < row_queries)
    token = q_start_ref[row] + query                               # counted from the first full-row token
    head = kv_head * group + tile_row % group
    queries = q_ref[jnp.where(live, num_drafts + token, 0), head, :]
    horizon = row_first_position + query                           # last key position each tile row sees

    # The tile sees keys up to its last live query; this split owns a share of that range.
    tile_last_query = jnp.minimum(tile_first_query + queries_per_tile, row_queries)
    tile_end = jnp.where(tile_first_query < row_queries,
                         jnp.minimum(row_first_position + tile_last_query, num_pages * page_size), 0)
    chunk_start, chunk_end = split_range(tile_end, split, kv_splits, block_kv)

    def load_block(block):
        positions = chunk_start + block * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        slots = gather_page_slots(table_ref, row, positions, chunk_end, page_size=page_size, num_pages=num_pages)
        visible = (positions[None, :] <= horizon[:, None]) & (positions[None, :] < chunk_end) & live[:, None]
        return k_ref[layer, kv_head, slots, :], v_ref[layer, kv_head, slots, :], visible

    num_blocks = jnp.maximum(0, pl.cdiv(chunk_end - chunk_start, block_kv))
    out, lse = _attend(queries, num_blocks, load_block, logit_scale2)
    _store_tile(out_ref, lse_ref, split, token, head, live, out, lse)


def _draft_row_tile(program, layer, refs, *, num_kv_heads, group, tile_rows, kv_splits, block_kv, list_len,
                    max_count, stacked_lists, logit_scale2):
    """One (draft row, KV head, KV split): the group's query heads over that head's listed slots (in the
    layer's lists when every layer's are stacked)."""
    count_ref, slot_ref, q_ref, k_ref, v_ref, out_ref, lse_ref = refs
    split = program % kv_splits
    kv_head = (program // kv_splits) % num_kv_heads
    row = program // (kv_splits * num_kv_heads)

    tile_row = jnp.arange(tile_rows, dtype=jnp.int32)
    live = tile_row < group
    head = kv_head * group + jnp.minimum(tile_row, group - 1)
    queries = q_ref[row, head, :]                                  # draft tokens lead the step's tokens
    chunk_start, chunk_end = split_range(jnp.minimum(count_ref[row], max_count), split, kv_splits, block_kv)

    def load_block(block):
        entries = chunk_start + block * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        listed = entries < chunk_end
        entry = jnp.minimum(entries, list_len - 1)
        listed_slots = slot_ref[layer, row, kv_head, entry] if stacked_lists else slot_ref[row, kv_head, entry]
        slots = jnp.where(listed, listed_slots, 0)
        return k_ref[layer, kv_head, slots, :], v_ref[layer, kv_head, slots, :], listed[None, :]

    num_blocks = jnp.maximum(0, pl.cdiv(chunk_end - chunk_start, block_kv))
    out, lse = _attend(queries, num_blocks, load_block, logit_scale2)
    _store_tile(out_ref, lse_ref, split, jnp.full((tile_rows,), row, jnp.int32), head, live, out, lse)


def _unified_attention_kernel(layer_ref, count_ref, slot_ref, q_start_ref, q_len_ref, kv_len_ref, table_ref, q_ref,
                              k_ref, v_ref, draft_out_ref, draft_lse_ref, full_out_ref, full_lse_ref, *,
                              num_full_programs, full_tiling, draft_tiling):
    program = pl.program_id(0)
    layer = layer_ref[0]
    full_refs = (q_start_ref, q_len_ref, kv_len_ref, table_ref, q_ref, k_ref, v_ref, full_out_ref, full_lse_ref)
    draft_refs = (count_ref, slot_ref, q_ref, k_ref, v_ref, draft_out_ref, draft_lse_ref)
    lax.cond(program < num_full_programs,
             lambda: _full_row_tile(program, layer, full_refs, **full_tiling),
             lambda: _draft_row_tile(program - num_full_programs, layer, draft_refs, **draft_tiling))


def _check_inputs(q, k_pool, v_pool, slot_ids, count, rows, *, page_size, max_q_len):
    """Raise ValueError naming the first argument whose shape or value the kernel cannot serve."""
    num_tokens, num_q_heads, head_dim = q.shape
    if k_pool.ndim != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be [layers, kv_heads, slots, head_dim]; got {k_pool.shape} "
                         f"and {v_pool.shape}")
    num_kv_heads, pool_head_dim = k_pool.shape[1], k_pool.shape[3]
    if pool_head_dim != head_dim or head_dim < MIN_DOT_ROWS or head_dim != next_power_of_2(head_dim):
        raise ValueError(f"head_dim of q ({head_dim}) and of the pool ({pool_head_dim}) must be one power of 2 "
                         f">= {MIN_DOT_ROWS}")
    if num_q_heads % num_kv_heads or num_q_heads // num_kv_heads > MAX_QUERY_ROWS:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of the pool's KV heads ({num_kv_heads}), "
                         f"at most {MAX_QUERY_ROWS} per KV head")
    lists = slot_ids.shape[1:] if slot_ids.ndim == 4 else slot_ids.shape
    if (slot_ids.ndim not in (3, 4) or lists[1] != num_kv_heads or lists[0] > num_tokens
            or (slot_ids.ndim == 4 and slot_ids.shape[0] != k_pool.shape[0])):
        raise ValueError(f"slot_ids has shape {slot_ids.shape}; expected ([{k_pool.shape[0]} layers,] draft rows "
                         f"<= {num_tokens} tokens, {num_kv_heads}, budget)")
    if count.shape != lists[:1]:
        raise ValueError(f"count has shape {count.shape}; expected ({lists[0]},), one per draft row")
    page_tables = rows[-1]
    for name, values in zip(("q_start", "q_len", "kv_len"), rows[:3]):
        if page_tables.ndim != 2 or values.shape != page_tables.shape[:1]:
            raise ValueError(f"{name} has shape {values.shape}; expected ({page_tables.shape[0]},), one per row of "
                             f"page_tables {page_tables.shape}")
    if page_size < 1 or max_q_len < 1:
        raise ValueError(f"page_size ({page_size}) and max_q_len ({max_q_len}) must be >= 1")


def _nonempty(array, axis):
    """Pallas refs cannot be empty: give an empty axis one zero entry, which no program reads."""
    axis %= array.ndim
    if array.shape[axis]:
        return array
    return jnp.zeros(array.shape[:axis] + (1,) + array.shape[axis + 1:], array.dtype)


def unified_attention(q, k_pool, v_pool, layer, slot_ids, count, q_start, q_len, kv_len, page_tables, *,
                      page_size: int, max_q_len: int, scale: float | None = None, block_kv: int | None = None,
                      draft_block_kv: int = DRAFT_BLOCK_KV, kv_splits: int | None = None,
                      draft_kv_splits: int | None = None, target_programs: int = STREAMING_PROGRAMS,
                      num_warps: int = 4, num_stages: int = 3, owned: jax.Array | None = None,
                      interpret: bool = False):
    """Draft and full-attention rows of one step in one launch; returns (out f32[N, Hq, D], lse f32[N, Hq]).
    slot_ids: the draft rows' lists of this layer [Dr, Hkv, B], or of every layer [L, Dr, Hkv, B], read at
    `layer` like the pools (a layer loop then takes no per-layer slice of them).

    block_kv / draft_block_kv: KV positions / listed slots per inner step (powers of 2, >= 16); kv_splits /
    draft_kv_splits: KV ranges per full / draft tile, merged afterwards (None: `balanced_kv_splits` towards
    target_programs); num_stages: software-pipeline depth of the K/V loads. block_kv defaults to the ragged
    paged kernel's choice for the full rows' tile shape and target_programs to its program count; with
    num_stages 3 they measured fastest for mixed k = 8 steps on an H200 (bench/kernels.py, section "mixed").
    owned: `owned_tokens` of the rows, from a caller running many layers over the same rows (None: computed
    here).
    """
    _check_inputs(q, k_pool, v_pool, slot_ids, count, (q_start, q_len, kv_len, page_tables), page_size=page_size,
                  max_q_len=max_q_len)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_q_heads // num_kv_heads
    stacked_lists = slot_ids.ndim == 4
    num_drafts, list_len = slot_ids.shape[-3], slot_ids.shape[-1]
    num_rows, num_pages = page_tables.shape[0], max(1, page_tables.shape[1])
    num_full_tokens = num_tokens - num_drafts
    queries_per_tile = max(1, min(max_q_len, MAX_QUERY_ROWS // group))
    full_tile_rows = max(MIN_DOT_ROWS, next_power_of_2(queries_per_tile * group))
    block_kv = block_kv or (32 if full_tile_rows >= WIDE_TILE_ROWS else 64)
    for name, size in (("block_kv", block_kv), ("draft_block_kv", draft_block_kv)):
        if size < MIN_DOT_ROWS or size != next_power_of_2(size):
            raise ValueError(f"{name} {size} must be a power of 2 >= {MIN_DOT_ROWS}")
    scale = head_dim ** -0.5 if scale is None else scale

    num_query_tiles = -(-max_q_len // queries_per_tile)
    full_blocks = -(-(num_pages * page_size) // block_kv)
    draft_blocks = max(1, -(-list_len // draft_block_kv))
    full_tiles, draft_tiles = num_rows * num_kv_heads * num_query_tiles, num_drafts * num_kv_heads
    auto_full, auto_draft = balanced_kv_splits(full_tiles, full_blocks * block_kv, draft_tiles,
                                               draft_blocks * draft_block_kv, min_chunk=max(block_kv, draft_block_kv),
                                               target_programs=target_programs)
    full_splits = max(1, min(kv_splits or auto_full, full_blocks))
    draft_splits = max(1, min(draft_kv_splits or auto_draft, draft_blocks))
    full_tiling = dict(num_drafts=num_drafts, num_kv_heads=num_kv_heads, group=group,
                       queries_per_tile=queries_per_tile, tile_rows=full_tile_rows, num_query_tiles=num_query_tiles,
                       kv_splits=full_splits, block_kv=block_kv,
                       page_size=page_size, num_pages=num_pages, max_q_len=max_q_len, logit_scale2=scale * LOG2_E)
    draft_tiling = dict(num_kv_heads=num_kv_heads, group=group, tile_rows=max(MIN_DOT_ROWS, next_power_of_2(group)),
                        kv_splits=draft_splits, block_kv=draft_block_kv, list_len=max(1, list_len), max_count=list_len,
                        stacked_lists=stacked_lists, logit_scale2=scale * LOG2_E)
    num_full_programs = full_tiles * full_splits
    num_programs = num_full_programs + draft_tiles * draft_splits

    def parts(splits, tokens):
        return (jax.ShapeDtypeStruct((splits, max(1, tokens), num_q_heads, head_dim), jnp.float32),
                jax.ShapeDtypeStruct((splits, max(1, tokens), num_q_heads), jnp.float32))

    # Counts are clamped to the list in the kernel: a clamp here would be one more launch per layer.
    row_inputs = [_nonempty(x.astype(jnp.int32), 0) for x in (count, q_start, q_len, kv_len)]
    kernel = functools.partial(_unified_attention_kernel, num_full_programs=num_full_programs,
                               full_tiling=full_tiling, draft_tiling=draft_tiling)
    draft_out, draft_lse, full_out, full_lse = pl.pallas_call(
        kernel,
        # An empty step still runs one program: it lands on the padding draft row, whose result is dropped.
        grid=(max(1, num_programs),),
        out_shape=(*parts(draft_splits, num_drafts), *parts(full_splits, num_full_tokens)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="unified_attention",
    )(jnp.asarray(layer, jnp.int32).reshape(1), row_inputs[0],
      _nonempty(_nonempty(slot_ids.astype(jnp.int32), -1), -3), *row_inputs[1:],
      _nonempty(_nonempty(page_tables.astype(jnp.int32), 1), 0), _nonempty(q, 0), k_pool, v_pool)

    draft_out, draft_lse = merge_kv_splits(draft_out[:, :num_drafts], draft_lse[:, :num_drafts])
    full_out, full_lse = merge_kv_splits(full_out[:, :num_full_tokens], full_lse[:, :num_full_tokens])
    # Full-row tokens that no row owns were never written: give them the reference's zeros / -inf.
    owned = owned_tokens(q_start, q_len, max_q_len, num_full_tokens) if owned is None else owned
    full_out = jnp.where(owned[:, None, None], full_out, 0.0)
    full_lse = jnp.where(owned[:, None], full_lse, -jnp.inf)
    return jnp.concatenate([draft_out, full_out]), jnp.concatenate([draft_lse, full_lse])
