"""Scheduling state of the running requests as arrays indexed by batch slot, page tables included.

Planning a step touches every running request. Keeping each request's counters in one numpy entry per slot
turns that into a handful of array operations instead of a Python loop over requests, so the host's share of
a step stays small next to the device's. A request enters a slot when admitted and leaves it when it finishes
or is evicted; what must outlive an eviction (how much of it is computed, whether a draft set exists) goes
back to the Request object.
"""

from __future__ import annotations

import numpy as np

from sparsespec_jax.kv_cache import PADDING_PAGE, OutOfPagesError, PageAllocator
from sparsespec_jax.request import Request


def ragged_offsets(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs of the given lengths laid end to end: (run index, offset within the run) of every element."""
    run = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return run, np.arange(int(lengths.sum())) - starts[run]


class SlotTable:
    def __init__(self, num_slots: int, max_pages: int, allocator: PageAllocator):
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.requests: list[Request | None] = [None] * num_slots
        self.active = np.zeros(num_slots, bool)
        self.admitted = np.zeros(num_slots, np.int64)     # admission counter: larger is newer
        self.generation = np.zeros(num_slots, np.int64)   # bumped when the occupant leaves: older results are stale
        self.computed = np.zeros(num_slots, np.int64)     # leading positions whose K/V are written or on their way
        self.total = np.zeros(num_slots, np.int64)        # tokens the host knows plus those sampled, not yet read
        self.cap = np.zeros(num_slots, np.int64)          # most tokens the request may reach (max_tokens, context)
        self.pending = np.zeros(num_slots, np.int64)      # sampled tokens not read yet (outside stalled verifies)
        self.awaiting = np.zeros(num_slots, bool)         # a verify with drafts is in flight
        self.resume_step = np.zeros(num_slots, np.int64)  # first step after the one it sits out
        self.draft_index = np.full(num_slots, -1, np.int64)   # next draft step of the cycle; -1 between cycles
        self.cycle_start = np.zeros(num_slots, np.int64)  # position of the cycle's newest committed token
        self.cycle_drafts = np.zeros(num_slots, np.int64)
        self.phase = np.full(num_slots, -1, np.int64)     # step index (mod cycle length) its verifies land on
        self.has_sets = np.zeros(num_slots, bool)         # its draft token set exists
        self.window_ready = np.zeros(num_slots, bool)     # the device slot window holds its newest token
        self.steps = np.zeros(num_slots, np.int64)        # steps it took part in since admission
        self.decodes = np.zeros(num_slots, np.int64)      # tokens read from its rows without drafts since then
        self.verifies = np.zeros(num_slots, np.int64)     # its verifies with drafts read since then
        self.drafted = np.zeros(num_slots, np.int64)      # drafts those verifies checked
        self.accepted = np.zeros(num_slots, np.int64)     # drafts they accepted
        # One row more than slots: the spare slot's (index num_slots), all padding, which a batch's padding rows
        # gather so that page tables are built with one gather each.
        self.page_table = np.full((num_slots + 1, max_pages), PADDING_PAGE, np.int32)
        self.num_pages = np.zeros(num_slots, np.int64)
        self.temperature = np.zeros(num_slots, np.float32)
        self.top_p = np.ones(num_slots, np.float32)
        self.top_k = np.zeros(num_slots, np.int32)
        self.seed = np.zeros(num_slots, np.uint32)
        # Reading a step's tokens checks every emitting row at once; only rows that may finish (a stop token,
        # the length limit) or that match stop strings take the per-request path.
        self.recorded = np.zeros(num_slots, np.int64)     # tokens on the request (prompt and output read so far)
        self.stop_tokens = np.full((num_slots, 1), -1, np.int64)   # its stop token ids, padded with -1
        self.stop_strings = np.zeros(num_slots, bool)     # its output is matched against stop strings
        self.before_first_token = np.zeros(num_slots, bool)   # no output token read yet (time to first token)
        self._admissions = 0

    def assign(self, slot: int, request: Request, cap: int) -> None:
        """Seat a request (its parked computed length and draft-set flag come along); no pages yet."""
        params = request.params
        self._admissions += 1
        self.requests[slot] = request
        self.active[slot] = True
        self.admitted[slot] = self._admissions
        self.computed[slot] = request.num_computed
        self.total[slot] = request.num_tokens
        self.cap[slot] = cap
        self.pending[slot] = 0
        self.awaiting[slot] = False
        self.resume_step[slot] = 0
        self.draft_index[slot] = -1
        self.cycle_drafts[slot] = 0
        self.phase[slot] = -1
        self.has_sets[slot] = request.has_sets
        self.window_ready[slot] = False
        self.steps[slot] = 0
        self.decodes[slot] = self.verifies[slot] = self.drafted[slot] = self.accepted[slot] = 0
        self.temperature[slot], self.top_p[slot] = params.temperature, params.top_p
        self.top_k[slot], self.seed[slot] = max(params.top_k, 0), request.seed
        self.recorded[slot] = request.num_tokens
        stop_ids = sorted(request.stop_ids)
        if len(stop_ids) > self.stop_tokens.shape[1]:      # widen for the request with the most stop ids yet
            wider = np.full((len(self.stop_tokens), len(stop_ids)), -1, np.int64)
            wider[:, :self.stop_tokens.shape[1]] = self.stop_tokens
            self.stop_tokens = wider
        self.stop_tokens[slot] = -1
        self.stop_tokens[slot, :len(stop_ids)] = stop_ids
        self.stop_strings[slot] = request.detokenizer.matches_stop_strings
        self.before_first_token[slot] = request.stats.first_token_time is None

    def vacate(self, slot: int) -> Request:
        """Free the slot and its pages; park what outlives the stay on the request."""
        request = self.requests[slot]
        request.num_computed = int(self.computed[slot])
        request.has_sets = bool(self.has_sets[slot])
        stats = request.stats
        stats.steps += int(self.steps[slot])
        stats.decodes += int(self.decodes[slot])
        stats.verifies += int(self.verifies[slot])
        stats.drafted_tokens += int(self.drafted[slot])
        stats.accepted_tokens += int(self.accepted[slot])
        self.release_pages(slot)
        self.requests[slot] = None
        self.active[slot] = False
        self.generation[slot] += 1
        return request

    def prefilling(self, slots: np.ndarray) -> np.ndarray:
        """Whether each slot's next row is a prompt chunk: positions before the newest token lack K/V, or no
        step has put the newest token into the device window yet (decode rows read it from there)."""
        return (self.computed[slots] < self.total[slots] - 1) | ~self.window_ready[slots]

    # -- pages -----------------------------------------------------------------------------------------
    def pages(self, slot: int) -> np.ndarray:
        return self.page_table[slot, :self.num_pages[slot]]

    def pages_short_of(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Pages each slot still needs to cover `tokens` tokens."""
        return np.maximum(0, -(-tokens // self.page_size) - self.num_pages[slots])

    def grow(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Extend the slots' page tables to cover `tokens` tokens each (slots distinct)."""
        need = self.pages_short_of(slots, tokens)
        total = int(need.sum())
        if total == 0:
            return
        if total > self.allocator.num_free:
            raise OutOfPagesError(f"need {total} pages, {self.allocator.num_free} free")
        run, offset = ragged_offsets(need)
        rows = slots[run]
        self.page_table[rows, self.num_pages[rows] + offset] = self.allocator.take(total)
        self.num_pages[slots] += need

    def release_pages(self, slot: int) -> None:
        self.allocator.release(self.pages(slot))
        self.page_table[slot] = PADDING_PAGE
        self.num_pages[slot] = 0
