"""What a decode step must cost at best, and what its attention alone costs, at a measured batch composition.

Decoding is memory-bound: a step cannot be faster than the bytes it must read divided by the device's copy
bandwidth. The bandwidth is measured in the same run (a jitted copy of a large array), the bytes are counted
from the step's composition (rows by kind and the context they read), so "achieved fraction of roofline" needs
no datasheet number. The attention-only timing runs the engine's own attention dispatch at that composition
with random queries, which splits a step's device time into attention and everything else (GEMMs, sampling,
selection).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparsespec_jax.attention import (AttentionMetadata, paged_attention, pillar_scores, score_query_rows,
                                      sparse_attention, unified_attention)
from sparsespec_jax.config import ModelConfig, param_shapes
from sparsespec_jax.spec.config import SpecConfig

POOL_LAYERS = 2          # attention timing alternates over this many pool layers (not the model's full depth)


@dataclasses.dataclass(frozen=True)
class StepComposition:
    """The average step of a timed window: how many rows of each kind and the context they read."""

    draft_rows: float        # one query each over a sparse token set (pillar, streaming)
    verify_rows: float       # rows verifying drafts: verify_tokens queries each over the full context
    verify_tokens: float     # mean queries per verify row
    decode_rows: float       # one query over the full context (vanilla, or a verify without drafts)
    context: float           # mean KV length of the rows

    def __post_init__(self):
        for name in ("draft_rows", "verify_rows", "decode_rows", "context"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"StepComposition.{name}: must be finite and >= 0, got {value!r}")
        if self.verify_rows > 0 and not self.verify_tokens >= 1:
            raise ValueError(f"StepComposition.verify_tokens: verify rows need >= 1 query, got {self.verify_tokens!r}")

    @classmethod
    def of_steps(cls, steps, context: float) -> "StepComposition":
        """Mean composition of decode steps (StepMetrics without prefill rows) at `context` tokens."""
        if not steps:
            raise ValueError("StepComposition.of_steps: no steps to average")
        if any(s.prefill_rows for s in steps):
            raise ValueError("StepComposition.of_steps: prefill steps have no decode composition")
        num_steps = sum(s.decode_steps for s in steps)     # a burst iteration counts as its steps

        def mean(values) -> float:
            return float(sum(values)) / num_steps

        verify_rows = mean(s.verify_rows for s in steps)
        verify_tokens = mean(s.tokens - s.draft_rows - s.decode_rows for s in steps)
        return cls(draft_rows=mean(s.draft_rows for s in steps), verify_rows=verify_rows,
                   verify_tokens=verify_tokens / verify_rows if verify_rows else 0.0,
                   decode_rows=mean(s.decode_rows for s in steps), context=float(context))

    def as_dict(self) -> dict:
        return {name: round(value, 3) for name, value in dataclasses.asdict(self).items()}


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """K and V of one token over all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def draft_tokens_read(context: float, spec: SpecConfig) -> float:
    """Tokens a sparse draft row attends to on average: the budget max(min_budget, ceil(s * L)) capped at L, plus
    the cycle's own appended drafts (draft i of k adds i + 1; (k + 1) / 2 on average)."""
    budget = min(context, max(spec.min_budget, math.ceil(spec.budget_ratio * context)))
    return min(context, budget + (spec.k + 1) / 2)


def weight_bytes(cfg: ModelConfig, itemsize: int) -> dict[str, int]:
    """Bytes of the decoder layers (every step reads them once) and of the output head (read by every logits
    pass). The embedding table is only gathered from, a few rows per step, and is not counted."""
    shapes = param_shapes(cfg)
    layers = sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("layers."))
    layers += math.prod(shapes["final_norm"])
    head = math.prod(shapes["lm_head"] if "lm_head" in shapes else shapes["embed"])
    return {"layers": layers * itemsize, "head": head * itemsize}


def bytes_per_step(cfg: ModelConfig, itemsize: int, composition: StepComposition, spec: SpecConfig) -> dict:
    """Bytes one step must move at `composition`.

    Weights: the decoder layers once, the head once per logits pass (the step computes draft logits and
    verify/decode logits separately, so a step with both kinds of rows reads it twice). KV read: verify and
    decode rows their full context; sparse draft rows their token set (draft_tokens_read); pillar verify rows K
    a second time for the score pass. KV written: one K/V entry per query token."""
    weights = weight_bytes(cfg, itemsize)
    kv_token = kv_bytes_per_token(cfg, itemsize)
    c = composition
    full_rows = c.verify_rows + c.decode_rows
    logits_passes = (c.draft_rows > 0) + (full_rows > 0)
    parts = {
        "weights": weights["layers"] + weights["head"] * logits_passes,
        "kv_full": full_rows * c.context * kv_token,
        "kv_sparse": c.draft_rows * draft_tokens_read(c.context, spec) * kv_token if c.draft_rows else 0.0,
        "kv_scores": c.verify_rows * c.context * kv_token / 2 if spec.method == "pillar" else 0.0,
        "kv_write": (c.draft_rows + c.verify_rows * c.verify_tokens + c.decode_rows) * kv_token,
    }
    parts["total"] = sum(parts.values())
    return {name: float(value) for name, value in parts.items()}


def roofline_ms(num_bytes: float, bandwidth_bytes_per_s: float) -> float:
    """Fastest possible time to move `num_bytes` at the measured bandwidth."""
    if not bandwidth_bytes_per_s > 0:
        raise ValueError(f"bandwidth: must be > 0 bytes/s, got {bandwidth_bytes_per_s!r}")
    return 1e3 * num_bytes / bandwidth_bytes_per_s


def achieved_fraction(num_bytes: float, bandwidth_bytes_per_s: float, step_ms: float) -> float:
    """Roofline time over measured step time: 1.0 means the step ran at copy bandwidth."""
    if not step_ms > 0:
        raise ValueError(f"step_ms: must be > 0, got {step_ms!r}")
    return roofline_ms(num_bytes, bandwidth_bytes_per_s) / step_ms


def copy_bandwidth(num_bytes: int, reps: int = 5) -> dict:
    """Device copy bandwidth: a jitted `x * 2` over a float32 array of `num_bytes` reads and writes it once, so
    bandwidth = 2 * num_bytes / time; the median of `reps` timed calls after a warm-up."""
    if num_bytes < 4 or reps < 1:
        raise ValueError(f"copy_bandwidth: need num_bytes >= 4 and reps >= 1, got {num_bytes}, {reps}")
    source = jnp.ones((num_bytes // 4,), jnp.float32)
    double = jax.jit(lambda x: x * 2)
    double(source).block_until_ready()
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        double(source).block_until_ready()
        seconds.append(time.perf_counter() - started)
    del source
    median = statistics.median(seconds)
    return {"array_bytes": num_bytes // 4 * 4, "reps": reps, "median_s": median,
            "bytes_per_s": 2 * (num_bytes // 4 * 4) / median}


def time_attention(cfg: ModelConfig, dtype, backend: str, composition: StepComposition, spec: SpecConfig,
                   page_size: int = 16, reps: int = 5, seed: int = 0) -> dict:
    """Device ms of one step's attention dispatches alone, at `composition` rounded to whole rows.

    One jitted call runs all `num_layers` per-layer dispatches (lax.scan, a fresh random query per layer) the
    way the engine's step does: the unified launch for sparse draft rows and full-attention rows (or the single
    kind present), plus, for pillar, the score pass over the verify rows. The pool holds every row's context
    (random K/V) in POOL_LAYERS layers that the layers alternate over. Rows are not padded to buckets."""
    c = composition
    drafts, verifies, decodes = round(c.draft_rows), round(c.verify_rows), round(c.decode_rows)
    verify_len = max(1, round(c.verify_tokens)) if verifies else 1
    context = max(1, round(c.context))
    full_rows = verifies + decodes
    if drafts + full_rows == 0:
        raise ValueError("time_attention: the composition has no rows")
    budget = max(1, math.ceil(draft_tokens_read(context, spec)))
    pages_per_row = -(-context // page_size)
    num_pages = (drafts + full_rows) * pages_per_row + 1          # + the reserved padding page
    slots = num_pages * page_size
    q_lens = np.array([verify_len] * verifies + [1] * decodes, np.int32)
    num_tokens = drafts + int(q_lens.sum())
    rng = np.random.default_rng(seed)
    tables = (rng.permutation(num_pages - 1)[:full_rows * pages_per_row] + 1).reshape(full_rows, pages_per_row)
    meta = AttentionMetadata(q_start=jnp.asarray(np.cumsum(q_lens) - q_lens, jnp.int32),
                             q_len=jnp.asarray(q_lens), kv_len=jnp.full((full_rows,), context, jnp.int32),
                             page_tables=jnp.asarray(tables, jnp.int32),
                             write_slots=jnp.zeros((num_tokens - drafts,), jnp.int32),
                             page_size=page_size, max_q_len=int(q_lens.max(initial=1)))
    slot_ids = jnp.asarray(rng.integers(page_size, slots, (drafts, cfg.num_kv_heads, budget)), jnp.int32)
    count = jnp.full((drafts,), budget, jnp.int32)
    # Random K/V/queries generated on the device ("rbg" keys compile in a fraction of threefry's time).
    key = jax.random.key(seed, impl="rbg")
    pool_shape = (min(POOL_LAYERS, cfg.num_layers), cfg.num_kv_heads, slots, cfg.head_dim)
    k_pool = jax.random.normal(jax.random.fold_in(key, 0), pool_shape, dtype)
    v_pool = jax.random.normal(jax.random.fold_in(key, 1), pool_shape, dtype)
    queries = jax.random.normal(jax.random.fold_in(key, 2),
                                (cfg.num_layers, num_tokens, cfg.num_heads, cfg.head_dim), dtype)
    score_pass = spec.method == "pillar" and verifies > 0
    inputs = (k_pool, v_pool, queries, slot_ids, count, meta)
    static = dict(backend=backend, num_drafts=drafts, num_verifies=verifies, score_pass=score_pass)
    jax.block_until_ready(_attention_layers(*inputs, **static))
    jax.block_until_ready(_attention_layers(*inputs, **static))
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        jax.block_until_ready(_attention_layers(*inputs, **static))
        seconds.append(time.perf_counter() - started)
    del k_pool, v_pool, queries, inputs
    return {"ms": 1e3 * statistics.median(seconds), "draft_rows": drafts, "verify_rows": verifies,
            "verify_tokens": verify_len, "decode_rows": decodes, "context": context, "draft_tokens": budget,
            "layers": cfg.num_layers, "score_pass": score_pass, "reps": reps}


@functools.partial(jax.jit, static_argnames=("backend", "num_drafts", "num_verifies", "score_pass"))
def _attention_layers(k_pool, v_pool, queries, slot_ids, count, meta: AttentionMetadata, *, backend: str,
                      num_drafts: int, num_verifies: int, score_pass: bool):
    """Every layer's attention dispatch of one step (queries [layers, N, Hq, D]), layers over the pool's layers."""
    pool_layers = k_pool.shape[0]
    full_rows = meta.q_len.shape[0]
    if score_pass:      # as the engine's step: verify rows' queries kept per layer, all layers scored at the end
        score_tokens, scores_meta = score_query_rows(meta, num_verifies, queries.shape[1] - num_drafts)

    def layer(carry, inputs):
        q, index = inputs
        pool_layer = index % pool_layers
        if not full_rows:
            out, lse = sparse_attention(backend, q, k_pool, v_pool, pool_layer, slot_ids, count)
        elif not num_drafts:
            out, lse = paged_attention(backend, q, k_pool, v_pool, pool_layer, meta)
        else:
            out, lse = unified_attention(backend, q, k_pool, v_pool, pool_layer, slot_ids, count, meta)
        kept = (q[num_drafts:][score_tokens], lse[num_drafts:][score_tokens]) if score_pass else None
        return carry, (out, kept)

    layers = jnp.arange(queries.shape[0], dtype=jnp.int32)
    out, kept = jax.lax.scan(layer, None, (queries, layers))[1]
    if not score_pass:
        return out, None
    return out, pillar_scores(backend, kept[0], k_pool, layers % pool_layers, scores_meta, kept[1])
