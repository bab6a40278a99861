"""A timed window of engine steps: warm up, time, leave compile steps out, count verifies by acceptance.

Every benchmark that times steady-state decoding does the same thing; a step during which XLA compiled would
otherwise charge its compile to throughput.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparsespec_jax.engine import Engine
from sparsespec_jax.step_metrics import StepMetrics


def per_step(steps: list[StepMetrics], field: str) -> float:
    """A StepMetrics field per engine step: a burst iteration (decode_burst.py) counts as its steps."""
    return sum(getattr(s, field) for s in steps) / max(1, sum(s.decode_steps for s in steps))


def run_steps(engine: Engine, steps: int) -> None:
    """Iterate the engine until it has run `steps` engine steps (an idle iteration counts as one)."""
    done = 0
    while done < steps:
        engine.step()
        done += max(1, engine.metrics.steps[-1].decode_steps)


def compile_split(steps: list[StepMetrics]) -> tuple[list, list, float]:
    """(steady steps, compile steps, median ms per engine step of the steady ones): a compile step is one during
    which XLA compiled a program: a new step shape, or a first offload or restore (StepMetrics.compiled)."""
    steady = [s for s in steps if not s.compiled]
    compiled = [s for s in steps if s.compiled]
    median = float(np.median([s.step_ms / max(1, s.decode_steps) for s in steady or steps]))
    return steady, compiled, median


def acceptance_summary(counts: np.ndarray) -> dict:
    """Histogram of verifies (rows that verified at least one draft) by drafts accepted (0..k), and the mean
    accepted per verify."""
    counts = np.asarray(counts, np.int64)
    verifies = int(counts.sum())
    mean = float((np.arange(len(counts)) * counts).sum() / verifies) if verifies else 0.0
    return {"verifies": verifies, "accepted_per_verify": mean, "acceptance_histogram": counts.tolist()}


@dataclasses.dataclass
class TimedWindow:
    steps: list[StepMetrics]          # every timed step
    steady: list[StepMetrics]         # the timed steps that compiled nothing
    compiled: list[StepMetrics]
    median_ms: float
    acceptance_counts: np.ndarray     # verifies in the window by drafts accepted

    @property
    def seconds(self) -> float:
        return sum(s.step_ms for s in self.steady) / 1e3

    @property
    def tokens_per_s(self) -> float:
        return sum(s.emitted_tokens for s in self.steady) / self.seconds

    @property
    def step_ms(self) -> float:
        return per_step(self.steady, "step_ms")

    def mean(self, field: str) -> float:
        """A StepMetrics field per engine step over the steady iterations."""
        return per_step(self.steady, field)


def time_window(engine: Engine, warmup: int, steps: int) -> TimedWindow:
    """Run `warmup` untimed engine steps, then `steps` timed ones (whole bursts: a window may run a few more)."""
    run_steps(engine, warmup)
    first = len(engine.metrics.steps)
    before = engine.acceptance_counts.copy()
    run_steps(engine, steps)
    timed = engine.metrics.steps[first:]
    steady, compiled, median = compile_split(timed)
    return TimedWindow(timed, steady, compiled, median, engine.acceptance_counts - before)
