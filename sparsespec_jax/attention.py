"""The one attention dispatch layer: every attention call of the engine goes through here.

The reference path is pure jnp and runs anywhere; kernel paths plug in behind the same functions.
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.paged_attention import ragged_paged_attention_reference
from pallas_kernels.pillar_scores import pillar_scores_paged_reference
from pallas_kernels.sparse_attention import sparse_decode_attention_reference

BACKENDS = ("reference",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Where each row's queries sit in the flat token batch and which KV pages it reads.

    Row r owns tokens [q_start[r], q_start[r] + q_len[r]) of the step; kv_len[r] counts its context including
    those tokens. write_slots[n] is the pool slot that token n's K/V is stored at (padding -> the reserved page).
    """

    q_start: jax.Array      # int32 [R]
    q_len: jax.Array        # int32 [R]
    kv_len: jax.Array       # int32 [R]
    page_tables: jax.Array  # int32 [R, P]
    write_slots: jax.Array  # int32 [N]
    page_size: int = dataclasses.field(metadata=dict(static=True))
    max_q_len: int = dataclasses.field(metadata=dict(static=True))


def resolve_backend(name: str) -> str:
    """Map a user choice ("auto" included) to a concrete backend name."""
    if name == "auto":
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: unknown backend {name!r}; choose from {('auto',) + BACKENDS}")
    return name


def paged_attention(backend: str, q, k_pool, v_pool, layer, meta: AttentionMetadata):
    """Full causal attention of every row's queries over its paged context: (out [N, Hq, D], lse [N, Hq])."""
    return ragged_paged_attention_reference(
        q, k_pool, v_pool, layer, meta.q_start, meta.q_len, meta.kv_len, meta.page_tables,
        page_size=meta.page_size, max_q_len=meta.max_q_len)


def sparse_attention(backend: str, q, k_pool, v_pool, layer, slot_ids, count):
    """One query per row attending to its listed token slots: (out [R, Hq, D], lse [R, Hq])."""
    return sparse_decode_attention_reference(q, k_pool, v_pool, layer, slot_ids, count)


def pillar_scores(backend: str, q, k_pool, layer, meta: AttentionMetadata, lse):
    """PillarAttn scores of a verify pass: mean rematerialized probability per (row, KV head, key position),
    from the pass's queries and LSE, re-reading K only: f32 [R, Hkv, P * page_size]."""
    return pillar_scores_paged_reference(q, k_pool, layer, meta.q_start, meta.q_len, meta.kv_len, meta.page_tables,
                                         lse, page_size=meta.page_size, max_q_len=meta.max_q_len)
