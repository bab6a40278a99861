"""Continuous batching: which requests run this step, with how many tokens, and KV page bookkeeping.

Every step, running requests go first (decode rows cost one token, prompt chunks up to the chunk size), then
waiting requests are admitted while batch slots, token budget and pages last. When pages run out, the most
recently admitted request is preempted: its pages are freed and it is recomputed later (prompt + output so
far), so nothing is ever dropped.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from sparsespec_jax.kv_cache import OutOfPagesError, PageAllocator
from sparsespec_jax.request import Request, RequestStatus


@dataclasses.dataclass
class ScheduledRow:
    request: Request
    num_tokens: int          # query tokens fed this step, starting at request.num_computed

    @property
    def completes(self) -> bool:
        """The row reaches the request's newest token, so its sample is a new output token."""
        return self.request.num_computed + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_batch_size: int, max_num_batched_tokens: int,
                 prefill_chunk_size: int, decode_lookahead: int = 0,
                 on_release: Callable[[Request], None] = lambda request: None):
        """decode_lookahead: extra positions a decode row may write this step (speculative drafts).
        on_release: called when a request gives up its pages (finished or preempted)."""
        self.allocator = allocator
        self.decode_lookahead = decode_lookahead
        self.on_release = on_release
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        self.allocator.release(request.pages)
        self.on_release(request)
        self.running.remove(request)
        request.status = RequestStatus.FINISHED

    def _tokens_for(self, request: Request, budget: int) -> int:
        return min(self.prefill_chunk_size, request.num_tokens - request.num_computed, budget)

    def _preempt(self, victim: Request) -> None:
        self.allocator.release(victim.pages)
        self.on_release(victim)
        self.running.remove(victim)
        victim.status = RequestStatus.WAITING
        victim.num_computed = 0
        victim.stats.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> list[ScheduledRow]:
        rows: list[ScheduledRow] = []
        budget = self.max_num_batched_tokens
        # Decode rows first (one token each), then running prompt chunks, in admission order.
        ordered = sorted(self.running, key=lambda r: r.is_prefilling)
        for request in ordered:
            if request.status is not RequestStatus.RUNNING:
                continue                               # preempted earlier in this loop
            n = self._tokens_for(request, budget)
            if n <= 0:
                continue
            lookahead = self.decode_lookahead if request.num_tokens - request.num_computed == 1 else 0
            while True:
                try:
                    self.allocator.grow(request.pages, request.num_computed + n + lookahead)
                    break
                except OutOfPagesError:
                    victim = self.running[-1]
                    rows = [row for row in rows if row.request is not victim]
                    self._preempt(victim)
                    if victim is request:
                        break
            if request.status is RequestStatus.RUNNING:
                rows.append(ScheduledRow(request, n))
                budget -= n
        budget = self.max_num_batched_tokens - sum(row.num_tokens for row in rows)
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            request = self.waiting[0]
            n = self._tokens_for(request, budget)
            lookahead = self.decode_lookahead if request.num_tokens - request.num_computed == 1 else 0
            if self.allocator.pages_needed(n + lookahead, 0) > self.allocator.num_free:
                break
            self.waiting.popleft()
            self.allocator.grow(request.pages, n + lookahead)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            rows.append(ScheduledRow(request, n))
            budget -= n
        return rows
