"""The one attention dispatch layer: every attention-shaped call of the engine goes through here.

Backends: "reference" (pure jnp, runs anywhere), "pallas" (the Pallas GPU kernels in pallas_kernels/, Triton
lowering on GPU; interpreted on CPU, which is how CI checks them) and "pallas-tpu" (the Pallas TPU kernels,
Mosaic lowering on a Cloud TPU; run by the TPU interpreter elsewhere). "auto" picks pallas on GPU, pallas-tpu
on TPU, reference elsewhere. All compute the same functions; kernels sit beside their references. Every
function here is per head, so under tensor parallelism (sharding.py) each device runs it on its own heads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from pallas_kernels.paged_attention import (
    ragged_paged_attention, ragged_paged_attention_reference, ragged_paged_attention_tpu)
from pallas_kernels.paged_attention.reference import owned_tokens
from pallas_kernels.pillar_scores import pillar_scores_paged, pillar_scores_paged_reference, pillar_scores_paged_tpu
from pallas_kernels.sparse_attention import (
    sparse_decode_attention, sparse_decode_attention_reference, sparse_decode_attention_tpu)
from pallas_kernels.topk_select import topk_select, topk_select_reference, topk_select_tpu
from pallas_kernels.unified_attention import unified_attention as unified_attention_kernel
from pallas_kernels.unified_attention import unified_attention_reference, unified_attention_tpu
from sparsespec_jax.sharding import TP_AXIS, mesh_of, per_device_heads

BACKENDS = ("reference", "pallas", "pallas-tpu")

# Under tensor parallelism every attention-shaped call runs per device on its own heads (shard_map): Pallas
# kernels are opaque to the partitioner, and the references' head-indexed gathers would make it gather
# operands across devices. Operand layouts: heads on axis 1, pools [L, Hkv, slots, D], the rest whole.
HEADS = P(None, TP_AXIS, None)          # q, out [N, Hq, D]; slot lists [R, Hkv, B]; scores [R, H, S]
HEADS_2D = P(None, TP_AXIS)             # lse [N, Hq]
STACKED_HEADS = P(None, None, TP_AXIS, None)   # per-layer stacks: q [Ls, N, Hq, D]; scores [Ls, R, Hkv, S]
STACKED_HEADS_2D = P(None, None, TP_AXIS)      # lse [Ls, N, Hq]
POOL = P(None, TP_AXIS, None, None)
WHOLE = P()


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


def check_backend_name(name: str) -> None:
    """Reject unknown backend names without starting any device (jax.distributed must come first)."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"attention_backend: unknown backend {name!r}; choose from {('auto',) + BACKENDS}")


def resolve_backend(name: str) -> str:
    """Map a user choice ("auto" included) to a concrete backend name."""
    check_backend_name(name)
    if name == "auto":
        return {"gpu": "pallas", "tpu": "pallas-tpu"}.get(jax.default_backend(), "reference")
    return name


def _interpret(backend: str = "pallas"):
    """Pallas kernels are interpreted where there is no device of their kind to lower them for: GPU kernels
    by the generic interpreter, TPU kernels by the TPU interpreter (it simulates VMEM, SMEM and DMAs)."""
    if backend == "pallas-tpu":
        return False if jax.default_backend() == "tpu" else pltpu.InterpretParams()
    return jax.default_backend() != "gpu"


def _kernel(backend: str, gpu, tpu, reference, **static):
    """The backend's implementation of one dispatch function, with its static arguments bound."""
    if backend == "pallas":
        return functools.partial(gpu, **static, interpret=_interpret())
    if backend == "pallas-tpu":
        return functools.partial(tpu, **static, interpret=_interpret(backend))
    return functools.partial(reference, **static)


def owned_full_tokens(meta: AttentionMetadata, num_tokens: int) -> jax.Array:
    """Which of num_tokens full-row tokens some row of meta owns (bool [num_tokens]). The kernels mask the
    others after each launch; a step computes this once for all its layers and passes it to every call."""
    return owned_tokens(meta.q_start, meta.q_len, meta.max_q_len, num_tokens)


def _with_owned(backend: str, kernel, args: tuple, in_specs: tuple, owned):
    """Hand the kernels the step's precomputed owned-token mask as their last argument (shard_map passes
    arrays positionally); the references write those tokens' zeros themselves and take none."""
    if owned is None or backend == "reference":
        return kernel, args, in_specs
    return (lambda *arrays: kernel(*arrays[:-1], owned=arrays[-1])), args + (owned,), in_specs + (WHOLE,)


def paged_attention(backend: str, q, k_pool, v_pool, layer, meta: AttentionMetadata, owned=None):
    """Full causal attention of every row's queries over its paged context: (out [N, Hq, D], lse [N, Hq]).
    owned: owned_full_tokens(meta, N) when the caller computed it once for many layers."""
    args = (q, k_pool, v_pool, layer, meta.q_start, meta.q_len, meta.kv_len, meta.page_tables)
    kernel = _kernel(backend, ragged_paged_attention, ragged_paged_attention_tpu, ragged_paged_attention_reference,
                     page_size=meta.page_size, max_q_len=meta.max_q_len)
    kernel, args, in_specs = _with_owned(backend, kernel, args, (HEADS, POOL, POOL) + (WHOLE,) * 5, owned)
    return per_device_heads(kernel, mesh_of(k_pool), in_specs, (HEADS, HEADS_2D))(*args)


def _layer_lists(backend: str, kernel, slot_index: int):
    """The kernel, taking slot lists stacked over layers ([L, R, Hkv, B]) as argument slot_index: the GPU
    kernels index them by layer themselves, as they index the pools (so a layer loop takes no per-layer slice,
    which costs a copy kernel per layer on a GPU); the others get this layer's lists."""
    if backend == "pallas":
        return kernel

    def per_layer(*args, **kwargs):
        args = list(args)
        args[slot_index] = args[slot_index][args[3]]               # args[3]: the layer
        return kernel(*args, **kwargs)
    return per_layer


def _list_spec(slot_ids) -> P:
    return STACKED_HEADS if slot_ids.ndim == 4 else HEADS


def sparse_attention(backend: str, q, k_pool, v_pool, layer, slot_ids, count):
    """One query per row attending to its listed token slots: (out [R, Hq, D], lse [R, Hq]). slot_ids: this
    layer's lists [R, Hkv, B], or every layer's [L, R, Hkv, B] (indexed by `layer`, like the pools)."""
    kernel = _kernel(backend, sparse_decode_attention, sparse_decode_attention_tpu, sparse_decode_attention_reference)
    if slot_ids.ndim == 4:
        kernel = _layer_lists(backend, kernel, 4)
    return per_device_heads(kernel, mesh_of(k_pool), (HEADS, POOL, POOL, WHOLE, _list_spec(slot_ids), WHOLE),
                            (HEADS, HEADS_2D))(q, k_pool, v_pool, layer, slot_ids, count)


def pillar_scores(backend: str, q, k_pool, layers, meta: AttentionMetadata, lse):
    """PillarAttn scores of verify passes: mean rematerialized probability per (layer, row, KV head, key
    position), from each pass's queries q [Ls, N, Hq, D] and LSE [Ls, N, Hq] over pool layers[i], re-reading K
    only: f32 [Ls, R, Hkv, P * page_size]. One call scores a whole step's layers."""
    args = (q, k_pool, layers, meta.q_start, meta.q_len, meta.kv_len, meta.page_tables, lse)
    kernel = _kernel(backend, pillar_scores_paged, pillar_scores_paged_tpu, pillar_scores_paged_reference,
                     page_size=meta.page_size, max_q_len=meta.max_q_len)
    return per_device_heads(kernel, mesh_of(k_pool), (STACKED_HEADS, POOL) + (WHOLE,) * 5 + (STACKED_HEADS_2D,),
                            STACKED_HEADS)(*args)


def score_query_rows(meta: AttentionMetadata, num_rows: int, num_tokens: int, q_len=None):
    """The first num_rows rows of meta as pillar_scores wants them, compacted: (token indices [num_rows *
    meta.max_q_len] into the num_tokens tokens meta describes, each row's first max_q_len queries; and metadata
    finding row r's queries at r * max_q_len of the gathered tokens). q_len overrides the rows' query counts
    (0: no scores for that row)."""
    width = meta.max_q_len
    tokens = meta.q_start[:num_rows, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
    scored = AttentionMetadata(q_start=jnp.arange(num_rows, dtype=jnp.int32) * width,
                               q_len=meta.q_len[:num_rows] if q_len is None else q_len,
                               kv_len=meta.kv_len[:num_rows], page_tables=meta.page_tables[:num_rows],
                               write_slots=meta.write_slots, page_size=meta.page_size, max_q_len=width)
    return jnp.minimum(tokens, num_tokens - 1).reshape(-1), scored


def top_k_positions(backend: str, scores, k, max_k: int):
    """The k[r] best positions of every (row, head) of scores [R, H, S], ascending, ties to the lower position:
    (indices int32 [R, H, max_k], count int32 [R]). Under tensor parallelism the head axis is split into
    contiguous per-device blocks, like the KV-head axis (callers keep each device's heads together)."""
    kernel = _kernel(backend, topk_select, topk_select_tpu, topk_select_reference, max_k=max_k)
    return per_device_heads(kernel, mesh_of(scores), (HEADS, WHOLE), (HEADS, WHOLE))(scores, k)


def unified_attention(backend: str, q, k_pool, v_pool, layer, slot_ids, count, meta: AttentionMetadata,
                      owned=None):
    """One step's attention for a mixed batch: the first count.shape[0] query tokens are sparse DRAFT rows
    (one token each, attending to their listed slots), the remaining tokens belong to the ragged full-attention
    rows of `meta` (verify, prefill and dense draft rows; meta.q_start counts from the first of them).
    slot_ids: the draft rows' lists for this layer [Dr, Hkv, B], or every layer's [L, Dr, Hkv, B] (indexed by
    `layer`, like the pools). owned: owned_full_tokens(meta, full-row tokens) when the caller computed it once
    for many layers. Returns (out [N, Hq, D], lse [N, Hq])."""
    args = (q, k_pool, v_pool, layer, slot_ids, count, meta.q_start, meta.q_len, meta.kv_len, meta.page_tables)
    kernel = _kernel(backend, unified_attention_kernel, unified_attention_tpu, unified_attention_reference,
                     page_size=meta.page_size, max_q_len=meta.max_q_len)   # either kernel: one launch for both kinds
    if slot_ids.ndim == 4:
        kernel = _layer_lists(backend, kernel, 4)
    kernel, args, in_specs = _with_owned(backend, kernel, args,
                                         (HEADS, POOL, POOL, WHOLE, _list_spec(slot_ids)) + (WHOLE,) * 5, owned)
    return per_device_heads(kernel, mesh_of(k_pool), in_specs, (HEADS, HEADS_2D))(*args)
