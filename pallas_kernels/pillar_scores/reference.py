"""Pure-jnp PillarAttn score rematerialisation: the semantics every score kernel must reproduce.

After a verify pass has produced each query's log-sum-exp, the attention probability a (query, head) pair
gave to key j is exp(scale * q.k_j - lse) exactly, so only K has to be re-read. The score of logical key
position j for (row, KV head) is the mean of that probability over the (query t, head g of the group)
pairs that causally see j (t < q_len, j <= position of t); -inf where no pair sees j (j >= kv_len, or a
row without queries).

Layout (see paged_attention.reference for q, k_pool, layer, q_start, q_len, kv_len, page_tables):
  lse     [N, Hq]   natural-log LSE of each query token and head, as returned by the attention kernels
Returns scores f32[R, Hkv, P * page_size] over logical positions.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.paged_attention.reference import row_logits


def pillar_scores_paged_reference(q, k_pool, layer, q_start, q_len, kv_len, page_tables, lse, *,
                                  page_size: int, max_q_len: int, scale: float | None = None):
    num_kv_heads = k_pool.shape[1]
    group = q.shape[1] // num_kv_heads
    logits, visible, tokens, _, _ = row_logits(q, k_pool, layer, q_start, q_len, kv_len, page_tables,
                                               page_size=page_size, max_q_len=max_q_len, scale=scale)
    query_lse = lse[tokens].astype(jnp.float32).reshape(*tokens.shape, num_kv_heads, group)
    probs = jnp.exp(logits - query_lse.transpose(0, 2, 3, 1)[..., None])
    total = jnp.where(visible[:, None, None], probs, 0.0).sum(axis=(2, 3))            # [R, Hkv, S]
    pairs = group * visible.sum(axis=1)                                                # [R, S]
    return jnp.where(pairs[:, None, :] > 0, total / jnp.maximum(pairs, 1)[:, None, :], -jnp.inf)
