"""Per-step engine metrics: where time goes (host vs waiting on the device) and what each step carried."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass
class StepMetrics:
    step: int
    host_ms: float            # planning, batch building, dispatch and result processing (no waiting)
    dispatch_ms: float        # of host_ms: inside the jitted step's call (argument handling, enqueueing)
    wait_ms: float            # blocked on device results
    step_ms: float            # wall time of the engine iteration
    tokens: int               # query tokens fed
    prefill_rows: int
    draft_rows: int
    verify_rows: int          # verify rows with drafts
    decode_rows: int          # plain decode rows (verify without drafts)
    emitted_tokens: int       # output tokens read back during this iteration
    kv_tokens_used: int       # device KV pool in use (whole pages)
    kv_tokens_offloaded: int  # host KV pool in use
    compiled: bool = False    # XLA compiled during this iteration (a new step shape, or a first offload or
                              # restore program): its time includes the compile
    decode_steps: int = 1     # engine steps the iteration ran: 1, a burst's length (decode_burst.py), 0 when idle


class StepLog:
    def __init__(self):
        self.steps: list[StepMetrics] = []

    def add(self, metrics: StepMetrics) -> None:
        self.steps.append(metrics)

    def summary(self) -> dict[str, float]:
        """Means per engine step (a burst iteration counts as its steps; empty when no step ran)."""
        if not self.steps:
            return {}
        fields = ("host_ms", "dispatch_ms", "wait_ms", "step_ms", "tokens", "prefill_rows", "draft_rows", "verify_rows",
                  "decode_rows")
        num_steps = max(1, sum(s.decode_steps for s in self.steps))
        out = {f"mean_{name}": round(sum(getattr(s, name) for s in self.steps) / num_steps, 3) for name in fields}
        out["steps"] = num_steps
        out["iterations"] = len(self.steps)
        out["compile_steps"] = sum(s.compiled for s in self.steps)
        out["compile_steps_s"] = round(sum(s.step_ms for s in self.steps if s.compiled) / 1e3, 3)
        out["peak_kv_tokens_offloaded"] = max(s.kv_tokens_offloaded for s in self.steps)
        return out

    def write_jsonl(self, path: Path) -> None:
        with open(path, "w") as f:
            for metrics in self.steps:
                f.write(json.dumps(dataclasses.asdict(metrics)) + "\n")
