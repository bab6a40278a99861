"""Several steady-state decode steps in one jitted call (a burst), each sub-step planned on the device.

One call per step costs the host ~2 ms (planning, packing, reading, XLA's launch of the step): more than a
small model's step on a GPU. In the steady state of decoding, every running request only cycles: k sparse draft
steps, then one verify (plain decoding: one token per step). Nothing in that cycle needs the host. Which row a
request feeds advances deterministically, and the one quantity that depends on acceptance, the position of its
newest committed token, is known on the device right after each verify. A burst keeps those per-slot counters
on the device (BurstCounters), builds each sub-step's UnifiedBatch from them inside the jit, runs `steps`
sub-steps in a lax.scan and writes each sub-step's emitted tokens into a donated output buffer that the host
reads one call later.

Inside a burst a request drafts again right after its verify: the step the host scheduler makes it sit out
(STALL, while the host learns the verify's outcome) is not needed when the outcome stays on the device, so a
cycle takes k + 1 steps instead of k + 2 and the same batch feeds ~1/(k+1) more rows per step. The tokens are
the ones single steps produce: sampling keys depend on the request and the position only, and draft sets are
refreshed at the same verifies. Entering a burst, balance_phases delays a few requests once so the verifies
spread evenly over the k + 1 phases of the shorter cycle.

Near a request's length limit a burst keeps cycling with k drafts where the host would shorten the last
cycle, and stops giving a request rows once its newest token reaches the limit. Tokens past the limit are
dropped on read; their K/V lands past the request's granted pages, in the padding page. A stop token reaches
the host one call later and what was sampled after it is dropped.

The host's side (BurstPlan): grant every request the pages its worst case needs (every draft accepted), size
the verify group to the most verifies any sub-step can have, and advance its copy of the cycle counters,
which depend on acceptance only through the positions it learns from the outputs. When the pool cannot hold
the worst case, the engine offloads the newest requests (a few) rather than fall back to single steps, and
takes an offloaded request back, inside the bursts, once the next burst still fits with it: the request starts
a cycle from its newest token on the device, in the least loaded verify phase.
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


AUTO_BURST_STEPS = 8


def auto_burst_steps(platform: str, method: str, sync_host: bool, scheduler: str) -> int:
    """Decode steps per call when the user sets none: bursts where they were measured to pay, on GPUs (one H200:
    host time per step 1.3-2.3 -> 0.3-0.5 ms, model drafts 3-22% more tokens/s, plain decoding within -4%..+1%;
    two H200s, tensor parallel, where the call blocks for the whole burst: pillar +9%, plain decoding level);
    single steps on other platforms (untried there; on a CPU the host does not bound the step), for n-gram (its
    drafts come from the host) and for the ablation baselines (sync_host, phased scheduling), which stay what
    their flags name."""
    baseline = sync_host or scheduler == "phased"
    return AUTO_BURST_STEPS if platform == "gpu" and method != "ngram" and not baseline else 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BurstCounters:
    """Per slot (the spare included), device-resident between bursts."""

    newest: jax.Array        # int32 [S]: position of the newest committed token (its K/V not written yet)
    draft_index: jax.Array   # int32 [S]: drafts sampled in the current cycle; k: the verify is next
    sit_out: jax.Array       # int32 [S]: steps still to sit out before the cycle goes on (set on entering)
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
    """burst_fn(params, kv, state, counters, buffer, layout, steps) -> (kv, state, counters):
    `steps` sub-steps of every request in BurstInputs (packed into `buffer`), each like one unified step."""
    k = spec.k if spec.speculative else 0

    def burst_fn(params, kv, state: SlotState, counters: BurstCounters, buffer, layout: PackedLayout, steps: int):
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
            sit_out = jnp.maximum(sit_out - 1, 0)
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

    return jax.jit(burst_fn, static_argnames=("layout", "steps"),
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


def advance_cycles(draft_index: np.ndarray, sit_out: np.ndarray, k: int, steps: int):
    """The device's counter arithmetic over `steps` sub-steps with every request live: (verifies [steps, A],
    drafts [steps, A], draft_index, sit_out after them)."""
    verifies = np.zeros((steps, len(draft_index)), bool)
    drafts = np.zeros((steps, len(draft_index)), bool)
    for j in range(steps):
        ready = sit_out == 0
        verifies[j] = ready & (draft_index >= k)
        drafts[j] = ready & (draft_index < k)
        draft_index = np.where(verifies[j], 0, draft_index + drafts[j])
        sit_out = np.maximum(sit_out - 1, 0)
    return verifies, drafts, draft_index, sit_out


def balance_phases(draft_index: np.ndarray, sit_out: np.ndarray, k: int) -> np.ndarray:
    """Extra steps each request sits out on entering bursts so that no phase of the (k + 1)-step cycle holds
    more than ceil(A / (k + 1)) verifies: int64 [A]. A request whose phase is full moves to the next phase
    with room, earliest arrivals first, so the delays are a few steps, paid once."""
    period, count = k + 1, len(draft_index)
    delays = np.zeros(count, np.int64)
    if period == 1 or not count:
        return delays
    phase = (sit_out + k - draft_index) % period          # sub-step of the first verify, modulo the cycle
    room = np.full(period, -(-count // period))
    waiting: list[int] = []
    for t in range(2 * period):                           # a second round takes what wrapped past the last phase
        if t < period:
            waiting.extend(np.flatnonzero(phase == t).tolist())
        taken = waiting[:room[t % period]]
        room[t % period] -= len(taken)
        delays[taken] = t - phase[taken]
        waiting = waiting[len(taken):]
    return delays
