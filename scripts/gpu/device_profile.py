"""Where a steady-state step's device time goes on a GPU: kernels by total time per step, from a jax.profiler
trace of a short window (vanilla and pillar, Qwen3-1.7B-shaped random bf16, 128 requests at 2048 tokens).

  [UNROLL_LAYERS=on] PYTHONPATH=$PWD python scripts/gpu/device_profile.py [trace_dir]
"""

from __future__ import annotations

import collections
import glob
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sparsespec_jax.benchmark.shapes import QWEN3_1_7B, placeholder_tokenizer
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.spec.config import SpecConfig

REPLAY = (0.08, 0.05, 0.05, 0.05, 0.06, 0.07, 0.08, 0.10, 0.46)


def kernel_times(trace_dir: str) -> collections.Counter:
    """Total nanoseconds per kernel name over the device planes of the newest trace in trace_dir."""
    [path] = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1:]
    totals: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "Stream" not in line.name:
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns
    return totals


def profile(method: str, params, trace_dir: str, steps: int = 20) -> None:
    unroll = os.environ.get("UNROLL_LAYERS") == "on"
    config = EngineConfig(dtype="bfloat16", unroll_layers=unroll, max_batch_size=128, kv_cache_tokens=128 * 2400,
                          max_model_len=2400,
                          max_num_batched_tokens=128 * 9, min_batch_bucket=16, min_context_bucket=2400)
    spec = SpecConfig(method=method, k=8, replay_acceptance=REPLAY if method != "none" else None)
    engine = Engine(QWEN3_1_7B, params, placeholder_tokenizer(), config, spec)
    place_at_context(engine, 128, 2048, 300, seed=1)
    for _ in range(40):
        engine.step()
    engine.step()
    jax.block_until_ready(engine.kv.k)
    directory = f"{trace_dir}/{method}"
    with jax.profiler.trace(directory):
        for _ in range(steps):
            engine.step()
        jax.block_until_ready(engine.kv.k)
    totals = kernel_times(directory)
    window = engine.metrics.steps[-steps:]
    device_ms = sum(totals.values()) / 1e6 / steps
    print(f"\n== {method}: device kernels {device_ms:.2f} ms/step, wall {np.mean([s.step_ms for s in window]):.2f} "
          f"ms/step (host {np.mean([s.host_ms for s in window]):.2f}, of it dispatch "
          f"{np.mean([s.dispatch_ms for s in window]):.2f}), tokens/step {np.mean([s.tokens for s in window]):.0f}")
    for name, ns in totals.most_common(25):
        print(f"  {ns / 1e6 / steps:8.3f} ms  {100 * ns / sum(totals.values()):5.1f}%  {name[:110]}")


def main() -> None:
    trace_dir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/sparsespec-trace"
    params = random_params(QWEN3_1_7B, seed=0, dtype=jnp.bfloat16)
    for method in ("none", "pillar"):
        profile(method, params, trace_dir)


if __name__ == "__main__":
    main()
