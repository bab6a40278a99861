"""PillarAttn token selection (reference semantics): which KV positions each draft step attends to.

After a full-attention verify pass, every older token j of a row is scored per KV head by the mean attention
probability the verify queries gave it (attention.pillar_scores). The newest tokens are always kept, the
best-scoring older ones fill the budget, and each following draft step appends its own new slot.
Positions are logical (0 .. kv_len-1); callers map them to pool slots through the row's page table.
"""

from __future__ import annotations

import numbers
from fractions import Fraction

import jax
import jax.numpy as jnp

from sparsespec_jax.attention import top_k_positions

# ratio is applied as the nearest fraction with a denominator up to this, so ceil(ratio * kv_len) is exact
# integer arithmetic (float32 rounding would otherwise move the budget by one at exact multiples).
RATIO_DENOMINATOR_LIMIT = 10_000


class SelectionError(ValueError):
    """A selection argument has the wrong shape or range."""


def pillar_budget(kv_len: jax.Array, ratio: float, min_budget: int) -> jax.Array:
    """Tokens each row's draft steps attend to (before draft slots): min(kv_len, max(min_budget, ceil(ratio*L)))."""
    if not isinstance(ratio, numbers.Real) or not 0 <= ratio <= 1:
        raise SelectionError(f"ratio: must be in [0, 1], got {ratio!r}")
    if not isinstance(min_budget, numbers.Integral) or min_budget < 0:
        raise SelectionError(f"min_budget: must be an integer >= 0, got {min_budget!r}")
    fraction = Fraction(ratio).limit_denominator(RATIO_DENOMINATOR_LIMIT)
    num, den = fraction.numerator, fraction.denominator
    kv_len = jnp.asarray(kv_len, jnp.int32)
    # ceil(num * L / den) without overflow: L = a*den + b  ->  num*a + ceil(num*b / den)
    whole, rest = kv_len // den, kv_len % den
    proportional = num * whole + (num * rest + den - 1) // den
    return jnp.minimum(kv_len, jnp.maximum(int(min_budget), proportional)).astype(jnp.int32)


def select_tokens(scores: jax.Array, kv_len: jax.Array, num_recent: jax.Array, budget: jax.Array,
                  capacity: int, backend: str = "reference"):
    """Positions each (row, KV head) attends to: (positions int32[R, Hkv, capacity], count int32[R]).

    The newest num_recent positions (kv_len - num_recent .. kv_len - 1) are always kept; the rest of the
    budget goes to the best-scoring older positions (ties: lower position first). count = min(budget, kv_len),
    raised to num_recent if the budget is smaller and capped at capacity. The first count entries are the
    chosen positions in ascending order; later entries are 0 (callers mask by count). capacity must leave room
    for the draft slots append_slot adds later. `backend` picks the top-K implementation (attention dispatch).
    """
    if scores.ndim != 3:
        raise SelectionError(f"scores: expected [R, Hkv, S], got shape {scores.shape}")
    rows, num_kv_heads, num_keys = scores.shape
    for name, value in (("kv_len", kv_len), ("num_recent", num_recent), ("budget", budget)):
        if jnp.shape(value) != (rows,):
            raise SelectionError(f"{name}: expected shape {(rows,)}, got {jnp.shape(value)}")
    if not isinstance(capacity, numbers.Integral) or capacity < 1:
        raise SelectionError(f"capacity: must be a positive integer, got {capacity!r}")

    kv_len = jnp.clip(kv_len.astype(jnp.int32), 0, num_keys)
    num_recent = jnp.clip(num_recent.astype(jnp.int32), 0, kv_len)
    older_end = kv_len - num_recent
    count = jnp.minimum(jnp.clip(budget.astype(jnp.int32), num_recent, kv_len), capacity)

    j = jnp.arange(num_keys, dtype=jnp.int32)
    older = jnp.where(j[None, None, :] < older_end[:, None, None], scores.astype(jnp.float32), -jnp.inf)
    best, picked = top_k_positions(backend, older, jnp.maximum(count - num_recent, 0), int(capacity))

    # Older picks first (ascending, all below older_end), then the recent run: ascending overall.
    slot = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
    recent = older_end[:, None, None] + slot - picked[:, None, None]
    positions = jnp.where(slot < picked[:, None, None], best, jnp.where(slot < count[:, None, None], recent, 0))
    return positions, count


def append_slot(positions: jax.Array, count: jax.Array, new_pos: jax.Array):
    """Add position new_pos[r] at index count[r] for every KV head (a draft step's own token): (positions, count+1).

    Keeps the live entries ascending, since a new token is newer than every selected one.
    """
    index = jnp.arange(positions.shape[-1], dtype=jnp.int32)[None, None, :]
    updated = jnp.where(index == count[:, None, None], new_pos.astype(positions.dtype)[:, None, None], positions)
    return updated, count + 1
