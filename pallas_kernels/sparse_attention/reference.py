"""Pure-jnp sparse decode attention over per-(row, KV head) token-slot lists (PillarAttn draft rows).

  q             [R, Hq, D]          one query token per row
  k_pool/v_pool [L, Hkv, S_pool, D] the whole paged pool (see paged_attention.reference)
  layer         int32 scalar
  slot_ids      [R, Hkv, B]         flat pool slots each (row, KV head) attends to; entries >= count are ignored
  count         [R]                 how many leading entries of slot_ids are live for the row (same for all heads)
Returns out [R, Hq, D] and lse [R, Hq] in float32; rows with count 0 give zeros and -inf.
The query's own K/V must already be in the pool and listed in slot_ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sparse_decode_attention_reference(q, k_pool, v_pool, layer, slot_ids, count, *, scale: float | None = None):
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    heads = jnp.arange(num_kv_heads)[None, :, None]
    keys = k_pool[layer, heads, slot_ids].astype(jnp.float32)            # [R, Hkv, B, D]
    values = v_pool[layer, heads, slot_ids].astype(jnp.float32)
    queries = q.astype(jnp.float32).reshape(num_rows, num_kv_heads, group, head_dim)
    logits = jnp.einsum("rkgd,rkbd->rkgb", queries, keys) * scale
    live = jnp.arange(slot_ids.shape[-1])[None, :] < count[:, None]       # [R, B]
    logits = jnp.where(live[:, None, None, :], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)                               # [R, Hkv, G]
    probs = jnp.where(live[:, None, None, :], jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0)[..., None]), 0.0)
    out = jnp.einsum("rkgb,rkbd->rkgd", probs, values)
    return out.reshape(num_rows, num_q_heads, head_dim), lse.reshape(num_rows, num_q_heads)
