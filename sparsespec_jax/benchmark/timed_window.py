"""A timed window of engine steps: warm up, time, leave compile steps out, count verifies by acceptance.

Every benchmark that times steady-state decoding does the same thing; a step during which XLA compiled would
otherwise charge its compile to throughput.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparsespec_jax.engine import Engine
from sparsespec_jax.step_metrics import StepMetrics


def compile_split(steps: list[StepMetrics]) -> tuple[list, list, float]:
    """(steady steps, compile steps, median ms of the steady steps): a compile step is one during which XLA
    compiled a program: a new step shape, or a first offload or restore (StepMetrics.compiled)."""
    steady = [s for s in steps if not s.compiled]
    compiled = [s for s in steps if s.compiled]
    median = float(np.median([s.step_ms for s in steady or steps]))
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
        return 1e3 * self.seconds / len(self.steady)

    def mean(self, field: str) -> float:
        """Mean of a StepMetrics field over the steady steps."""
        return float(np.mean([getattr(s, field) for s in self.steady]))


def time_window(engine: Engine, warmup: int, steps: int) -> TimedWindow:
    """Run `warmup` untimed steps, then `steps` timed ones."""
    for _ in range(warmup):
        engine.step()
    first = len(engine.metrics.steps)
    before = engine.acceptance_counts.copy()
    for _ in range(steps):
        engine.step()
    timed = engine.metrics.steps[first:]
    steady, compiled, median = compile_split(timed)
    return TimedWindow(timed, steady, compiled, median, engine.acceptance_counts - before)
