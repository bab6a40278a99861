"""Pure-jnp ragged paged attention: the semantics every paged-attention kernel must reproduce.

Layout contract (shared with the kernels):
  q            [N, Hq, D]          flat query tokens of the step; row r owns q[q_start[r] : q_start[r] + q_len[r]]
  k_pool/v_pool [L, Hkv, S_pool, D] the whole paged pool of every layer; slot = page * page_size + offset
  layer        int32 scalar        which layer of the pool to read
  q_start, q_len, kv_len  [R]      per row; kv_len counts the row's context *including* its q_len new tokens,
                                   so query i of row r sits at position kv_len - q_len + i and sees keys 0..pos
  page_tables  [R, P]              page ids of each row (entries past the row's length are ignored)
Returns out [N, Hq, D] (zeros for tokens owned by no row) and lse [N, Hq] (natural-log sum of exp of the
scaled logits; -inf for tokens owned by no row), both float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_row_slots(page_tables: jax.Array, page_size: int) -> jax.Array:
    """Flat pool slot of every logical position a row's page table covers: [R, P * page_size]."""
    offsets = jnp.arange(page_size, dtype=page_tables.dtype)
    slots = page_tables[:, :, None] * page_size + offsets
    return slots.reshape(page_tables.shape[0], -1)


def row_query_tokens(q_start: jax.Array, q_len: jax.Array, max_q_len: int):
    """Token index of each (row, query) pair and whether it is real: ([R, T], [R, T])."""
    offsets = jnp.arange(max_q_len, dtype=jnp.int32)
    valid = offsets[None, :] < q_len[:, None]
    tokens = jnp.where(valid, q_start[:, None] + offsets[None, :], 0)
    return tokens, valid


def owned_tokens(q_start: jax.Array, q_len: jax.Array, max_q_len: int, num_tokens: int) -> jax.Array:
    """Whether some row owns each of num_tokens tokens: bool [num_tokens]. The kernels never write tokens no row
    owns and mask them with this after the launch; it depends on the rows alone, so a caller that runs every
    layer over the same rows computes it once and passes it in (XLA does not hoist the scatter out of a loop)."""
    tokens, valid = row_query_tokens(q_start, q_len, max_q_len)
    return jnp.zeros((num_tokens,), bool).at[jnp.where(valid, tokens, num_tokens)].set(True, mode="drop")


def row_logits(q, k_pool, layer, q_start, q_len, kv_len, page_tables, *, page_size: int, max_q_len: int,
               scale: float | None):
    """Scaled q.k of every (row, KV head, group head, query, key position), float32 [R, Hkv, G, T, S], with
    causal visibility [R, T, S], the row-query token indices and validity [R, T], and the pool slots [R, S]."""
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_pool.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    slots = gather_row_slots(page_tables, page_size)                      # [R, S]
    keys = k_pool[layer, :, slots].astype(jnp.float32)                    # [R, S, Hkv, D]
    tokens, valid = row_query_tokens(q_start, q_len, max_q_len)           # [R, T]
    queries = q[tokens].astype(jnp.float32).reshape(*tokens.shape, num_kv_heads, num_q_heads // num_kv_heads,
                                                    head_dim)
    positions = kv_len[:, None] - q_len[:, None] + jnp.arange(max_q_len)[None, :]
    logits = jnp.einsum("rtkgd,rskd->rkgts", queries, keys) * scale
    key_pos = jnp.arange(slots.shape[1])
    visible = (key_pos[None, None, :] <= positions[:, :, None]) & valid[:, :, None]
    return logits, visible, tokens, valid, slots


def ragged_paged_attention_reference(q, k_pool, v_pool, layer, q_start, q_len, kv_len, page_tables, *,
                                     page_size: int, max_q_len: int, scale: float | None = None):
    num_tokens, num_q_heads, head_dim = q.shape
    num_rows = page_tables.shape[0]
    logits, visible, tokens, valid, slots = row_logits(q, k_pool, layer, q_start, q_len, kv_len, page_tables,
                                                       page_size=page_size, max_q_len=max_q_len, scale=scale)
    values = v_pool[layer, :, slots].astype(jnp.float32)                  # [R, S, Hkv, D]
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)                                # [R, Hkv, G, T]
    probs = jnp.where(visible[:, None, None], jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0)[..., None]), 0.0)
    out = jnp.einsum("rkgts,rskd->rtkgd", probs, values).reshape(num_rows, max_q_len, num_q_heads, head_dim)
    lse = lse.transpose(0, 3, 1, 2).reshape(num_rows, max_q_len, num_q_heads)

    target = jnp.where(valid, tokens, num_tokens)                          # invalid -> dropped
    out_flat = jnp.zeros((num_tokens, num_q_heads, head_dim), jnp.float32).at[target].set(out, mode="drop")
    lse_flat = jnp.full((num_tokens, num_q_heads), -jnp.inf, jnp.float32).at[target].set(lse, mode="drop")
    return out_flat, lse_flat
