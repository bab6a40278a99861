"""Host-side state of one generation request, and the result handed back to the caller."""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any

import numpy as np


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # not admitted yet, or preempted (its KV freed; recomputed on return)
    RUNNING = "running"      # owns KV pages and a batch slot
    OFFLOADED = "offloaded"  # its KV waits in host memory to be restored
    FINISHED = "finished"


@dataclasses.dataclass
class RequestStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    steps: int = 0                 # engine iterations this request took part in
    preemptions: int = 0
    offloads: int = 0              # times its KV went to host memory and came back
    # Counted per slot while it runs and added here when it leaves a slot (finished, evicted or preempted):
    drafted_tokens: int = 0        # speculative drafts proposed
    accepted_tokens: int = 0       # drafts accepted by verification
    verifies: int = 0              # rows that verified at least one draft (each emits accepted + 1 tokens)
    decodes: int = 0               # tokens of rows without drafts (plain decoding)

    @property
    def acceptance_mean(self) -> float | None:
        return self.accepted_tokens / self.verifies if self.verifies else None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["acceptance_mean"] = self.acceptance_mean
        out["latency_s"] = (self.finish_time - self.arrival_time) if self.finish_time else None
        out["ttft_s"] = (self.first_token_time - self.arrival_time) if self.first_token_time else None
        return out


@dataclasses.dataclass
class RequestOutput:
    """What generate() returns per prompt, in input order."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" (EOS / stop string / stop token) or "length"
    stats: RequestStats

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.request_id, "text": self.text, "finish_reason": self.finish_reason,
                "prompt_tokens": len(self.prompt_token_ids), "output_tokens": len(self.token_ids),
                "token_ids": self.token_ids, "stats": self.stats.as_dict()}


class Request:
    """A prompt being generated: its tokens, how much of them the KV cache holds, and its pages."""

    def __init__(self, request_id: str, prompt: str, prompt_ids: list[int], params, detokenizer, seed: int,
                 stop_ids: frozenset[int] = frozenset()):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seed = seed
        self.stop_ids = stop_ids       # token ids that end the output (EOS unless ignored, stop_token_ids)
        self.detokenizer = detokenizer
        self.output_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.slot: int | None = None   # its entry in the slot table and the device slot state while running
        # While running, the slot table holds these; they are parked here while the request waits or is offloaded.
        self.num_computed = 0          # leading positions whose K/V are in the cache
        self.has_sets = False          # its draft token set exists (after the first verify)
        self.offloaded_kv = None       # its KV in host memory while OFFLOADED
        self.finish_reason: str | None = None
        self._stats = RequestStats(prompt_tokens=len(prompt_ids), arrival_time=time.perf_counter())
        self._history = np.asarray(self.prompt_ids, np.int64)   # token_history()'s array, grown on demand
        self._history_length = len(self.prompt_ids)

    @property
    def stats(self) -> RequestStats:
        """Its statistics, output_tokens brought up to date (the engine appends tokens without touching them)."""
        self._stats.output_tokens = len(self.output_ids)
        return self._stats

    def token_history(self) -> np.ndarray:
        """All its tokens as an int64 array (a view, valid until the next call). Outputs are only ever
        appended, so each call converts just the tokens added since the last one, not the whole context."""
        total = len(self.prompt_ids) + len(self.output_ids)
        if total > len(self._history):
            grown = np.empty(max(total, 2 * len(self._history)), np.int64)
            grown[:self._history_length] = self._history[:self._history_length]
            self._history = grown
        if total > self._history_length:
            added = self.output_ids[self._history_length - len(self.prompt_ids):]
            self._history[self._history_length:total] = added
            self._history_length = total
        return self._history[:total]

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens at positions [start, stop) (stop <= num_tokens), without joining prompt and output."""
        prompt_len = len(self.prompt_ids)
        if stop <= prompt_len:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - prompt_len):stop - prompt_len]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def to_output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, self.detokenizer.text,
                             list(self.output_ids), self.finish_reason or "length", self.stats)
