"""Device-resident draft token sets: per batch slot, per layer and KV head, the positions draft steps attend to.

Positions are logical (0 .. L-1) so they stay valid whatever pages back them; they are mapped to pool slots
through the row's page table by every draft step, and survive offloading to host memory. A request has no set
right after prefill: it drafts with full attention until its first verification (the host tracks this).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.spec.selection import pillar_budget, select_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftSets:
    positions: jax.Array    # int32 [slots, L, Hkv, capacity]; the first count entries are live
    count: jax.Array        # int32 [slots]

    @classmethod
    def create(cls, num_slots: int, num_layers: int, num_kv_heads: int, capacity: int) -> "DraftSets":
        return cls(positions=jnp.zeros((num_slots, num_layers, num_kv_heads, capacity), jnp.int32),
                   count=jnp.zeros(num_slots, jnp.int32))

    @property
    def capacity(self) -> int:
        return self.positions.shape[-1]


def with_draft_positions(positions, count, start, k: int):
    """Append the round's k draft positions start .. start+k-1 after each row's live entries: [R, L, Hkv, C]."""
    index = jnp.arange(positions.shape[-1], dtype=jnp.int32)
    offset = index[None, :] - count[:, None]                                       # [R, C]
    appended = (offset >= 0) & (offset < k)
    value = (start[:, None] + offset)[:, None, None, :]
    return jnp.where(appended[:, None, None, :], value, positions)


def pillar_refresh(scores, kv_len, num_recent, spec: SpecConfig, capacity: int, backend: str):
    """New sets from verify scores [L, R, Hkv, S]: the newest max(num_recent, spec.recent_tokens) kept, the best
    older ones fill the budget.
    All layers and heads of a row go through one top-K call, KV heads outermost so that under tensor
    parallelism each device's heads stay one contiguous block and their selection stays on that device."""
    layers, rows, heads, keys = scores.shape
    budget = pillar_budget(kv_len, spec.budget_ratio, spec.min_budget)
    per_row = scores.transpose(1, 2, 0, 3).reshape(rows, heads * layers, keys)
    num_recent = jnp.maximum(num_recent, spec.recent_tokens)
    positions, count = select_tokens(per_row, kv_len, num_recent, budget, capacity, backend)
    return positions.reshape(rows, heads, layers, capacity).transpose(0, 2, 1, 3), count   # [R, L, Hkv, C], [R]


def streaming_refresh(kv_len, spec: SpecConfig, num_layers: int, num_kv_heads: int, capacity: int):
    """Sink tokens plus the most recent window, the same budget as pillar, every layer and head alike."""
    budget = pillar_budget(kv_len, spec.budget_ratio, spec.min_budget)
    sinks = jnp.minimum(spec.sink_tokens, budget)
    index = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    window_start = kv_len[:, None] - (budget - sinks)[:, None]
    positions = jnp.where(index < sinks[:, None], index, window_start + index - sinks[:, None])
    positions = jnp.where(index < budget[:, None], positions, 0)
    positions = jnp.broadcast_to(positions[:, None, None, :], (kv_len.shape[0], num_layers, num_kv_heads, capacity))
    return positions, budget
