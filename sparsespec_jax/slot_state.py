"""Device-resident per-slot decoding state, so a step never waits for the host to learn the previous tokens.

Every running request owns one slot. window[s, 0] is the request's newest token (sampled, its K/V not yet
written); window[s, i] (1 <= i <= k) is the i-th draft of the current cycle and draft_log_q[s, i - 1] the
processed distribution it was drawn from. Steps read their input tokens from here when the host does not know
them yet, and write what they sample back. The last slot is a spare that padding rows write into.

A step's output tokens land here too (emitted[s] for each slot that emitted), not in fresh output arrays: a
fresh output buffer sits at a new address on every call, and XLA may place the step's temporaries (even its
layer loop's) in it, so a CUDA graph of the step would be re-recorded on every call. Donated state keeps its
address, and the host copies emitted out with a separate small program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparsespec_jax.spec.draft_sets import DraftSets


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    window: jax.Array               # int32 [S, k+1]
    draft_log_q: jax.Array | None   # f32 [S, k, V] when drafts come from the model, else None
    sets: DraftSets | None          # PillarAttn / streaming token sets, when drafts come from the model
    emitted: jax.Array              # int32 [S, k+2]: per slot, its last step's count of output tokens, then them

    @classmethod
    def create(cls, num_slots: int, k: int, vocab_size: int, sets: DraftSets | None) -> "SlotState":
        log_q = None if sets is None else jnp.zeros((num_slots, k, vocab_size), jnp.float32)
        return cls(window=jnp.zeros((num_slots, k + 1), jnp.int32), draft_log_q=log_q, sets=sets,
                   emitted=jnp.zeros((num_slots, k + 2), jnp.int32))

    @property
    def spare_slot(self) -> int:
        return self.window.shape[0] - 1
