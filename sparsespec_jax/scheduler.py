"""Continuous batching with speculative cycles: which rows run this step, and KV page bookkeeping.

Row kinds: PREFILL (a prompt chunk, or a preempted request's recomputed prefix), DRAFT (one draft step) and
VERIFY (the newest token plus the cycle's drafts; without drafts it is a plain decode). A speculative request
cycles through k DRAFT rows and one VERIFY row. After a verify with drafts the request sits out (STALL) until
the host has read how many tokens were accepted (a first cycle may sit out after a plain token too, to reach
its phase), and for its whole stall step even when the host reads the result early (a step that waits for the
device before evicting), which would otherwise move its verifies onto the next phase's. Everything else
advances deterministically, so the host can plan a step before it knows the previous step's tokens.
Below CyclePolicy.draft_min_context tokens of context a request only decodes plainly (a VERIFY row without
drafts that renews no token set) and starts its first cycle once past it.

Decoding requests are planned with array operations over the slot table (slot_table.py); only prompt chunks,
host-made drafts, first cycles, admissions and evictions take a per-request path.

Unified scheduling (default) staggers requests: each request's first cycle is shortened so its verify lands in
the least-loaded phase, which keeps about 1/(cycle length) of the batch verifying at every step and the token
count per step flat. Phased scheduling aligns every verify to the same step (the classic sequential rounds).

When KV pages run out, the most recently admitted request is evicted: its KV goes to host memory if the host
pool has room (restored before any new admission), otherwise it is preempted and recomputed later. Nothing
is ever dropped. New requests are admitted as soon as their first prompt chunk fits (output space is never
reserved ahead); a preempted one only once its whole prefix and a cycle fit beside what the running requests
may claim next (their prompts' rest, a cycle each).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Callable

import numpy as np

from sparsespec_jax.kv_cache import PageAllocator
from sparsespec_jax.request import Request, RequestStatus
from sparsespec_jax.slot_table import SlotTable

SCHEDULER_MODES = ("unified", "phased")


class RowKind(enum.IntEnum):
    PREFILL = 0
    DRAFT = 1
    VERIFY = 2


@dataclasses.dataclass
class StepPlan:
    """One step's rows, one entry per row in every array (each slot appears at most once)."""

    slot: np.ndarray              # int64 [R]
    kind: np.ndarray              # int64 [R]: RowKind
    start: np.ndarray             # position of the first token fed
    num_tokens: np.ndarray        # tokens fed this step
    draft_index: np.ndarray       # DRAFT: index of the draft this step samples
    num_drafts: np.ndarray        # DRAFT / VERIFY: drafts in the row's cycle
    cycle_start: np.ndarray       # DRAFT / VERIFY: position of the cycle's newest committed token
    sparse: np.ndarray            # bool: DRAFT attending to the request's token set (else full attention)
    refresh: np.ndarray           # bool: VERIFY renewing the request's token set
    emits: np.ndarray             # bool: the row's sample becomes output
    stalls: np.ndarray            # bool: the host must read the result before planning the request again
    phase: np.ndarray             # a first cycle's chosen verify phase, else -1
    generation: np.ndarray        # the slot's generation when planned: results of older ones are stale
    prompt_tokens: dict[int, np.ndarray]   # slot of a PREFILL row -> its host-known input tokens
    proposals: np.ndarray | None  # int32 [R, k]: host-made drafts of VERIFY rows (n-gram), else None

    @property
    def verifies(self) -> np.ndarray:
        """bool [R]: VERIFY rows with drafts to verify (the others are plain decodes)."""
        return (self.kind == RowKind.VERIFY) & (self.num_drafts > 0)


_FLAGS = frozenset(("sparse", "refresh", "emits", "stalls"))    # boolean row fields of a plan


def _plan(slot, kind, start, num_tokens, *, draft_index=0, num_drafts=0, cycle_start=0, sparse=False,
          refresh=False, emits=False, stalls=False, phase=-1, prompt_tokens=None, proposals=None) -> dict:
    """Row arrays of one group (each its own copy), scalars broadcast."""
    n = len(slot)
    fields = dict(slot=slot, kind=kind, start=start, num_tokens=num_tokens, draft_index=draft_index,
                  num_drafts=num_drafts, cycle_start=cycle_start, sparse=sparse, refresh=refresh, emits=emits,
                  stalls=stalls, phase=phase)
    out = {}
    for name, value in fields.items():
        dtype = bool if name in _FLAGS else np.int64
        out[name] = np.array(value, dtype) if isinstance(value, np.ndarray) else np.full(n, value, dtype)
    out["prompt_tokens"] = prompt_tokens or {}
    out["proposals"] = proposals
    return out


def _select(rows: dict, keep: np.ndarray) -> dict:
    """The rows of a group (or plan) where `keep` holds (the same dict when it holds everywhere)."""
    if keep.all():
        return rows
    return {name: (value[keep] if isinstance(value, np.ndarray) else value) for name, value in rows.items()}


@dataclasses.dataclass(frozen=True)
class CyclePolicy:
    """k drafts per cycle; drafts_with_model: DRAFT rows exist (pillar, streaming) rather than host proposals."""

    k: int = 0
    drafts_with_model: bool = False
    mode: str = "unified"
    stall_steps: int = 1          # steps a request sits out after a verify (0 when the host syncs every step)
    draft_min_context: int = 0    # a request decodes plainly while its context is shorter (SpecConfig)
    propose: Callable[[np.ndarray, int], list[int]] | None = None       # host drafts (n-gram)

    @property
    def cycle_length(self) -> int:
        return self.k + 1 + self.stall_steps

    @property
    def host_drafts(self) -> bool:
        return self.k > 0 and not self.drafts_with_model


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_batch_size: int, max_num_batched_tokens: int,
                 prefill_chunk_size: int, max_model_len: int, max_pages: int, policy: CyclePolicy = CyclePolicy(),
                 evict: Callable[[Request], bool] | None = None, restore: Callable[[Request], None] | None = None,
                 restore_reserve: Callable[[Request], int] | None = None):
        """evict(request) -> True if it moved the request's KV to host memory (else it is preempted);
        restore(request) writes an offloaded request's KV back into its newly granted pages;
        restore_reserve(request) -> pages a restore of it must leave free besides its own KV and one cycle."""
        if policy.mode not in SCHEDULER_MODES:
            raise ValueError(f"scheduler: must be one of {SCHEDULER_MODES}, got {policy.mode!r}")
        self.allocator = allocator
        self.table = SlotTable(max_batch_size, max_pages, allocator)
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.max_model_len = max_model_len
        self.policy = policy
        self.evict = evict
        self.restore = restore
        self.restore_reserve = restore_reserve
        self.waiting: collections.deque[Request] = collections.deque()
        self.offloaded: collections.deque[Request] = collections.deque()
        self.free_slots = list(range(max_batch_size - 1, -1, -1))
        self.num_preemptions = 0
        self.num_offloads = 0
        self.step_index = 0

    # -- membership ------------------------------------------------------------------------------------
    @property
    def running(self) -> list[Request]:
        """Running requests, oldest admission first."""
        table = self.table
        slots = np.flatnonzero(table.active)
        return [table.requests[s] for s in slots[np.argsort(table.admitted[slots])]]

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.offloaded or self.table.active.any())

    def _leave(self, request: Request) -> None:
        slot = request.slot
        self.table.vacate(slot)
        self.free_slots.append(slot)
        request.slot = None

    def finish(self, request: Request) -> None:
        self._leave(request)
        request.status = RequestStatus.FINISHED

    def _evict(self, victim: Request) -> None:
        """Free a victim's pages: offload its KV to host memory if possible, else preempt it (recompute)."""
        table = self.table
        if table.pending[victim.slot] or table.awaiting[victim.slot]:
            raise RuntimeError(f"request {victim.request_id} evicted with results in flight; "
                               f"settle them first (pages_short)")
        offloaded = self.evict is not None and self.evict(victim)
        self._leave(victim)
        if offloaded:
            victim.status = RequestStatus.OFFLOADED
            self.num_offloads += 1
            self.offloaded.append(victim)
        else:
            victim.status = RequestStatus.WAITING
            victim.num_computed = 0
            victim.has_sets = False
            victim.stats.preemptions += 1
            self.num_preemptions += 1
            self.waiting.appendleft(victim)

    def evict_newest(self) -> None:
        """Evict the most recently admitted running request (its results read: see _evict)."""
        table = self.table
        slots = np.flatnonzero(table.active)
        self._evict(table.requests[slots[np.argmax(table.admitted[slots])]])

    def admit(self, request: Request) -> None:
        """Give a request a slot and make it running (its pages are granted by the caller)."""
        request.slot = self.free_slots.pop()
        request.status = RequestStatus.RUNNING
        self.table.assign(request.slot, request, self._cap(request))

    def _cap(self, request: Request) -> int:
        """The most tokens a request may reach: its prompt and max_tokens, within the context."""
        return min(len(request.prompt_ids) + request.params.max_tokens, self.max_model_len)

    # -- planning --------------------------------------------------------------------------------------
    def _phase_loads(self) -> np.ndarray:
        table = self.table
        phases = table.phase[table.active & (table.phase >= 0)]
        return np.bincount(phases, minlength=self.policy.cycle_length)

    def _first_cycle_phase(self, drafts: np.ndarray, sits_out: np.ndarray) -> np.ndarray:
        """The phase (verify step modulo the cycle length) of a first cycle starting now. With d drafts it
        verifies d steps from now. With none it decodes one plain token now and its next cycle (k drafts)
        verifies k + 1 steps from now, or k + 1 + stall_steps if it sits out after that token as after a verify.
        Running ahead a cycle spans k + 2 phases: the zero-draft starts reach the two that drafts cannot."""
        policy = self.policy
        offset = np.where(drafts > 0, drafts, policy.k + 1 + sits_out * policy.stall_steps)
        return (self.step_index + offset) % policy.cycle_length

    def _first_cycles(self, limit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(drafts, sits out, phase) of first cycles of at most `limit` drafts, so that each verify lands in the
        chosen phase: the least loaded one (unified), the last one of the cycle (phased)."""
        policy = self.policy
        length = policy.cycle_length
        if policy.mode == "phased":
            wanted = (length - 1 - self.step_index) % length
            drafts, sits_out = np.minimum(limit, wanted), np.zeros(len(limit), bool)
            if wanted == (policy.k + 1) % length or (policy.stall_steps and wanted == 0):
                drafts[:] = 0                                     # a plain token first, sitting out if wanted = 0
                sits_out[:] = wanted == 0 and policy.stall_steps > 0
            return drafts, sits_out, self._first_cycle_phase(drafts, sits_out)
        loads = self._phase_loads()
        chosen = np.zeros((3, len(limit)), np.int64)
        for i, lim in enumerate(limit):
            # Options, most preferred first: more drafts, then a plain token flowing on, then sitting out.
            drafts = np.concatenate([np.arange(int(lim), -1, -1), np.zeros(int(policy.stall_steps > 0), np.int64)])
            sits_out = np.arange(len(drafts)) > int(lim)
            phases = self._first_cycle_phase(drafts, sits_out)
            j = int(np.argmin(loads[phases]))                     # the first of the least loaded
            loads[phases[j]] += 1
            chosen[:, i] = drafts[j], sits_out[j], phases[j]
        return chosen[0], chosen[1].astype(bool), chosen[2]

    def _decode_rows(self, slots: np.ndarray) -> dict:
        """Rows of requests past their prompt (`slots`, oldest first): drafts, verifies and plain decodes."""
        table, policy = self.table, self.policy
        room = table.cap[slots] - table.total[slots]
        start = table.computed[slots]
        if policy.k == 0:
            return _plan(slots, RowKind.VERIFY, start, 1, cycle_start=start, emits=True)
        if policy.host_drafts:
            proposals = np.zeros((len(slots), policy.k), np.int32)
            num_drafts = np.zeros(len(slots), np.int64)
            for i, slot in enumerate(slots):
                # A row without drafts flows on like plain decoding, so its newest token may still be on the
                # device (unread = 1). The continuation's first token then guesses it and the drafts follow
                # the guess; a wrong guess only costs acceptance, since the verify checks every draft.
                unread = int(table.pending[slot])
                if unread <= 1 and room[i] > 1 and start[i] >= policy.draft_min_context:
                    wanted = min(policy.k, int(room[i]) - 1)
                    drafts = policy.propose(table.requests[slot].token_history(), wanted + unread)[unread:]
                    proposals[i, :len(drafts)], num_drafts[i] = drafts, len(drafts)
            return _plan(slots, RowKind.VERIFY, start, num_drafts + 1, num_drafts=num_drafts, cycle_start=start,
                         emits=True, stalls=num_drafts > 0, proposals=proposals)
        new = table.draft_index[slots] < 0
        plain = new & (start < policy.draft_min_context)        # a plain decode: no drafts, no set refresh
        num_drafts = np.where(new, np.minimum(policy.k, room - 1), table.cycle_drafts[slots])
        num_drafts[plain] = 0
        draft_index = np.where(new, 0, table.draft_index[slots])
        cycle_start = np.where(new, start, table.cycle_start[slots])
        phase = np.full(len(slots), -1, np.int64)
        sits_out = np.zeros(len(slots), bool)
        first = new & ~plain & ((table.phase[slots] < 0) | (policy.mode == "phased"))
        if first.any():
            num_drafts[first], sits_out[first], phase[first] = self._first_cycles(num_drafts[first])
        drafting = draft_index < num_drafts
        kind = np.where(drafting, RowKind.DRAFT, RowKind.VERIFY)
        return _plan(slots, kind, np.where(drafting, cycle_start + draft_index, cycle_start),
                     np.where(drafting, 1, num_drafts + 1), draft_index=draft_index, num_drafts=num_drafts,
                     cycle_start=cycle_start, sparse=drafting & table.has_sets[slots], refresh=~drafting & ~plain,
                     emits=~drafting, stalls=~drafting & ((num_drafts > 0) | sits_out), phase=phase)

    def _reserve_decode_pages(self, rows: dict) -> dict:
        """Grant the decode rows' pages (a cycle's first row reserves the whole cycle), evicting the newest
        requests while the pool is short; returns the rows that survived."""
        table = self.table
        target = rows["cycle_start"] + rows["num_drafts"] + 1
        while True:
            alive = table.active[rows["slot"]]
            if table.pages_short_of(rows["slot"][alive], target[alive]).sum() <= self.allocator.num_free:
                break
            self.evict_newest()
        rows = _select(rows, alive)
        table.grow(rows["slot"], target[alive])
        return rows

    def can_restore(self) -> bool:
        """Whether the oldest offloaded request fits now: a free slot, and pages for its KV and one cycle (and
        the restore reserve)."""
        if not (self.offloaded and self.free_slots):
            return False
        request = self.offloaded[0]
        needed = self.allocator.pages_needed(request.num_computed + self.policy.k + 1, 0)
        if needed > self.allocator.num_free:
            return False                      # the usual answer under pressure: skip the reserve's cost
        if self.restore_reserve is not None:
            needed += self.restore_reserve(request)
        return needed <= self.allocator.num_free

    def restore_oldest(self) -> Request:
        """Bring the oldest offloaded request back (can_restore() must hold): a slot, pages for its KV, the KV."""
        request = self.offloaded.popleft()
        self.admit(request)
        self.table.grow(np.array([request.slot]), np.array([request.num_computed]))
        self.restore(request)
        return request

    def _spare_pages(self) -> int:
        """Free pages beyond what the running requests may claim next: the rest of their prompts, and the
        growth pages_short() bounds (k + 1 tokens each)."""
        table = self.table
        slots = np.flatnonzero(table.active)
        prefilling = table.prefilling(slots)
        base = np.where(prefilling, table.total[slots], table.computed[slots])
        target = np.minimum(base + self.policy.k + 1, table.cap[slots])
        return self.allocator.num_free - int(table.pages_short_of(slots, target).sum())

    def _readmission_pages(self, request: Request) -> int:
        """Pages a preempted request is re-admitted against: its whole prefix and one cycle. The newest request
        is the first evicted, so re-admitted into less room it would soon evict itself again, throwing its
        recomputed prefix away (under steady pressure: recomputing it step after step)."""
        return self.allocator.pages_needed(min(request.num_tokens + self.policy.k + 1, self._cap(request)), 0)

    def pages_short(self) -> bool:
        """Whether this step might need more pages than are free (so an eviction may be ahead): an upper bound
        of every running request's growth, whatever its next row turns out to be."""
        table = self.table
        slots = np.flatnonzero(table.active)
        prefilling = table.prefilling(slots)
        target = table.computed[slots] + np.where(prefilling, self.prefill_chunk_size, self.policy.k + 1)
        return int(table.pages_short_of(slots, target).sum()) > self.allocator.num_free

    def _stamp(self, rows: dict) -> dict:
        rows["generation"] = self.table.generation[rows["slot"]]
        return rows

    def _prompt_chunk(self, request: Request, start: int, n: int) -> dict:
        slot = request.slot
        self.table.grow(np.array([slot]), np.array([start + n]))
        return _plan(np.array([slot]), RowKind.PREFILL, start, n, emits=start + n == self.table.total[slot],
                     prompt_tokens={slot: np.asarray(request.token_slice(start, start + n), np.int32)})

    def schedule(self) -> StepPlan | None:
        """Plan this step's rows (call apply() once they are dispatched); None if nothing can run. Evicting
        needs every running request's state known to the host: callers settle pending results first when
        pages_short()."""
        table = self.table
        ready = table.active & ~table.awaiting
        sitting_out = ready & (table.resume_step > self.step_index)
        if sitting_out.any() and (ready & ~sitting_out).any():    # alone, sitting out would only idle the device
            ready &= ~sitting_out
        active = np.flatnonzero(ready)
        active = active[np.argsort(table.admitted[active])]
        prefilling = table.prefilling(active)
        decoding = active[~prefilling & (table.cap[active] > table.total[active])]
        groups: list[dict] = []
        budget = self.max_num_batched_tokens
        if len(decoding):
            rows = self._decode_rows(decoding)
            keep = np.cumsum(rows["num_tokens"]) <= budget          # rows past the token budget wait a step
            rows = self._reserve_decode_pages(_select(rows, keep))
            budget -= int(rows["num_tokens"].sum())
            groups.append(self._stamp(rows))
        for slot in active[prefilling]:                              # prompt chunks, oldest request first
            start = int(table.computed[slot])
            n = min(self.prefill_chunk_size, int(table.total[slot]) - start, budget)
            if n <= 0:
                break
            request = table.requests[slot]
            if request is None:
                continue                                             # evicted earlier in this step
            while table.active[slot] and table.requests[slot] is request and self.allocator.num_free < \
                    table.pages_short_of(np.array([slot]), np.array([start + n]))[0]:
                self.evict_newest()
            if table.requests[slot] is not request:
                continue                                             # evicted itself
            groups.append(self._stamp(self._prompt_chunk(request, start, n)))
            budget -= n
        while self.can_restore():
            self.restore_oldest()
        while self.waiting and not self.offloaded and self.free_slots and budget > 0:
            request = self.waiting[0]
            n = min(self.prefill_chunk_size, request.num_tokens - request.num_computed, budget)
            if request.stats.preemptions and self._readmission_pages(request) > self._spare_pages():
                break
            if self.allocator.pages_needed(n, 0) > self.allocator.num_free:
                break
            self.waiting.popleft()
            self.admit(request)
            groups.append(self._stamp(self._prompt_chunk(request, 0, n)))
            budget -= n
        if not groups:
            return None
        for group in groups:
            if self.policy.host_drafts and group["proposals"] is None:
                group["proposals"] = np.zeros((len(group["slot"]), self.policy.k), np.int32)
        row_fields = [name for name in groups[0] if name != "prompt_tokens"
                      and (name != "proposals" or self.policy.host_drafts)]
        plan = {name: groups[0][name] if len(groups) == 1 else np.concatenate([g[name] for g in groups])
                for name in row_fields}
        prompt_tokens = {slot: tokens for g in groups for slot, tokens in g["prompt_tokens"].items()}
        # Rows of requests evicted after they were planned (their slot's generation moved on) are dropped.
        plan = _select(plan, plan["generation"] == table.generation[plan["slot"]])
        if not len(plan["slot"]):
            return None
        proposals = plan.pop("proposals", None)
        return StepPlan(**plan, prompt_tokens=prompt_tokens, proposals=proposals)

    def apply(self, plan: StepPlan) -> None:
        """Advance host-side request state for rows just dispatched."""
        table = self.table
        slot, kind = plan.slot, plan.kind
        table.steps[slot] += 1
        prefill, draft, verify = kind == RowKind.PREFILL, kind == RowKind.DRAFT, kind == RowKind.VERIFY
        table.computed[slot[prefill]] += plan.num_tokens[prefill]
        opens = draft & (plan.draft_index == 0)
        table.cycle_start[slot[opens]] = plan.cycle_start[opens]
        table.cycle_drafts[slot[opens]] = plan.num_drafts[opens]
        table.draft_index[slot[draft]] = plan.draft_index[draft] + 1
        table.draft_index[slot[verify]] = -1
        table.cycle_drafts[slot[verify]] = 0
        if self.policy.drafts_with_model:
            table.has_sets[slot[verify & plan.refresh]] = True
        chosen = plan.phase >= 0
        table.phase[slot[chosen]] = plan.phase[chosen]
        flowing = plan.emits & ~plan.stalls
        table.pending[slot[flowing]] += 1
        table.total[slot[flowing]] += 1
        table.computed[slot[flowing & verify]] += 1
        table.awaiting[slot] = plan.stalls
        table.resume_step[slot[plan.stalls]] = self.step_index + 1 + self.policy.stall_steps
        table.window_ready[slot[plan.emits]] = True
        self.step_index += 1
