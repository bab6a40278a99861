"""The one jitted engine step: prompt chunks, sparse and dense draft steps, verifications and plain decodes.

All rows of a step share one pass through the model (one GEMM batch and one attention dispatch), whatever
phase each request is in. Everything between two host visits stays on device: input tokens the host has not
seen come from the slot window, drafts and their distributions go back into it, acceptance runs here, and
verify rows renew their PillarAttn sets from scores rematerialized out of the verify pass itself.
The host reads only the emitted tokens (SlotState.emitted), one step later when it runs ahead asynchronously.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sparsespec_jax.attention import (owned_full_tokens, paged_attention, pillar_scores, score_query_rows,
                                      sparse_attention, unified_attention)
from sparsespec_jax.kv_cache import KVCache
from sparsespec_jax.model import Transformer
from sparsespec_jax.packed_args import PackedLayout, unpack
from sparsespec_jax.sampling import SamplingArrays
from sparsespec_jax.slot_state import SlotState
from sparsespec_jax.spec.acceptance import NO_TOKEN, draft_sample, replay_acceptance, verify_drafts
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.spec.draft_sets import DraftSets, pillar_refresh, streaming_refresh, with_draft_positions
from sparsespec_jax.step_batch import UnifiedBatch


def _pool_slots(positions, page_tables, page_size: int):
    """Pool slot of logical positions [R, ...] through each row's page table."""
    rows = jnp.arange(page_tables.shape[0]).reshape((-1,) + (1,) * (positions.ndim - 1))
    return page_tables[rows, positions // page_size] * page_size + positions % page_size


def _sparse_slot_lists(sets: DraftSets, batch: UnifiedBatch, k: int):
    """Per layer, the pool slots each sparse draft row attends to ([L, Ds, Hkv, C]) and how many are live."""
    sparse = batch.sparse
    base = sets.count[sparse.slot]
    positions = with_draft_positions(sets.positions[sparse.slot], base, sparse.cycle_start, k)
    slots = _pool_slots(positions, sparse.page_tables, batch.meta.page_size).transpose(1, 0, 2, 3)
    return slots, jnp.where(sparse.live, base + sparse.draft_index + 1, 0)


def _attend_fn(batch: UnifiedBatch, slot_lists, count, backend: str, score_tokens):
    """The decoder's attention for this batch. slot_lists: every layer's sparse slot lists, indexed by layer
    in the kernels as the pools are. With score_tokens, each layer also hands back those tokens' queries and
    LSEs, so the step can score every layer in one launch after the last (one layer's verify rows are too
    little work for a launch of their own): packed as one float32 array [T, Hq, D + 1], the LSE last, because
    the layer loop stacks each per-layer output with a launch of its own."""
    num_sparse = batch.sparse.slot.shape[0]
    num_full = batch.meta.q_len.shape[0]
    meta = batch.meta
    owned = owned_full_tokens(meta, batch.tokens.shape[0] - num_sparse) if num_full else None   # once, not per layer

    def attend(q, k_pool, v_pool, layer):
        if num_full == 0:
            return sparse_attention(backend, q, k_pool, v_pool, layer, slot_lists, count)[0], None
        if num_sparse == 0:
            out, lse = paged_attention(backend, q, k_pool, v_pool, layer, meta, owned)
        else:
            out, lse = unified_attention(backend, q, k_pool, v_pool, layer, slot_lists, count, meta, owned)
        if score_tokens is None:
            return out, None
        queries = q[num_sparse:][score_tokens].astype(jnp.float32)
        return out, jnp.concatenate([queries, lse[num_sparse:][score_tokens][..., None]], axis=-1)

    return attend


def _refresh_sets(sets: DraftSets, scores, batch: UnifiedBatch, committed, num_emitted, spec: SpecConfig,
                  num_layers: int, num_kv_heads: int, backend: str) -> DraftSets:
    """New token sets for verify rows from this step's scores (pillar) or lengths (streaming)."""
    if spec.method == "pillar":
        positions, count = pillar_refresh(scores, committed, num_emitted, spec, sets.capacity, backend)
    else:
        positions, count = streaming_refresh(committed, spec, num_layers, num_kv_heads, sets.capacity)
    slot = jnp.where(batch.emits.refresh, batch.emits.slot, sets.count.shape[0] - 1)     # others -> spare
    return DraftSets(positions=sets.positions.at[slot].set(positions), count=sets.count.at[slot].set(count))


@functools.lru_cache(maxsize=16)
def make_step_fn(graphdef, spec: SpecConfig, backend: str):
    """The engine's jitted step: step_fn(params, kv, state, buffer, layout) -> (kv, state), with
    the batch and both rows' sampling arrays packed into `buffer` (packed_args.pack). The model structure, the
    method and the backend are bound here, so no call hashes or flattens them; engines of the same model,
    method and backend share one function and so its compiled shapes."""

    def step_fn(params, kv: KVCache, state: SlotState, buffer: jax.Array, layout: PackedLayout):
        batch, draft_sampling, emit_sampling = unpack(buffer, layout)
        return unified_step(graphdef, params, kv, state, batch, draft_sampling, emit_sampling, spec, backend)

    return jax.jit(step_fn, static_argnames=("layout",), donate_argnames=("kv", "state"))


def unified_step(graphdef, params, kv: KVCache, state: SlotState, batch: UnifiedBatch,
                 draft_sampling: SamplingArrays, emit_sampling: SamplingArrays, spec: SpecConfig, backend: str):
    """Returns (kv, state); traced inside make_step_fn's jit. Shapes (and so compilations) follow the batch's
    buckets."""
    model: Transformer = nnx.merge(graphdef, params)
    cfg = model.cfg
    width = state.window.shape[1]
    window = state.window.reshape(-1)
    tokens = jnp.where(batch.window_index >= 0, window[jnp.maximum(batch.window_index, 0)], batch.tokens)

    num_sparse = batch.sparse.slot.shape[0]
    slot_lists, count = (_sparse_slot_lists(state.sets, batch, width - 1) if num_sparse
                         else (None, None))
    num_emit = batch.emits.slot.shape[0]
    want_scores = spec.method == "pillar" and num_emit > 0 and batch.emits.any_refresh
    score_tokens, score_meta = None, None
    if want_scores:     # each emitting row's first `width` queries; rows that keep their set get no scores
        meta = dataclasses.replace(batch.meta, max_q_len=width)
        score_tokens, score_meta = score_query_rows(meta, num_emit, tokens.shape[0] - num_sparse,
                                                    jnp.where(batch.emits.refresh, meta.q_len[:num_emit], 0))
    attend = _attend_fn(batch, slot_lists, count, backend, score_tokens)
    hidden, kv, score_queries = model(tokens, batch.positions, kv, batch.write_slots, attend)
    scores = None
    if want_scores:
        queries = score_queries[..., :-1].astype(model.dtype)         # [L, Re * width, Hq, D], exactly as computed
        lse = score_queries[..., -1]                                   # [L, Re * width, Hq]
        scores = pillar_scores(backend, queries, kv.k, jnp.arange(cfg.num_layers, dtype=jnp.int32), score_meta, lse)

    window = state.window
    log_q = state.draft_log_q
    drafts = batch.drafts
    if drafts.slot.shape[0]:
        draft, draft_lq = draft_sample(model.logits(hidden[drafts.token]), draft_sampling, drafts.position,
                                       drafts.cycle_start + 1)
        window = window.at[drafts.slot, drafts.draft_index + 1].set(draft)
        log_q = log_q.at[drafts.slot, drafts.draft_index].set(draft_lq)

    emits = batch.emits
    if not num_emit:
        return kv, dataclasses.replace(state, window=window, draft_log_q=log_q)
    index = jnp.minimum(emits.first_token[:, None] + jnp.arange(emits.width)[None, :], tokens.shape[0] - 1)
    target_logits = model.logits(hidden[index])                                          # [Re, emits.width, V]
    row_log_q = None if log_q is None or emits.width == 1 else log_q[emits.slot]
    if spec.replay_acceptance is None:
        emitted, num_emitted = verify_drafts(target_logits, tokens[index[:, 1:]], row_log_q, emits.num_drafts,
                                             emit_sampling, emits.position)
    else:
        emitted, num_emitted = replay_acceptance(target_logits, tokens[index[:, 1:]], emits.num_drafts,
                                                 spec.replay_acceptance, emit_sampling, emits.position)
    emitted = jnp.pad(emitted, ((0, 0), (0, width - emits.width)), constant_values=NO_TOKEN)   # plain rows
    newest = emitted[jnp.arange(num_emit), num_emitted - 1]
    window = window.at[emits.slot, 0].set(newest)
    sets = state.sets
    if sets is not None and emits.any_refresh:
        committed = emits.position + num_emitted - 1        # tokens in the cache after this verify
        sets = _refresh_sets(sets, scores, batch, committed, num_emitted, spec, cfg.num_layers, cfg.num_kv_heads,
                             backend)
    outputs = state.emitted.at[emits.slot].set(jnp.concatenate([num_emitted[:, None], emitted], axis=1))
    return kv, SlotState(window=window, draft_log_q=log_q, sets=sets, emitted=outputs)
