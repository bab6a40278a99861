"""Where a steady-state step's device time goes on a GPU: kernels by total time per step and launches per
step, from a jax.profiler trace of a short window, after an untraced window's wall, host and dispatch times.
Random weights and KV, requests placed at a context, acceptance replayed (the profile is about kernels, not
acceptance). Single decode steps by default: a profiler trace does not show the kernels inside a burst's loop.

  PYTHONPATH=$PWD python scripts/gpu/device_profile.py [--shape smollm2-shaped] [--batch 256] [--context 4096]
      [--methods none pillar] [--steps 20] [--burst-steps 1] [--trace-dir DIR]
      [--no-trace]
"""

from __future__ import annotations

import argparse
import collections
import gc
import glob
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")   # large pools, as in bench/e2e.py

import jax
import jax.numpy as jnp
import numpy as np

from sparsespec_jax.benchmark.shapes import SHAPES, placeholder_tokenizer
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.spec.config import SpecConfig

REPLAY = (0.08, 0.05, 0.05, 0.05, 0.06, 0.07, 0.08, 0.10, 0.46)
K = 8


def kernel_times(trace_dir: str) -> tuple[collections.Counter, int]:
    """Total nanoseconds per kernel name over the GPU planes of the newest trace, and the number of kernel
    launches."""
    [path] = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1:]
    by_kernel: collections.Counter = collections.Counter()
    launches = 0
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "Stream" not in line.name:
                continue
            for event in line.events:
                by_kernel[event.name] += event.duration_ns
                launches += 1
    return by_kernel, launches


def _record_layouts(engine: Engine) -> list:
    """Have the engine's step function note each call's packed layout (which compiled program it runs)."""
    layouts = []
    step_fn = engine._step_fn

    def noting(params, kv, state, buffer, layout):
        layouts.append(layout)
        return step_fn(params, kv, state, buffer, layout)

    engine._step_fn = noting
    return layouts


def print_dispatch_by_layout(window, layouts) -> None:
    """Median dispatch per compiled program, and on steps that switch program against steps that repeat one:
    tells whether command-buffer (graph) updates on program switches are what a step's dispatch costs."""
    ids = {layout: i for i, layout in enumerate(dict.fromkeys(layouts))}
    by_id = collections.defaultdict(list)
    for step, layout in zip(window, layouts):
        by_id[ids[layout]].append(step.dispatch_ms)
    for i, times in sorted(by_id.items()):
        print(f"  program {i}: {len(times)} steps, dispatch median {np.median(times):.2f} ms")
    switched = [s.dispatch_ms for s, a, b in zip(window[1:], layouts[1:], layouts) if a != b]
    repeated = [s.dispatch_ms for s, a, b in zip(window[1:], layouts[1:], layouts) if a == b]
    for name, times in (("switching", switched), ("repeating", repeated)):
        if times:
            print(f"  {name} program: {len(times)} steps, dispatch median {np.median(times):.2f} ms")


def profile(shape: str, method: str, params, batch: int, context: int, trace_dir: str, trace: bool,
            steps: int = 20, burst_steps: int = 1) -> None:
    max_len = context + 400
    config = EngineConfig(dtype="bfloat16", max_batch_size=batch, kv_cache_tokens=batch * max_len,
                          max_model_len=max_len, max_num_batched_tokens=batch * (K + 1), min_context_bucket=max_len,
                          burst_steps=burst_steps)
    spec = SpecConfig(method=method, k=K, replay_acceptance=REPLAY if method != "none" else None)
    engine = Engine(SHAPES[shape], params, placeholder_tokenizer(), config, spec)
    place_at_context(engine, batch, context, 300, seed=1)
    layouts = _record_layouts(engine)
    for _ in range(40):
        engine.step()
    jax.block_until_ready(engine.kv.k)
    # Untraced first: tracing changes what it measures (XLA turns command buffers off while profiling).
    for _ in range(steps):
        engine.step()
    window = engine.metrics.steps[-steps:]
    print(f"\n== {shape} B{batch} L{context} {method} untraced: wall {np.median([s.step_ms for s in window]):.2f} "
          f"ms/step (host {np.median([s.host_ms for s in window]):.2f}, of it dispatch "
          f"{np.median([s.dispatch_ms for s in window]):.2f}; medians), emitted/step "
          f"{np.mean([s.emitted_tokens for s in window]):.0f}")
    print_dispatch_by_layout(window, layouts[-steps:])
    if not trace:
        return
    directory = f"{trace_dir}/{method}"
    with jax.profiler.trace(directory):
        for _ in range(steps):
            engine.step()
        jax.block_until_ready(engine.kv.k)
    by_kernel, launches = kernel_times(directory)
    window = engine.metrics.steps[-steps:]
    total = sum(by_kernel.values())
    print(f"\n== {shape} B{batch} L{context} {method}: device kernels {total / 1e6 / steps:.2f} ms/step, "
          f"{launches / steps:.0f} launches/step, wall {np.mean([s.step_ms for s in window]):.2f} ms/step "
          f"(host {np.mean([s.host_ms for s in window]):.2f}, of it dispatch "
          f"{np.mean([s.dispatch_ms for s in window]):.2f}), tokens fed/step {np.mean([s.tokens for s in window]):.0f}")
    for name, ns in by_kernel.most_common(40):
        print(f"  {ns / 1e6 / steps:8.3f} ms  {100 * ns / total:5.1f}%  {name[:120]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-1.7b-shaped", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--methods", nargs="+", default=["none", "pillar"])
    parser.add_argument("--trace-dir", default="/tmp/sparsespec-trace")
    parser.add_argument("--steps", type=int, default=20, help="steps per window")
    parser.add_argument("--burst-steps", type=int, default=1, help="decode steps per jitted call (decode_burst.py)")
    parser.add_argument("--no-trace", action="store_true", help="only the untraced window's wall/host/dispatch")
    args = parser.parse_args()
    params = random_params(SHAPES[args.shape], seed=0, dtype=jnp.bfloat16)
    for method in args.methods:
        profile(args.shape, method, params, args.batch, args.context, args.trace_dir, not args.no_trace,
                args.steps, args.burst_steps)
        gc.collect()         # an engine left in a reference cycle (a traceback) frees its KV pool


if __name__ == "__main__":
    main()
