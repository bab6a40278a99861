"""On a GPU: the PillarAttn score pass of one step (every layer's verify rows in one launch, as the engine runs
it) over tile configurations, at a model's head shape, against the copy bandwidth measured in the same run.
Random bf16 K, queries and LSEs; each row's pages scattered over a pool of the model's full depth (a shallower
pool re-read by several layers would be served partly from L2).

  PYTHONPATH=$PWD python scripts/gpu/score_sweep.py [--model smollm2] [--rows 24] [--context 7680]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.pillar_scores import pillar_scores_paged
from sparsespec_jax.benchmark.roofline import copy_bandwidth

MODELS = {"smollm2": dict(hq=9, hkv=3, d=64, layers=30), "qwen3-1.7b": dict(hq=16, hkv=8, d=128, layers=28),
          "qwen3-8b": dict(hq=32, hkv=8, d=128, layers=36)}
PAGE_SIZE = 16
QUERIES = 9                                    # k + 1 verify queries per row at k = 8
# (block_kv, num_warps, num_stages, kv_splits); None: the kernel's own choice
VARIANTS = [(None, 4, 2, None), (64, 4, 2, None), (128, 4, 3, None), (128, 8, 2, None), (128, 4, 1, None),
            (256, 4, 2, None), (256, 8, 2, None), (256, 8, 3, None), (128, 4, 2, 2), (64, 2, 2, None),
            (128, 2, 2, None), (32, 4, 4, None)]


def inputs(model: dict, rows: int, context: int, seed: int = 0):
    key = jax.random.key(seed)
    pages = -(-context // PAGE_SIZE)
    pool = (model["layers"], model["hkv"], (rows * pages + 1) * PAGE_SIZE, model["d"])
    k_pool = jax.random.normal(jax.random.fold_in(key, 0), pool, jnp.bfloat16)
    tables = (jax.random.permutation(jax.random.fold_in(key, 1), rows * pages) + 1).reshape(rows, pages)
    tokens = rows * QUERIES
    q = jax.random.normal(jax.random.fold_in(key, 2), (model["layers"], tokens, model["hq"], model["d"]),
                          jnp.bfloat16)
    lse = jax.random.normal(jax.random.fold_in(key, 3), (model["layers"], tokens, model["hq"]), jnp.float32) + 9.0
    return dict(q=q, k_pool=k_pool, layers=jnp.arange(model["layers"], dtype=jnp.int32),
                q_start=jnp.arange(rows, dtype=jnp.int32) * QUERIES, q_len=jnp.full((rows,), QUERIES, jnp.int32),
                kv_len=jnp.full((rows,), context, jnp.int32), page_tables=tables.astype(jnp.int32), lse=lse)


def median_ms(fn, args: dict, reps: int = 20) -> float:
    jax.block_until_ready(fn(**args))
    jax.block_until_ready(fn(**args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(**args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--context", type=int, default=7680)
    args = parser.parse_args()
    model = MODELS[args.model]
    bandwidth = copy_bandwidth(2 ** 31)["bytes_per_s"]
    data = inputs(model, args.rows, args.context)
    k_bytes = model["layers"] * args.rows * model["hkv"] * args.context * model["d"] * 2
    print(f"{args.model} rows {args.rows} context {args.context} layers {model['layers']}: K re-read "
          f"{k_bytes / 1e9:.2f} GB; copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"({1e3 * k_bytes / bandwidth:.3f} ms at it)")
    names = ("block_kv", "num_warps", "num_stages", "kv_splits")
    for variant in VARIANTS:
        options = {name: value for name, value in zip(names, variant) if value is not None}
        fn = jax.jit(lambda **a: pillar_scores_paged(**a, page_size=PAGE_SIZE, max_q_len=QUERIES, **options))
        try:
            ms = median_ms(fn, data)
        except Exception as error:      # a configuration Triton cannot compile (registers, shared memory)
            print(f"  {variant}: failed ({type(error).__name__}: {str(error)[:100]})")
            continue
        print(f"  {variant}: {ms:.3f} ms  {k_bytes / ms / 1e9:.2f} TB/s  {k_bytes / ms / 1e9 / (bandwidth / 1e12):.0%}")


if __name__ == "__main__":
    main()
