"""Continuous batching with speculative cycles: which rows run this step, and KV page bookkeeping.

Row kinds: PREFILL (a prompt chunk, or a preempted request's recomputed prefix), DRAFT (one draft step) and
VERIFY (the newest token plus the cycle's drafts; without drafts it is a plain decode). A speculative request
cycles through k DRAFT rows and one VERIFY row. After a verify with drafts the request sits out (STALL) until
the host has read how many tokens were accepted; everything else advances deterministically, so the host can
plan a step before it knows the previous step's tokens.

Unified scheduling (default) staggers requests: each request's first cycle is shortened so its verify lands in
the least-loaded phase, which keeps about 1/(cycle length) of the batch verifying at every step and the token
count per step flat. Phased scheduling aligns every verify to the same step (the classic sequential rounds).

When KV pages run out, the most recently admitted request is evicted: its KV goes to host memory if the host
pool has room (restored before any new admission), otherwise it is preempted and recomputed later. Nothing
is ever dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Callable, Sequence

from sparsespec_jax.kv_cache import OutOfPagesError, PageAllocator
from sparsespec_jax.request import Request, RequestStatus

SCHEDULER_MODES = ("unified", "phased")


class RowKind(enum.Enum):
    PREFILL = "prefill"
    DRAFT = "draft"
    VERIFY = "verify"


@dataclasses.dataclass(eq=False)
class ScheduledRow:
    request: Request
    kind: RowKind
    start: int                    # position of the first token fed
    num_tokens: int               # tokens fed this step
    draft_index: int = 0          # DRAFT: index of the draft this step samples
    num_drafts: int = 0           # DRAFT / VERIFY: drafts in the row's cycle
    cycle_start: int = 0          # DRAFT / VERIFY: position of the cycle's newest committed token
    sparse: bool = False          # DRAFT: attends to the request's token set (else full attention)
    refresh: bool = False         # VERIFY: renews the request's token set
    proposal: tuple[int, ...] | None = None  # VERIFY: host-made drafts (n-gram), None for model drafts
    emits: bool = False           # the row's sample becomes output
    phase: int | None = None      # a first cycle's chosen verify phase (step index mod cycle length)
    epoch: int = 0                # request.epoch when planned; results of older epochs are ignored

    @property
    def stalls(self) -> bool:
        """The host must read this row's result before the request can be planned again: the accepted count
        decides what follows, and host-made drafts need every token so far."""
        return self.kind is RowKind.VERIFY and (self.num_drafts > 0 or self.proposal is not None)


@dataclasses.dataclass(frozen=True)
class CyclePolicy:
    """k drafts per cycle; drafts_with_model: DRAFT rows exist (pillar, streaming) rather than host proposals."""

    k: int = 0
    drafts_with_model: bool = False
    mode: str = "unified"
    stall_steps: int = 1          # steps a request sits out after a verify (0 when the host syncs every step)
    propose: Callable[[Sequence[int], int], list[int]] | None = None    # host drafts (n-gram)

    @property
    def cycle_length(self) -> int:
        return self.k + 1 + self.stall_steps


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_batch_size: int, max_num_batched_tokens: int,
                 prefill_chunk_size: int, max_model_len: int, policy: CyclePolicy = CyclePolicy(),
                 evict: Callable[[Request], bool] | None = None, restore: Callable[[Request], None] | None = None):
        """evict(request) -> True if it moved the request's KV to host memory (else it is preempted);
        restore(request) writes an offloaded request's KV back into its newly granted pages."""
        if policy.mode not in SCHEDULER_MODES:
            raise ValueError(f"scheduler: must be one of {SCHEDULER_MODES}, got {policy.mode!r}")
        self.allocator = allocator
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.max_model_len = max_model_len
        self.policy = policy
        self.evict = evict
        self.restore = restore
        self.waiting: collections.deque[Request] = collections.deque()
        self.offloaded: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_slots = list(range(max_batch_size - 1, -1, -1))
        self.num_preemptions = 0
        self.num_offloads = 0
        self.step_index = 0

    # -- membership ------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.offloaded)

    def _leave(self, request: Request) -> None:
        self.allocator.release(request.pages)
        self.free_slots.append(request.slot)
        request.slot = None
        request.epoch += 1
        request.end_cycle()
        request.phase = None
        request.pending = 0
        request.awaiting = False
        self.running.remove(request)

    def finish(self, request: Request) -> None:
        self._leave(request)
        request.status = RequestStatus.FINISHED

    def _evict(self, victim: Request) -> None:
        """Free a victim's pages: offload its KV to host memory if possible, else preempt it (recompute)."""
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

    def admit(self, request: Request) -> None:
        """Give a request a slot and make it running (its pages are granted by the caller)."""
        request.slot = self.free_slots.pop()
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    # -- planning --------------------------------------------------------------------------------------
    def _room(self, request: Request) -> int:
        """Tokens the request may still emit given its limits and the tokens already on their way."""
        total = request.num_tokens + request.pending
        return min(request.params.max_tokens - len(request.output_ids) - request.pending,
                   self.max_model_len - total)

    def _phase_loads(self) -> list[int]:
        loads = [0] * self.policy.cycle_length
        for request in self.running:
            if request.phase is not None:
                loads[request.phase] += 1
        return loads

    def _first_cycle_drafts(self, limit: int, loads: list[int]) -> int:
        """Drafts of a request's next cycle so that its verify lands in the chosen phase."""
        length = self.policy.cycle_length
        if self.policy.mode == "phased":
            return min(limit, (length - 1 - self.step_index) % length)
        return min(range(limit + 1), key=lambda j: (loads[(self.step_index + j) % length], -j))

    def _next_row(self, request: Request, budget: int, loads: list[int]) -> ScheduledRow | None:
        """The request's row for this step (not yet applied), or None if it sits this step out."""
        if request.awaiting:
            return None
        total = request.num_tokens + request.pending
        if request.num_computed < total - 1:                     # prompt (or recomputed prefix) chunk
            n = min(self.prefill_chunk_size, total - request.num_computed, budget)
            if n <= 0:
                return None
            return ScheduledRow(request, RowKind.PREFILL, request.num_computed, n,
                                emits=request.num_computed + n == total)
        room = self._room(request)
        if room <= 0 or budget <= 0:
            return None
        policy = self.policy
        start = request.num_computed
        if policy.k == 0:
            return ScheduledRow(request, RowKind.VERIFY, start, 1, cycle_start=start, emits=True)
        if not policy.drafts_with_model:                          # host proposals: one verify per cycle
            proposal = ()
            if request.pending == 0 and room > 1:
                proposal = tuple(policy.propose(request.all_ids, min(policy.k, room - 1)))
            if len(proposal) + 1 > budget:
                proposal = proposal[:budget - 1]
            return ScheduledRow(request, RowKind.VERIFY, start, len(proposal) + 1, num_drafts=len(proposal),
                                cycle_start=start, proposal=proposal, emits=True)
        phase = None
        if request.draft_index is None:                          # a new cycle starts here
            limit = min(policy.k, room - 1)
            num_drafts = limit
            if request.phase is None or policy.mode == "phased":
                num_drafts = self._first_cycle_drafts(limit, loads)
                phase = (self.step_index + num_drafts) % policy.cycle_length
            draft_index, cycle_start = 0, start
        else:
            num_drafts, draft_index, cycle_start = request.cycle_drafts, request.draft_index, request.cycle_start
        if draft_index < num_drafts:
            return ScheduledRow(request, RowKind.DRAFT, cycle_start + draft_index, 1, draft_index=draft_index,
                                num_drafts=num_drafts, cycle_start=cycle_start, sparse=request.has_sets,
                                phase=phase)
        if num_drafts + 1 > budget:
            return None
        return ScheduledRow(request, RowKind.VERIFY, cycle_start, num_drafts + 1, num_drafts=num_drafts,
                            cycle_start=cycle_start, refresh=True, emits=True, phase=phase)

    def _pages_for(self, row: ScheduledRow) -> int:
        """Tokens the request's page table must cover for this row (a cycle's first row reserves the cycle)."""
        if row.kind is RowKind.PREFILL:
            return row.start + row.num_tokens
        return row.cycle_start + row.num_drafts + 1

    def pages_short(self) -> bool:
        """Whether this step might need more pages than are free (so an eviction may be ahead): an upper bound
        of every running request's growth, whatever its next row turns out to be."""
        needed = 0
        for request in self.running:
            prefilling = request.num_computed < request.num_tokens + request.pending - 1
            target = request.num_computed + (self.prefill_chunk_size if prefilling else self.policy.k + 1)
            needed += self.allocator.pages_needed(target, len(request.pages))
        return needed > self.allocator.num_free

    def schedule(self) -> list[ScheduledRow]:
        """Plan this step's rows (call apply() once they are dispatched). Evicting needs every running
        request's state known to the host: callers settle pending results first when pages_short()."""
        rows: list[ScheduledRow] = []
        budget = self.max_num_batched_tokens
        loads = self._phase_loads()
        # Decoding requests first (verify, draft and plain decode rows), then prompt chunks, in admission order.
        for request in sorted(self.running, key=lambda r: r.num_computed < r.num_tokens + r.pending - 1):
            if request.status is not RequestStatus.RUNNING:
                continue                                          # evicted earlier in this loop
            row = self._next_row(request, budget, loads)
            if row is None:
                continue
            if row.phase is not None and request.phase is None:
                loads[row.phase] += 1
            while True:
                try:
                    self.allocator.grow(request.pages, self._pages_for(row))
                    break
                except OutOfPagesError:
                    victim = self.running[-1]                # the most recently admitted, maybe `request`
                    if victim.pending or victim.awaiting:
                        raise RuntimeError(f"request {victim.request_id} evicted with results in flight; "
                                           f"settle them first (pages_short)")
                    rows = [r for r in rows if r.request is not victim]
                    self._evict(victim)
                    if victim is request:
                        break
            if request.status is RequestStatus.RUNNING:
                rows.append(row)
                budget -= row.num_tokens
        budget = self.max_num_batched_tokens - sum(row.num_tokens for row in rows)
        while self.offloaded and self.free_slots:
            request = self.offloaded[0]
            if self.allocator.pages_needed(request.num_computed + self.policy.k + 1, 0) > self.allocator.num_free:
                break
            self.offloaded.popleft()
            self.admit(request)
            self.allocator.grow(request.pages, request.num_computed)
            self.restore(request)
        while self.waiting and not self.offloaded and self.free_slots and budget > 0:
            request = self.waiting[0]
            n = min(self.prefill_chunk_size, request.num_tokens - request.num_computed, budget)
            if self.allocator.pages_needed(n, 0) > self.allocator.num_free:
                break
            self.waiting.popleft()
            self.admit(request)
            self.allocator.grow(request.pages, n)
            rows.append(ScheduledRow(request, RowKind.PREFILL, 0, n, emits=n == request.num_tokens))
            budget -= n
        for row in rows:
            row.epoch = row.request.epoch
        return rows

    def apply(self, rows: list[ScheduledRow]) -> None:
        """Advance host-side request state for rows just dispatched."""
        for row in rows:
            request = row.request
            request.stats.steps += 1
            if row.kind is RowKind.PREFILL:
                request.num_computed += row.num_tokens
            elif row.kind is RowKind.DRAFT:
                if row.draft_index == 0:
                    request.cycle_start, request.cycle_drafts = row.cycle_start, row.num_drafts
                request.draft_index = row.draft_index + 1
            else:
                request.end_cycle()
                request.has_sets = request.has_sets or self.policy.drafts_with_model
            if row.phase is not None:
                request.phase = row.phase
            if row.emits and not row.stalls:
                request.pending += 1
                if row.kind is RowKind.VERIFY:
                    request.num_computed += 1
            request.awaiting = row.stalls
        self.step_index += 1
