"""Pure-jnp attention of one mixed step: sparse DRAFT rows first, then ragged full-attention rows.

Layout contract (shared with the kernel):
  q                   [N, Hq, D]          flat query tokens; the first Dr = slot_ids.shape[0] are draft rows
                                          (one token each), the rest belong to the full-attention rows
  k_pool/v_pool       [L, Hkv, S_pool, D] the paged pool of every layer (see paged_attention.reference)
  layer               int32 scalar
  slot_ids, count     [Dr, Hkv, B], [Dr]  the draft rows' slot lists (see sparse_attention.reference)
  q_start, q_len, kv_len, page_tables     the full-attention rows (see paged_attention.reference); q_start
                                          counts from token Dr, the first token after the draft rows
Returns out [N, Hq, D] and lse [N, Hq] in float32: draft tokens get sparse attention over their slots, full
tokens causal attention over their pages, tokens owned by no row zeros and -inf.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.sparse_attention.reference import sparse_decode_attention_reference


def unified_attention_reference(q, k_pool, v_pool, layer, slot_ids, count, q_start, q_len, kv_len, page_tables, *,
                                page_size: int, max_q_len: int, scale: float | None = None):
    num_drafts = slot_ids.shape[0]
    draft_out, draft_lse = sparse_decode_attention_reference(q[:num_drafts], k_pool, v_pool, layer, slot_ids, count,
                                                             scale=scale)
    if page_tables.shape[0]:
        full_out, full_lse = ragged_paged_attention_reference(q[num_drafts:], k_pool, v_pool, layer, q_start, q_len,
                                                              kv_len, page_tables, page_size=page_size,
                                                              max_q_len=max_q_len, scale=scale)
    else:                                   # no full-attention rows: their tokens are owned by nobody
        full_out = jnp.zeros(q[num_drafts:].shape, jnp.float32)
        full_lse = jnp.full(q[num_drafts:].shape[:2], -jnp.inf, jnp.float32)
    return jnp.concatenate([draft_out, full_out]), jnp.concatenate([draft_lse, full_lse])
