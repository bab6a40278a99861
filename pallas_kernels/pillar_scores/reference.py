"""Pure-jnp PillarAttn score rematerialisation: the semantics every score kernel must reproduce.

After a verify pass has produced each query's log-sum-exp, the attention probability a (query, head) pair
gave to key j is exp(scale * q.k_j - lse) exactly, so only K has to be re-read. The score of logical key
position j for (row, KV head) is the mean of that probability over the (query t, head g of the group)
pairs that causally see j (t < q_len, j <= position of t); -inf where no pair sees j (j >= kv_len, or a
row without queries).

Scores are computed for a stack of layers at once (a step scores every layer after its last one, in one
launch): entry i of the stack holds the queries and LSEs of pool layer layers[i].

Layout (see paged_attention.reference for k_pool, q_start, q_len, kv_len, page_tables):
  q       [Ls, N, Hq, D]  the queries of each stacked layer
  layers  int32 [Ls]      the pool layer each stack entry reads
  lse     [Ls, N, Hq]     natural-log LSE of each query token and head, as returned by the attention kernels
Returns scores f32[Ls, R, Hkv, P * page_size] over logical positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention.reference import row_logits


def check_score_stack(q, layers, lse) -> None:
    """Shape checks shared by every implementation: q [Ls, N, Hq, D], layers [Ls], lse [Ls, N, Hq]."""
    if q.ndim != 4:
        raise ValueError(f"q must be [layers, tokens, heads, head_dim], got shape {q.shape}")
    if jnp.shape(layers) != q.shape[:1]:
        raise ValueError(f"layers has shape {jnp.shape(layers)}, expected ({q.shape[0]},) to match q")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse has shape {lse.shape}, expected {q.shape[:3]} to match q")


def pillar_scores_paged_reference(q, k_pool, layers, q_start, q_len, kv_len, page_tables, lse, *,
                                  page_size: int, max_q_len: int, scale: float | None = None):
    check_score_stack(q, layers, lse)
    num_kv_heads = k_pool.shape[1]
    group = q.shape[2] // num_kv_heads

    def one_layer(layer_q, layer, layer_lse):
        logits, visible, tokens, _, _ = row_logits(layer_q, k_pool, layer, q_start, q_len, kv_len, page_tables,
                                                   page_size=page_size, max_q_len=max_q_len, scale=scale)
        query_lse = layer_lse[tokens].astype(jnp.float32).reshape(*tokens.shape, num_kv_heads, group)
        probs = jnp.exp(logits - query_lse.transpose(0, 2, 3, 1)[..., None])
        total = jnp.where(visible[:, None, None], probs, 0.0).sum(axis=(2, 3))        # [R, Hkv, S]
        pairs = group * visible.sum(axis=1)                                            # [R, S]
        return jnp.where(pairs[:, None, :] > 0, total / jnp.maximum(pairs, 1)[:, None, :], -jnp.inf)

    # One layer at a time: vmapped, the stack's logits are materialized at once (3x slower on a CPU).
    return jax.lax.scan(lambda _, args: (None, one_layer(*args)), None, (q, jnp.asarray(layers, jnp.int32), lse))[1]
