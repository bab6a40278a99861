"""Sparse decode attention as a Pallas TPU kernel (Mosaic lowering): PillarAttn draft rows.

Same contract as `reference.sparse_decode_attention_reference`. Grid (row, KV head, split), all parallel;
the slot lists, counts and layer index are scalar-prefetched into SMEM (the lists are flattened so SMEM
holds them without padding; they are budget-sized, a few hundred entries per (row, KV head)).
The G query heads of a KV head are one [G, D] tile (a regular BlockSpec block, since each (row, KV head)
owns its queries and outputs), so every gathered K/V token feeds all G heads. The list is walked in
blocks of `block_kv` entries: each live entry is one DMA of a [1, D] token row from the HBM pool into a
double-buffered VMEM block, and block b+1's DMAs fly while block b is computed with an online softmax.
Long lists are cut into `kv_splits` ranges whose partial results are merged by log-sum-exp afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention.tpu_kernel import (
    LANES, MIN_GRID_STEPS, check_head_dim, finish_softmax, init_softmax, interpret_params, online_softmax_step)
from pallas_kernels.paged_attention.triton_kernel import choose_kv_splits, merge_kv_splits
from pallas_kernels.pool_checks import check_queries_against_pool

DEFAULT_BLOCK_KV = 128     # one lane-dense logits tile per block


def _sparse_decode_attention_kernel(layer_ref, count_ref, slot_ref, q_ref, k_hbm, v_hbm, out_ref, lse_ref,
                                    k_buf, v_buf, acc_ref, max_ref, sum_ref, sems, *, block_kv, blocks_per_split,
                                    list_len, num_kv_heads, scale):
    row, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    list_base = (row * num_kv_heads + kv_head) * list_len
    split_start = split * blocks_per_split * block_kv
    split_end = jnp.minimum(jnp.minimum(count_ref[row], list_len), split_start + blocks_per_split * block_kv)
    num_blocks = jnp.maximum(0, pl.cdiv(split_end - split_start, block_kv))
    pools = (k_hbm.at[layer, kv_head], v_hbm.at[layer, kv_head])

    def block_dmas(action, block, slot):
        first = split_start + block * block_kv

        def body(entry, carry):
            slot_id = slot_ref[list_base + first + entry]
            for index, (pool, buffer) in enumerate(zip(pools, (k_buf, v_buf))):
                copy = pltpu.make_async_copy(pool.at[pl.ds(slot_id, 1)], buffer.at[slot, pl.ds(entry, 1)],
                                             sems.at[index, slot])
                getattr(copy, action)()
            return carry

        lax.fori_loop(0, jnp.clip(split_end - first, 0, block_kv), body, 0)

    init_softmax(acc_ref, max_ref, sum_ref)
    queries = q_ref[...]                                                              # [G, D]

    @pl.when(num_blocks > 0)
    def _():
        block_dmas("start", 0, 0)

    def body(block, carry):
        slot = block % 2

        @pl.when(block + 1 < num_blocks)
        def _():
            block_dmas("start", block + 1, 1 - slot)

        block_dmas("wait", block, slot)
        entry = split_start + block * block_kv
        live_column = (entry + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)) < split_end
        live_row = (entry + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)) < split_end
        keys = k_buf[slot]
        values = jnp.where(live_row, v_buf[slot], 0)                                  # unloaded rows: stale
        logits = lax.dot_general(queries.astype(keys.dtype), keys, (((1,), (1,)), ((), ())),
                                 precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        online_softmax_step(jnp.where(live_column, logits * scale, -jnp.inf), values, acc_ref, max_ref, sum_ref)
        return carry

    lax.fori_loop(0, num_blocks, body, 0)
    out, lse = finish_softmax(acc_ref, max_ref, sum_ref)
    out_ref[...] = out
    lse_ref[...] = lse


def sparse_decode_attention_tpu(q, k_pool, v_pool, layer, slot_ids, count, *, scale: float | None = None,
                                block_kv: int = DEFAULT_BLOCK_KV, kv_splits: int | None = None, interpret=False):
    """Attention of one query token per row over its listed pool slots; returns (out f32[R, Hq, D], lse f32[R, Hq]).

    block_kv: list entries per double-buffered block; kv_splits: list ranges merged afterwards (None: only
    when the grid would have fewer than MIN_GRID_STEPS steps). interpret: False on a TPU, True or a
    `pltpu.InterpretParams` to run the TPU interpreter elsewhere.
    """
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = check_queries_against_pool(q, k_pool, v_pool)
    check_head_dim(head_dim)
    if slot_ids.ndim != 3 or slot_ids.shape[:2] != (num_rows, num_kv_heads):
        raise ValueError(f"slot_ids has shape {slot_ids.shape}, expected ({num_rows}, {num_kv_heads}, budget)")
    if count.shape != (num_rows,):
        raise ValueError(f"count has shape {count.shape}, expected ({num_rows},)")
    list_len = slot_ids.shape[-1]
    if list_len < 1:
        raise ValueError("slot_ids must list at least one slot per (row, KV head)")
    if block_kv < 1:
        raise ValueError(f"block_kv {block_kv} must be >= 1")
    if num_rows == 0:                                   # no launch over an empty grid
        return jnp.zeros((0, num_q_heads, head_dim), jnp.float32), jnp.zeros((0, num_q_heads), jnp.float32)
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    num_blocks = -(-list_len // block_kv)
    if kv_splits is None:
        kv_splits = choose_kv_splits(num_rows * num_kv_heads, num_blocks, MIN_GRID_STEPS)
    kv_splits = max(1, min(kv_splits, num_blocks))
    blocks_per_split = -(-num_blocks // kv_splits)

    kernel = functools.partial(
        _sparse_decode_attention_kernel, block_kv=block_kv, blocks_per_split=blocks_per_split, list_len=list_len,
        num_kv_heads=num_kv_heads, scale=scale)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    out_parts, lse_parts = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(num_rows, num_kv_heads, kv_splits),
            in_specs=[pl.BlockSpec((None, None, group, head_dim), lambda r, h, s, *_: (r, h, 0, 0)), hbm, hbm],
            out_specs=[pl.BlockSpec((None, None, None, group, head_dim), lambda r, h, s, *_: (s, r, h, 0, 0)),
                       pl.BlockSpec((None, None, None, group, LANES), lambda r, h, s, *_: (s, r, h, 0, 0))],
            scratch_shapes=[
                pltpu.VMEM((2, block_kv, head_dim), k_pool.dtype),
                pltpu.VMEM((2, block_kv, head_dim), v_pool.dtype),
                pltpu.VMEM((group, head_dim), jnp.float32),
                pltpu.VMEM((group, LANES), jnp.float32),
                pltpu.VMEM((group, LANES), jnp.float32),
                pltpu.SemaphoreType.DMA((2, 2)),
            ]),
        out_shape=(jax.ShapeDtypeStruct((kv_splits, num_rows, num_kv_heads, group, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((kv_splits, num_rows, num_kv_heads, group, LANES), jnp.float32)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret_params(interpret),
        name="sparse_decode_attention_tpu",
    )(jnp.asarray(layer, jnp.int32).reshape(1), count.astype(jnp.int32), slot_ids.astype(jnp.int32).reshape(-1),
      q.reshape(num_rows, num_kv_heads, group, head_dim), k_pool, v_pool)
    return merge_kv_splits(out_parts.reshape(kv_splits, num_rows, num_q_heads, head_dim),
                           lse_parts[..., 0].reshape(kv_splits, num_rows, num_q_heads))
