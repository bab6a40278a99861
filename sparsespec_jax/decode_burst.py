"""Several steady-state decode steps in one jitted call (a burst), each sub-step planned on the device.

One call per step costs the host ~2 ms (planning, packing, reading, XLA's launch of the step): more than a
small model's step on a GPU. In the steady state of decoding, every running request only cycles: k sparse draft
steps, one verify, `stall_steps` steps sitting out (plain decoding: one token per step). Nothing in that cycle
needs the host. Which row a request feeds advances deterministically, and the one quantity that depends on
acceptance, the position of its newest committed token, is known on the device right after each verify. A
burst keeps those per-slot counters on the device (BurstCounters), builds each sub-step's UnifiedBatch from
them inside the jit, runs `steps` sub-steps in a lax.scan and writes each sub-step's emitted tokens into a
donated output buffer that the host reads one call later.

A burst's sub-steps are the steps the host scheduler would plan (the same rows, positions, drafts and sampling
keys) except near a request's length limit: a burst keeps cycling with k drafts where the host would shorten
the last cycle, and stops giving a request rows once its newest token reaches the limit. Tokens past the
limit are dropped on read; their K/V lands past the request's granted pages, in the padding page. A stop token
reaches the host one call later and what was sampled after it is dropped.

The host's side (BurstPlan): grant every request the pages its worst case needs (every draft accepted), size
the verify group to the most verifies any sub-step can have, and advance its copy of the cycle counters,
which depend on acceptance only through the positions it learns from the outputs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsespec_jax.attention import AttentionMetadata
from sparsespec_jax.kv_cache import PADDING_PAGE
from sparsespec_jax.packed_args import PackedLayout, unpack
from sparsespec_jax.sampling import SamplingArrays
from sparsespec_jax.slot_state import SlotState
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.step_batch import DraftRows, EmitRows, SparseRows, UnifiedBatch
from sparsespec_jax.unified_step import unified_step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BurstCounters:
    """Per slot (the spare included), device-resident between bursts."""

    newest: jax.Array        # int32 [S]: position of the newest committed token (its K/V not written yet)
    draft_index: jax.Array   # int32 [S]: drafts sampled in the current cycle; k: the verify is next
    sit_out: jax.Array       # int32 [S]: steps still to sit out after the last verify
    outputs: jax.Array       # int32 [steps, S, k + 2]: per sub-step, SlotState.emitted's layout; count 0: none

    @classmethod
    def create(cls, num_slots: int, k: int, steps: int) -> "BurstCounters":
        zeros = jnp.zeros((num_slots,), jnp.int32)
        return cls(newest=zeros, draft_index=zeros, sit_out=zeros,
                   outputs=jnp.zeros((steps, num_slots, k + 2), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BurstInputs:
    """A burst's host arrays, one entry per request taking part (padded with the spare slot)."""

    slot: jax.Array               # int32 [A]
    cap: jax.Array                # int32 [A]: tokens (prompt and output) the request may reach
    page_tables: jax.Array        # int32 [A, P]: pages granted for its worst case over the burst
    sampling: SamplingArrays      # [A]
    verify_rows: int = dataclasses.field(metadata=dict(static=True))   # most verifies of any sub-step


@functools.partial(jax.jit, donate_argnames=("counters",))
def seed_counters(counters: BurstCounters, slot, newest, draft_index, sit_out) -> BurstCounters:
    """Write the host's counters of the given slots (entering bursts, when the host knows them all)."""
    return dataclasses.replace(counters, newest=counters.newest.at[slot].set(newest),
                               draft_index=counters.draft_index.at[slot].set(draft_index),
                               sit_out=counters.sit_out.at[slot].set(sit_out))


def _sub_step_batch(newest, draft_index, sit_out, inputs: BurstInputs, k: int, spare: int, page_size: int):
    """The UnifiedBatch of one sub-step, laid out as step_batch.build_unified_batch lays out the same rows:
    one sparse entry per request (live while it drafts; none without drafts), then the verify rows (plain
    decode rows without drafts), compacted in entry order. Returns (batch, drafting [A], verifying [A],
    row_entry [V]: the entry each verify row belongs to)."""
    num_entries, width, num_rows = inputs.slot.shape[0], k + 1, inputs.verify_rows
    entry = jnp.arange(num_entries, dtype=jnp.int32)
    live = (inputs.slot != spare) & (newest + 1 < inputs.cap)
    ready = live & (sit_out == 0)
    drafting = ready & (draft_index < k)
    verifying = ready & (draft_index >= k)
    rank = jnp.cumsum(verifying) - 1
    row_entry = jnp.zeros(num_rows, jnp.int32).at[jnp.where(verifying, rank, num_rows)].set(entry, mode="drop")
    row_valid = jnp.arange(num_rows) < verifying.sum()
    row_slot = jnp.where(row_valid, inputs.slot[row_entry], spare)
    row_newest = newest[row_entry]
    page_tables = inputs.page_tables

    def write_slot(tables, positions, valid):
        pages = jnp.take_along_axis(tables, positions[:, None] // page_size, axis=1)[:, 0]
        return jnp.where(valid, pages * page_size + positions % page_size, PADDING_PAGE * page_size)

    offset = jnp.arange(width, dtype=jnp.int32)
    full_positions = (row_newest[:, None] + offset).reshape(-1)
    full_valid = jnp.repeat(row_valid, width)
    full_tables = jnp.repeat(page_tables[row_entry], width, axis=0)
    sparse_positions = newest + draft_index
    sparse_group = num_entries if k else 0       # without drafts (k = 0) the step has no sparse rows
    positions = jnp.concatenate([jnp.where(drafting, sparse_positions, 0)[:sparse_group],
                                 jnp.where(full_valid, full_positions, 0)])
    write_slots = jnp.concatenate([write_slot(page_tables, sparse_positions, drafting)[:sparse_group],
                                   write_slot(full_tables, full_positions, full_valid)])
    window_index = jnp.concatenate([
        jnp.where(drafting, inputs.slot * width + draft_index, -1)[:sparse_group],
        jnp.where(full_valid, jnp.repeat(row_slot, width) * width + jnp.tile(offset, num_rows), -1)])
    sparse_slot = jnp.where(drafting, inputs.slot, spare)[:sparse_group]
    sparse = SparseRows(slot=sparse_slot, cycle_start=newest[:sparse_group], draft_index=draft_index[:sparse_group],
                        page_tables=jnp.where(drafting[:, None], page_tables, PADDING_PAGE)[:sparse_group],
                        live=drafting[:sparse_group])
    q_start = jnp.where(row_valid, jnp.arange(num_rows, dtype=jnp.int32) * width, 0)
    meta = AttentionMetadata(q_start=q_start, q_len=jnp.where(row_valid, width, 0),
                             kv_len=jnp.where(row_valid, row_newest + width, 0),
                             page_tables=jnp.where(row_valid[:, None], page_tables[row_entry], PADDING_PAGE),
                             write_slots=write_slots, page_size=page_size, max_q_len=width)
    drafts = DraftRows(token=entry[:sparse_group], slot=sparse_slot, draft_index=draft_index[:sparse_group],
                       position=(sparse_positions + 1)[:sparse_group], cycle_start=newest[:sparse_group])
    emits = EmitRows(first_token=jnp.where(row_valid, sparse_group + q_start, 0), slot=row_slot,
                     num_drafts=jnp.where(row_valid, k, 0), position=jnp.where(row_valid, row_newest + 1, 0),
                     refresh=row_valid & (k > 0), any_refresh=k > 0, width=width)
    batch = UnifiedBatch(tokens=jnp.zeros(positions.shape, jnp.int32), window_index=window_index,
                         positions=positions, write_slots=write_slots, sparse=sparse, meta=meta, drafts=drafts,
                         emits=emits)
    return batch, drafting, verifying, row_entry


@functools.lru_cache(maxsize=16)
def make_burst_fn(graphdef, spec: SpecConfig, backend: str):
    """burst_fn(params, kv, state, counters, buffer, layout, steps, stall_steps) -> (kv, state, counters):
    `steps` sub-steps of every request in BurstInputs (packed into `buffer`), each like one unified step."""
    k = spec.k if spec.speculative else 0

    def burst_fn(params, kv, state: SlotState, counters: BurstCounters, buffer, layout: PackedLayout, steps: int,
                 stall_steps: int):
        inputs: BurstInputs = unpack(buffer, layout)
        spare = state.window.shape[0] - 1
        page_size = kv.page_size
        slot = inputs.slot

        def sub_step(carry, index):
            kv, state, newest, draft_index, sit_out, outputs = carry
            batch, drafting, verifying, row_entry = _sub_step_batch(newest, draft_index, sit_out, inputs, k, spare,
                                                                    page_size)
            emit_sampling = jax.tree_util.tree_map(lambda x: x[row_entry], inputs.sampling)
            kv, state = unified_step(graphdef, params, kv, state, batch, inputs.sampling, emit_sampling, spec,
                                     backend)
            emitted = jnp.where(verifying[:, None], state.emitted[slot], 0)
            newest = newest + emitted[:, 0]
            draft_index = jnp.where(verifying, 0, draft_index + drafting)
            sit_out = jnp.where(verifying, stall_steps, jnp.maximum(sit_out - 1, 0))
            written = jnp.zeros(outputs.shape[1:], jnp.int32).at[jnp.where(verifying, slot, spare)].set(emitted)
            outputs = jax.lax.dynamic_update_index_in_dim(outputs, written, index, 0)
            return (kv, state, newest, draft_index, sit_out, outputs), None

        carry = (kv, state, counters.newest[slot], counters.draft_index[slot], counters.sit_out[slot],
                 counters.outputs)
        (kv, state, newest, draft_index, sit_out, outputs), _ = jax.lax.scan(sub_step, carry,
                                                                             jnp.arange(steps))
        counters = BurstCounters(newest=counters.newest.at[slot].set(newest),
                                 draft_index=counters.draft_index.at[slot].set(draft_index),
                                 sit_out=counters.sit_out.at[slot].set(sit_out), outputs=outputs)
        return kv, state, counters

    return jax.jit(burst_fn, static_argnames=("layout", "steps", "stall_steps"),
                   donate_argnames=("kv", "state", "counters"))


@dataclasses.dataclass
class BurstPlan:
    """What the host decided for one burst. Row counts are upper bounds: a request past its length limit
    stops taking rows on the device."""

    slot: np.ndarray            # int64 [A]: the requests' slots, oldest admission first
    generation: np.ndarray      # the slots' generations when planned: outputs of older ones are stale
    verifies: np.ndarray        # bool [steps, A]: which requests verify (or decode plainly) at each sub-step
    drafts: np.ndarray          # bool [steps, A]: which draft
    tokens_bound: np.ndarray    # int64 [A]: tokens each request can reach by the burst's end, its pages' cover

    @property
    def steps(self) -> int:
        return self.verifies.shape[0]


def advance_cycles(draft_index: np.ndarray, sit_out: np.ndarray, k: int, stall_steps: int, steps: int):
    """The device's counter arithmetic over `steps` sub-steps with every request live: (verifies [steps, A],
    drafts [steps, A], draft_index, sit_out after them)."""
    verifies = np.zeros((steps, len(draft_index)), bool)
    drafts = np.zeros((steps, len(draft_index)), bool)
    for j in range(steps):
        ready = sit_out == 0
        verifies[j] = ready & (draft_index >= k)
        drafts[j] = ready & (draft_index < k)
        draft_index = np.where(verifies[j], 0, draft_index + drafts[j])
        sit_out = np.where(verifies[j], stall_steps, np.maximum(sit_out - 1, 0))
    return verifies, drafts, draft_index, sit_out
