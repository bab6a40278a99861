"""On a GPU: a decoder layer's projection GEMMs over token counts, separate against fused weights, every layer's
GEMMs one after another in one program, against the copy bandwidth of the same run.
Tells whether fused q/k/v and gate/up weights pay and how GEMM time moves with the token count. Times are the
wall time of a call, so they include every kernel's launch: compare rows and columns with each other, and take
a step's GEMM time from scripts/gpu/device_profile.py. Random bf16 weights and activations.

On an H200 (2026-11-29), Qwen3-8B, 218-272 tokens: q/k/v fused 2.35 ms against 2.9-3.3 separate, gate/up fused
3.3-3.6 against 3.5-4.0; no token count between 218 and 288 stood out.

  PYTHONPATH=$PWD python scripts/gpu/gemm_sweep.py [--model qwen3-8b] [--tokens 128 218 256 272]
"""

from __future__ import annotations

import argparse
import statistics
import time

import sparsespec_jax  # noqa: F401  (the engine's XLA flags, set on import)
import jax
import jax.numpy as jnp

from sparsespec_jax.benchmark.roofline import copy_bandwidth

MODELS = {"smollm2": dict(d=576, q=576, kv=192, f=1536, layers=30),
          "qwen3-1.7b": dict(d=2048, q=2048, kv=1024, f=6144, layers=28),
          "qwen3-8b": dict(d=4096, q=4096, kv=1024, f=12288, layers=36)}


def projections(m: dict) -> dict[str, list[tuple[int, int]]]:
    """Each variant's GEMMs per layer as (K, N) weight shapes."""
    return {"q,k,v separate": [(m["d"], m["q"]), (m["d"], m["kv"]), (m["d"], m["kv"])],
            "qkv fused": [(m["d"], m["q"] + 2 * m["kv"])],
            "o": [(m["q"], m["d"])],
            "gate,up separate": [(m["d"], m["f"]), (m["d"], m["f"])],
            "gate_up fused": [(m["d"], 2 * m["f"])],
            "down": [(m["f"], m["d"])]}


def layers_fn():
    """All layers' GEMMs of one variant, x [M, K] times each layer's weights, as separate kernels in one
    program (no loop, so no per-iteration synchronization to time); the products are returned, so none is
    dead."""

    def run(x, weights):
        return [x[:, :w.shape[0]] @ w for w in weights]

    return jax.jit(run)


def median_ms(fn, *args, reps: int = 30) -> float:
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b", choices=sorted(MODELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 192, 218, 224, 240, 256, 272, 288, 320])
    args = parser.parse_args()
    m = MODELS[args.model]
    key = jax.random.key(0)
    bandwidth = copy_bandwidth(2 ** 31 if jax.default_backend() == "gpu" else 2 ** 24)["bytes_per_s"]
    print(f"{args.model}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; ms per step over {m['layers']} layers "
          f"(floor: the weights read once at that bandwidth)")
    width = max(k for shapes in projections(m).values() for k, _ in shapes)
    rows = []
    for name, shapes in projections(m).items():
        weights = [jax.random.normal(jax.random.fold_in(key, layer * 8 + i), (k, n), jnp.bfloat16)
                   for layer in range(m["layers"]) for i, (k, n) in enumerate(shapes)]   # one buffer each
        floor = 1e3 * sum(w.size * 2 for w in weights) / bandwidth
        fn = layers_fn()
        times = []
        for tokens in args.tokens:
            x = jax.random.normal(jax.random.fold_in(key, 100 + tokens), (tokens, width), jnp.bfloat16)
            times.append(median_ms(fn, x, weights))
        rows.append((name, floor, times))
        del weights
    print(f"{'GEMMs':18s} {'floor':>7s} " + " ".join(f"{t:>7d}" for t in args.tokens))
    for name, floor, times in rows:
        print(f"{name:18s} {floor:7.3f} " + " ".join(f"{t:7.3f}" for t in times))


if __name__ == "__main__":
    main()
