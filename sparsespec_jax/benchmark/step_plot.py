"""Tokens fed per engine step over time, from per-step metrics (`--profile` JSONL or an engine's StepLog).

The picture the unified scheduler is for: phase-synchronous speculative decoding alternates steps of one draft
token per request with steps of k + 1 verify tokens per request, so its GEMM batch swings by (k + 1)x; staggered
cycles keep every step near B·(2k+1)/(k+1) tokens.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Mapping, Sequence

from sparsespec_jax.benchmark.jsonl import read_jsonl
from sparsespec_jax.step_metrics import StepMetrics


def read_profile(path: Path) -> list[dict]:
    """The per-step records of a `--profile` JSONL file; a line that is not a step record raises ValueError
    naming the file, the line and what is wrong with it."""
    records = []
    for number, record in read_jsonl(path):
        if not isinstance(record, dict) or "tokens" not in record:
            raise ValueError(f"{path}:{number}: step record without field 'tokens'")
        if not isinstance(record["tokens"], int) or record["tokens"] < 0:
            raise ValueError(f"{path}:{number}: field 'tokens' must be an integer >= 0, got {record['tokens']!r}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no step records")
    return records


def tokens_series(steps: Sequence[StepMetrics | Mapping]) -> list[float]:
    """Tokens fed per step, in step order; a burst iteration (decode_burst.py) gives its mean per step, once
    for each of its steps."""
    series = []
    for s in steps:
        record = s if isinstance(s, Mapping) else dataclasses.asdict(s)
        count = record.get("decode_steps", 1)
        series += [record["tokens"] / count] * count if count > 1 else [record["tokens"]]
    return series


def plot_tokens_per_step(series: Mapping[str, Sequence[int]], path: Path, title: str = "Tokens fed per step") -> Path:
    """One line per labelled series of tokens per step against the step's index in its series; writes a PNG."""
    if not series or any(len(values) == 0 for values in series.values()):
        raise ValueError("plot_tokens_per_step: need at least one non-empty series")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    for label, values in series.items():
        ax.plot(range(len(values)), values, label=f"{label} (mean {sum(values) / len(values):.0f})",
                linewidth=1.2, drawstyle="steps-mid")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens fed")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
