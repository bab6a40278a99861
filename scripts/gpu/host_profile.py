"""Where a steady-state step's host time goes: per-phase wall time, jit cache growth, and optionally a cProfile.
With --burst-steps S the engine runs S decode steps per jitted call; everything is reported per engine step.

Random weights of a paper-scale shape (sparsespec_jax/benchmark/shapes.py), `--batch` requests placed at
`--context` tokens, vanilla and pillar (replayed acceptance). Phases are timed by wrapping the engine's own
calls, so the numbers are what the engine spends. "host - dispatch" is the host's own work per step: planning,
packing and reading results, without the jitted call and without waiting for the device.

  PYTHONPATH=$PWD python scripts/gpu/host_profile.py --shape smollm2-shaped --batch 256 --context 1024
  PYTHONPATH=$PWD python scripts/gpu/host_profile.py --layers 2 --hidden 64 --vocab 512   # a tiny model on CPU
  PYTHONPATH=$PWD python scripts/gpu/host_profile.py --tensor-parallel 2 --profile         # two GPUs
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import pstats
import time

import jax.numpy as jnp
import numpy as np

import sparsespec_jax.engine as engine_module
from sparsespec_jax.benchmark.shapes import SHAPES, placeholder_tokenizer
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.benchmark.timed_window import per_step, run_steps
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
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


def profile(method: str, cfg, params, args) -> None:
    batch, context = args.batch, args.context
    length = context + args.warmup + args.steps + 100
    config = EngineConfig(dtype=args.dtype, max_batch_size=batch, kv_cache_tokens=batch * length,
                          max_model_len=length, max_num_batched_tokens=batch * 9, min_context_bucket=length,
                          tensor_parallel=args.tensor_parallel, unroll_layers=args.unroll_layers,
                          burst_steps=args.burst_steps)
    spec = SpecConfig(method=method, k=8, replay_acceptance=REPLAY if method != "none" else None)
    engine = Engine(cfg, params, placeholder_tokenizer(), config, spec)
    jitted = engine._step_fn
    totals = collections.defaultdict(float)
    for owner, name, label in ((engine.scheduler, "schedule", "schedule"), (engine.scheduler, "apply", "apply"),
                               (engine_module, "build_unified_batch", "build"), (engine_module, "pack", "pack"),
                               (engine, "_sampling_arrays", "sampling"), (engine, "_read", "read (incl. wait)"),
                               (engine, "_record", "record"), (engine.scheduler, "pages_short", "pages_short"),
                               (engine, "_plan_burst", "plan burst"),
                               (engine, "_read_burst", "read burst (incl. wait)"),
                               (engine, "_record_burst", "record burst")):
        timed(owner, name, label, totals)
    new_tokens = args.warmup + args.steps + 50
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=new_tokens,
                              ignore_eos=True)
    place_at_context(engine, batch, context, new_tokens, seed=1, params=sampling)
    run_steps(engine, args.warmup)
    cache_before = jitted._cache_size()
    totals.clear()
    first = len(engine.metrics.steps)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    run_steps(engine, args.steps)
    if profiler:
        profiler.disable()
    window = engine.metrics.steps[first:]
    steps = sum(s.decode_steps for s in window)
    host, dispatch = per_step(window, "host_ms"), per_step(window, "dispatch_ms")
    print(f"\n== {method}, batch {batch}, context {context}, {args.burst_steps} steps per call: host {host:.3f} "
          f"ms/step (mean over {steps} steps), dispatch {dispatch:.3f}, host - dispatch {host - dispatch:.3f}, "
          f"blocked {per_step(window, 'wait_ms'):.2f}, tokens/step {per_step(window, 'tokens'):.0f}, "
          f"step {per_step(window, 'step_ms'):.3f} ms, "
          f"{1e3 * per_step(window, 'emitted_tokens') / per_step(window, 'step_ms'):.0f} emitted tok/s, "
          f"jit cache {cache_before} -> {jitted._cache_size()}")
    print("   per step, ms: " + "  ".join(f"{label} {1e3 * total / steps:.3f}" for label, total in totals.items()))
    if profiler:
        pstats.Stats(profiler).sort_stats("cumtime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-1.7b-shaped")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--layers", type=int, help="override the shape's layer count")
    parser.add_argument("--hidden", type=int, help="a narrow model: this hidden size, 2 heads, 1 KV head of 32")
    parser.add_argument("--vocab", type=int, help="override the shape's vocabulary size")
    parser.add_argument("--methods", nargs="+", default=["none", "pillar"])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="devices the engine's heads are split over")
    parser.add_argument("--unroll-layers", action="store_true", help="trace every layer into the step (no loop)")
    parser.add_argument("--burst-steps", type=int, default=1, help="decode steps per jitted call (decode_burst.py)")
    parser.add_argument("--temperature", type=float, default=0.0, help="every request's; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="every request's nucleus (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="every request's top-k (0 = off)")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the measured steps")
    args = parser.parse_args()
    cfg = SHAPES[args.shape]
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    if args.hidden:
        cfg = dataclasses.replace(cfg, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_heads=2,
                                  num_kv_heads=1, head_dim=32)
    if args.vocab:
        cfg = dataclasses.replace(cfg, vocab_size=args.vocab)
    params = random_params(cfg, seed=0, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    for method in args.methods:
        profile(method, cfg, params, args)


if __name__ == "__main__":
    main()
