"""Where a steady-state step's host time goes on a GPU: per-phase wall time, jit cache growth, and a cProfile.

Qwen3-1.7B-shaped random bf16 weights, 128 requests placed at 2048 tokens, vanilla and pillar (replayed
acceptance). Phases are timed by wrapping the engine's own calls, so the numbers are what the engine spends.

  PYTHONPATH=$PWD python scripts/gpu/host_profile.py
"""

from __future__ import annotations

import collections
import cProfile
import pstats
import time

import jax.numpy as jnp
import numpy as np

import sparsespec_jax.engine as engine_module
from sparsespec_jax.benchmark.shapes import QWEN3_1_7B, placeholder_tokenizer
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.spec.config import SpecConfig

REPLAY = (0.08, 0.05, 0.05, 0.05, 0.06, 0.07, 0.08, 0.10, 0.46)


def timed(owner, name: str, label: str, totals: dict) -> None:
    """Replace owner.name by a wrapper adding its wall time to totals[label]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - started

    setattr(owner, name, wrapper)


def profile(method: str, params, steps: int = 60) -> None:
    config = EngineConfig(dtype="bfloat16", max_batch_size=128, kv_cache_tokens=128 * 2400, max_model_len=2400,
                          max_num_batched_tokens=128 * 9, min_batch_bucket=16, min_context_bucket=2400)
    spec = SpecConfig(method=method, k=8, replay_acceptance=REPLAY if method != "none" else None)
    engine = Engine(QWEN3_1_7B, params, placeholder_tokenizer(), config, spec)
    jitted = engine._step_fn
    totals = collections.defaultdict(float)
    for owner, name, label in ((engine.scheduler, "schedule", "schedule"), (engine.scheduler, "apply", "apply"),
                               (engine_module, "build_unified_batch", "build"), (engine_module, "pack", "pack"),
                               (engine, "_step_fn", "dispatch"), (engine, "_read", "read (incl. wait)"),
                               (engine.scheduler, "pages_short", "pages_short")):
        timed(owner, name, label, totals)
    place_at_context(engine, 128, 2048, 300, seed=1)
    for _ in range(40):
        engine.step()
    cache_before = jitted._cache_size()
    totals.clear()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    window = engine.metrics.steps[-steps:]
    print(f"\n== {method}: host {np.median([s.host_ms for s in window]):.2f} ms/step (median), blocked "
          f"{np.median([s.wait_ms for s in window]):.2f}, tokens/step {np.mean([s.tokens for s in window]):.0f}, "
          f"jit cache {cache_before} -> {jitted._cache_size()}")
    print("   per step, ms: " + "  ".join(f"{label} {1e3 * total / steps:.3f}" for label, total in totals.items()))
    pstats.Stats(profiler).sort_stats("cumtime").print_stats(18)


def main() -> None:
    params = random_params(QWEN3_1_7B, seed=0, dtype=jnp.bfloat16)
    for method in ("none", "pillar"):
        profile(method, params)


if __name__ == "__main__":
    main()
