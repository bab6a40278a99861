"""Sparse decode attention as a Pallas GPU kernel (Triton lowering): PillarAttn draft rows.

Same contract as `reference.sparse_decode_attention_reference`. Grid (row, KV head, split): the G query heads
of a KV head form one [M, D] tile, so each gathered K/V slot is loaded once for the whole group. The
slot list is walked in blocks of `block_kv` entries with an online softmax; long lists are cut into
`kv_splits` ranges whose partial results are merged by log-sum-exp afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention.triton_kernel import (
    LOG2_E, MAX_QUERY_ROWS, MIN_DOT_ROWS, choose_kv_splits, finish_softmax, merge_kv_splits, next_power_of_2,
    online_softmax_update, split_range)
from pallas_kernels.pool_checks import check_queries_against_pool

SHORT_LIST_PROGRAMS = 2048  # draft lists are a few blocks long: more, shorter programs overlap their latencies


def _sparse_decode_attention_kernel(layer_ref, count_ref, slot_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, *,
                                    group, tile_rows, block_kv, kv_splits, list_len, stacked_lists, logit_scale2):
    row, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    tile_row = jnp.arange(tile_rows, dtype=jnp.int32)
    head_live = tile_row < group
    head = kv_head * group + jnp.minimum(tile_row, group - 1)
    queries = q_ref[row, head, :]                                                     # [M, D]

    split_start, split_end = split_range(jnp.minimum(count_ref[row], list_len), split, kv_splits, block_kv)
    num_blocks = jnp.maximum(0, pl.cdiv(split_end - split_start, block_kv))

    def body(block, carry):
        entries = split_start + block * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        live = entries < split_end
        entry = jnp.minimum(entries, list_len - 1)
        listed = slot_ref[layer, row, kv_head, entry] if stacked_lists else slot_ref[row, kv_head, entry]
        slots = jnp.where(live, listed, 0)
        keys = k_ref[layer, kv_head, slots, :]                                        # [BK, D]
        values = v_ref[layer, kv_head, slots, :]
        logits2 = jnp.dot(queries, keys.T, precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32) * logit_scale2
        return online_softmax_update(carry, jnp.where(live[None, :], logits2, -jnp.inf), values)

    head_dim = queries.shape[-1]
    init = (jnp.zeros((tile_rows, head_dim), jnp.float32), jnp.full((tile_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((tile_rows,), jnp.float32))
    out, lse = finish_softmax(*lax.fori_loop(0, num_blocks, body, init))

    # Padding rows point past the last head so they alias no live row (interpret mode scatters them too).
    store_head = jnp.where(head_live, head, out_ref.shape[2])
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    plgpu.store(out_ref.at[split, row, store_head[:, None], dims[None, :]], out, mask=head_live[:, None])
    plgpu.store(lse_ref.at[split, row, store_head], lse, mask=head_live)


def sparse_decode_attention(q, k_pool, v_pool, layer, slot_ids, count, *, scale: float | None = None,
                            block_kv: int | None = None, kv_splits: int | None = None, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool = False):
    """Attention of one query token per row over its listed pool slots; returns (out f32[R, Hq, D], lse f32[R, Hq]).
    slot_ids: this layer's lists [R, Hkv, B], or every layer's [L, R, Hkv, B], read at `layer` like the pools.

    block_kv: slots per inner step (power of 2, >= 16); kv_splits: slot-list ranges merged afterwards
    (None picks enough to fill the GPU). The defaults measured fastest on an H200
    (bench/results/kernels_h200.md).
    """
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = check_queries_against_pool(q, k_pool, v_pool)
    if head_dim < MIN_DOT_ROWS or head_dim != next_power_of_2(head_dim):
        raise ValueError(f"head_dim {head_dim} must be a power of 2 >= {MIN_DOT_ROWS} for the Triton kernel")
    stacked_lists = slot_ids.ndim == 4
    lists = slot_ids.shape[1:] if stacked_lists else slot_ids.shape
    if (slot_ids.ndim not in (3, 4) or lists[:2] != (num_rows, num_kv_heads)
            or (stacked_lists and slot_ids.shape[0] != k_pool.shape[0])):
        raise ValueError(f"slot_ids has shape {slot_ids.shape}, expected ([{k_pool.shape[0]} layers,] {num_rows}, "
                         f"{num_kv_heads}, budget)")
    if count.shape != (num_rows,):
        raise ValueError(f"count has shape {count.shape}, expected ({num_rows},)")
    group = num_q_heads // num_kv_heads
    if group > MAX_QUERY_ROWS:
        raise ValueError(f"{group} query heads per KV head exceed the tile limit {MAX_QUERY_ROWS}")
    list_len = slot_ids.shape[-1]
    if list_len < 1:
        raise ValueError("slot_ids must list at least one slot per (row, KV head)")
    scale = head_dim ** -0.5 if scale is None else scale
    block_kv = block_kv or 32
    if block_kv < MIN_DOT_ROWS or block_kv != next_power_of_2(block_kv):
        raise ValueError(f"block_kv {block_kv} must be a power of 2 >= {MIN_DOT_ROWS}")

    tile_rows = max(MIN_DOT_ROWS, next_power_of_2(group))
    num_blocks = -(-list_len // block_kv)
    if kv_splits is None:
        kv_splits = choose_kv_splits(num_rows * num_kv_heads, num_blocks, SHORT_LIST_PROGRAMS)
    kv_splits = max(1, min(kv_splits, num_blocks))

    kernel = functools.partial(
        _sparse_decode_attention_kernel, group=group, tile_rows=tile_rows, block_kv=block_kv, kv_splits=kv_splits,
        list_len=list_len, stacked_lists=stacked_lists, logit_scale2=scale * LOG2_E)
    out_parts, lse_parts = pl.pallas_call(
        kernel,
        grid=(num_rows, num_kv_heads, kv_splits),
        out_shape=(jax.ShapeDtypeStruct((kv_splits, num_rows, num_q_heads, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((kv_splits, num_rows, num_q_heads), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_decode_attention",
    )(jnp.asarray(layer, jnp.int32).reshape(1), count.astype(jnp.int32), slot_ids.astype(jnp.int32), q, k_pool,
      v_pool)
    return merge_kv_splits(out_parts, lse_parts)
