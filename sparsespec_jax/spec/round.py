"""One speculative round on device: k sparse draft steps, one full-attention verify, acceptance, new sets.

Everything between two host visits happens inside one jitted function: draft tokens, draft distributions,
verification, the accept/reject decision and the PillarAttn refresh never leave the device. The host only
reads the emitted tokens afterwards.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparsespec_jax.attention import AttentionMetadata, paged_attention, pillar_scores, sparse_attention
from sparsespec_jax.kv_cache import KVCache
from sparsespec_jax.model import Transformer
from sparsespec_jax.sampling import SamplingArrays
from sparsespec_jax.spec.acceptance import draft_sample, verify_drafts
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.spec.draft_sets import DraftSets, pillar_refresh, streaming_refresh, with_draft_positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoundBatch:
    """Rows of one round. A row's newest token (not yet in the cache) sits at position start[r]."""

    last_token: jax.Array    # int32 [R]
    start: jax.Array         # int32 [R]: = tokens already in the cache
    page_tables: jax.Array   # int32 [R, P]: covers start + k + 1 positions
    slot: jax.Array          # int32 [R]: the row's DraftSets slot (padding rows: the spare slot)
    live: jax.Array          # bool  [R]
    reset: jax.Array         # bool  [R]: newly (re)admitted, no scores yet: draft densely
    num_drafts: jax.Array    # int32 [R]: drafts to verify (fewer near max_tokens / context end)
    proposals: jax.Array     # int32 [R, k]: host-made drafts (ngram); ignored by model-drafting methods
    page_size: int = dataclasses.field(metadata=dict(static=True))


def _slots_of(positions, page_tables, page_size: int):
    """Pool slot of logical positions [R, ...] through each row's page table."""
    rows = jnp.arange(page_tables.shape[0]).reshape((-1,) + (1,) * (positions.ndim - 1))
    return page_tables[rows, positions // page_size] * page_size + positions % page_size


def speculative_round(model: Transformer, kv: KVCache, sets: DraftSets, batch: RoundBatch,
                      sampling: SamplingArrays, spec: SpecConfig, backend: str):
    """Returns (tokens int32[R, k+1], num_emitted int32[R], kv, sets). Emitted tokens are the accepted drafts
    followed by one correction/bonus token; the cache holds K/V for start .. start+num_emitted-1 afterwards."""
    cfg = model.cfg
    k, ps = spec.k, batch.page_size
    rows = batch.last_token.shape[0]
    live = batch.live
    padding_slot = jnp.zeros((), jnp.int32)                              # slot 0 of the reserved page

    if spec.drafts_with_model:
        positions = with_draft_positions(sets.positions[batch.slot], sets.count[batch.slot], batch.start, k)
        slot_lists = _slots_of(positions, batch.page_tables, ps).transpose(1, 0, 2, 3)   # [L, R, Hkv, C]
        base_count = sets.count[batch.slot]
        dense = (sets.dense[batch.slot] | batch.reset) & live

        def draft_step(carry, i):
            kv, token = carry
            pos = batch.start + i
            write = jnp.where(live, _slots_of(pos, batch.page_tables, ps), padding_slot)
            meta = AttentionMetadata(q_start=jnp.arange(rows, dtype=jnp.int32), q_len=live.astype(jnp.int32),
                                     kv_len=pos + 1, page_tables=batch.page_tables, write_slots=write,
                                     page_size=ps, max_q_len=1)
            count = jnp.where(live, base_count + i + 1, 0)

            def attend(q, k_pool, v_pool, layer, slots):
                sparse, _ = sparse_attention(backend, q, k_pool, v_pool, layer, slots, count)

                def with_dense():
                    full, _ = paged_attention(backend, q, k_pool, v_pool, layer, meta)
                    return jnp.where(dense[:, None, None], full, sparse)

                return jax.lax.cond(jnp.any(dense), with_dense, lambda: sparse), None

            hidden, kv, _ = model(token, pos, kv, write, attend, slot_lists)
            draft, log_q = draft_sample(model.logits(hidden), sampling, pos + 1, batch.start + 1)
            return (kv, draft), (draft, log_q)

        (kv, _), (drafts, log_q) = jax.lax.scan(draft_step, (kv, batch.last_token), jnp.arange(k, dtype=jnp.int32))
        drafts, log_q = drafts.T, log_q.transpose(1, 0, 2)                  # [R, k], [R, k, V]
    else:
        drafts, log_q = batch.proposals, None

    # Verify: the newest token and the k drafts, full causal attention, K/V recomputed over the drafts' writes.
    width = k + 1
    tokens = jnp.concatenate([batch.last_token[:, None], drafts], axis=1).reshape(-1)
    offsets = jnp.arange(width, dtype=jnp.int32)
    pos = (batch.start[:, None] + offsets[None, :])
    write = jnp.where(live[:, None], _slots_of(pos, batch.page_tables, ps), padding_slot).reshape(-1)
    q_len = jnp.where(live, width, 0).astype(jnp.int32)
    kv_len = batch.start + width
    meta = AttentionMetadata(q_start=jnp.arange(rows, dtype=jnp.int32) * width, q_len=q_len, kv_len=kv_len,
                             page_tables=batch.page_tables, write_slots=write, page_size=ps, max_q_len=width)
    wants_scores = spec.method == "pillar"

    def attend(q, k_pool, v_pool, layer, _):
        out, lse = paged_attention(backend, q, k_pool, v_pool, layer, meta)
        if not wants_scores:
            return out, None
        return out, pillar_scores(backend, q, k_pool, layer, meta, lse)

    hidden, kv, scores = model(tokens, pos.reshape(-1), kv, write, attend)
    target_logits = model.logits(hidden).reshape(rows, width, -1)
    emitted, num_emitted = verify_drafts(target_logits, drafts, log_q, batch.num_drafts, sampling, batch.start + 1)

    committed = batch.start + num_emitted
    capacity = None if sets is None else sets.capacity
    if spec.method == "pillar":
        new_positions, new_count = pillar_refresh(scores, committed, num_emitted, spec, capacity, backend)
    elif spec.method == "streaming":
        new_positions, new_count = streaming_refresh(committed, spec, cfg.num_layers, cfg.num_kv_heads, capacity)
    else:
        return emitted, num_emitted, kv, sets
    slot = jnp.where(live, batch.slot, sets.count.shape[0] - 1)                       # padding -> spare slot
    sets = DraftSets(positions=sets.positions.at[slot].set(new_positions),
                     count=sets.count.at[slot].set(new_count),
                     dense=sets.dense.at[slot].set(False))
    return emitted, num_emitted, kv, sets
