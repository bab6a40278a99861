"""Times the Pallas GPU kernels against their peers in one run, on random inputs, and prints a table last.

Peers: the jnp references (XLA gather + einsum), jax's own Pallas `ops.gpu.paged_attention` (decode only)
and `lax.top_k`. Shapes: Qwen3-8B-like (Hq 32, Hkv 8, D 128) and SmolLM2 (Hq 9, Hkv 3, D 64), bf16, page 16.
Each timing is the median over repetitions of a jitted call that runs the op on several input sets back to
back (different queries and page tables, so nothing is cached or deduplicated), divided by the set count.
"Effective TB/s" counts the bytes that must be read: K+V of every attended position (K only for scores,
the float32 scores for top-K) over the time.

    python bench/kernels.py [--budget-s 300] [--out results.md]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.paged_attention import ragged_paged_attention, ragged_paged_attention_reference  # noqa: E402
from pallas_kernels.pillar_scores import pillar_scores_paged, pillar_scores_paged_reference  # noqa: E402
from pallas_kernels.sparse_attention import sparse_decode_attention, sparse_decode_attention_reference  # noqa: E402
from pallas_kernels.topk_select import topk_select  # noqa: E402

MODELS = {"qwen3-8b": dict(hq=32, hkv=8, d=128, layers=36), "smollm2": dict(hq=9, hkv=3, d=64, layers=30)}
PAGE_SIZE = 16
POOL_LAYERS = 2
LAYER = 1
VERIFY_QUERIES = 9                  # k = 8 drafts + 1
SPARSE_FRACTION = 0.05
DTYPE = jnp.bfloat16
TARGETS_TBPS = {"verify": 3.6, "sparse": 2.5}
TOPK_TARGET_MS = 0.5

# (block_kv, num_warps, num_stages, kv_splits); None = the kernel's own choice, so DEFAULTS measures the defaults.
DEFAULTS = (None, 4, None, None)
ATTENTION_VARIANTS = [DEFAULTS, (32, 4, 4, None), (32, 4, 4, 1), (32, 4, 3, None), (32, 4, 5, None),
                      (16, 4, 6, None), (64, 4, 3, 1), (64, 4, 3, None)]
SPARSE_VARIANTS = [DEFAULTS, (32, 4, 3, 4), (32, 4, 2, 4), (32, 4, 3, 8), (16, 4, 4, 8), (64, 4, 3, 2), (32, 2, 3, 4),
                   (32, 4, 3, 2)]
SCORE_VARIANTS = [DEFAULTS, (64, 4, 2, None), (64, 4, 2, 2), (128, 4, 2, None), (64, 4, 3, None), (128, 8, 2, None),
                  (32, 4, 3, None)]
TOPK_WARPS = [4, 8]


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()


def median_seconds(fn, fixed, sets, *, reps):
    """Median wall time per op of `fn(*fixed, *set)` run for every set inside one jitted call."""
    many = jax.jit(lambda fixed, sets: [fn(*fixed, *s) for s in sets])
    jax.block_until_ready(many(fixed, sets))            # compile and warm up
    jax.block_until_ready(many(fixed, sets))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(many(fixed, sets))
        times.append((time.perf_counter() - start) / len(sets))
    return statistics.median(times)


def make_pool(model, slots, key):
    shape = (POOL_LAYERS, model["hkv"], slots, model["d"])
    k_key, v_key = jax.random.split(key)
    return jax.random.normal(k_key, shape, DTYPE), jax.random.normal(v_key, shape, DTYPE)


def paged_sets(model, batch, seq, queries, count, key, pool_pages):
    """Input sets of a uniform step: every row has `queries` new tokens and a context of `seq`."""
    pages = seq // PAGE_SIZE
    sets = []
    for i in range(count):
        q_key, p_key = jax.random.split(jax.random.fold_in(key, i))
        tables = jax.random.permutation(p_key, pool_pages)[: batch * pages].reshape(batch, pages).astype(jnp.int32)
        q = jax.random.normal(q_key, (batch * queries, model["hq"], model["d"]), DTYPE)
        q_start = jnp.arange(batch, dtype=jnp.int32) * queries
        q_len = jnp.full((batch,), queries, jnp.int32)
        kv_len = jnp.full((batch,), seq, jnp.int32)
        sets.append((q, q_start, q_len, kv_len, tables))
    return sets


def sparse_sets(model, batch, budget, count, key, pool_slots):
    sets = []
    for i in range(count):
        q_key, s_key = jax.random.split(jax.random.fold_in(key, i))
        slots = jax.random.randint(s_key, (batch, model["hkv"], budget), 0, pool_slots, jnp.int32)
        q = jax.random.normal(q_key, (batch, model["hq"], model["d"]), DTYPE)
        sets.append((q, slots, jnp.full((batch,), budget, jnp.int32)))
    return sets


def max_error(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    finite = np.isfinite(b)
    if (np.isfinite(a) != finite).any():
        return float("inf")
    return float(np.abs(a[finite] - b[finite]).max(initial=0.0))


class Bench:
    def __init__(self, deadline):
        self.deadline = deadline
        self.rows = []          # (op, model, shape, impl, config, ms, TB/s or None, note)
        self.log = []

    def record(self, op, model, shape, impl, config, seconds, nbytes, note=""):
        tbps = None if nbytes is None or seconds is None else nbytes / seconds / 1e12
        self.rows.append((op, model, shape, impl, config, None if seconds is None else seconds * 1e3, tbps, note))
        ms = "-" if seconds is None else f"{seconds * 1e3:.3f} ms"
        rate = "" if tbps is None else f"  {tbps:.2f} TB/s"
        print(f"  {op:8s} {model:9s} {shape:18s} {impl:24s} {config:22s} {ms}{rate} {note}", flush=True)

    def attempt(self, op, model, shape, impl, config, fn, fixed, sets, nbytes, *, reps=7, min_left=20.0):
        """Time one implementation; failures and the deadline are recorded, never fatal."""
        if self.deadline.left() < min_left:
            self.record(op, model, shape, impl, config, None, nbytes, "skipped (time budget)")
            return None
        try:
            seconds = median_seconds(fn, fixed, sets, reps=reps)
        except Exception as error:          # noqa: BLE001 - a failing variant must not stop the run
            lines = str(error).strip().splitlines()
            reason = lines[-1][:160] if lines else repr(error)
            self.record(op, model, shape, impl, config, None, nbytes, f"FAILED: {reason}")
            return None
        self.record(op, model, shape, impl, config, seconds, nbytes)
        return seconds


def variant_name(variant):
    if variant == DEFAULTS:
        return "defaults"
    block_kv, warps, stages, splits = variant
    return f"bk{block_kv or 'auto'} w{warps} s{stages or 'auto'} sp{'auto' if splits is None else splits}"


def automatic_splits(variant):
    """A swept tile configuration carried to another shape, whose split count the kernel picks itself."""
    return variant[:3] + (None,)


def tile_options(variant):
    """Keyword arguments of a variant, leaving out what the kernel should choose itself."""
    names = ("block_kv", "num_warps", "num_stages", "kv_splits")
    return {name: value for name, value in zip(names, variant) if value is not None}


def attention_fn(variant, queries):
    def run(k_pool, v_pool, q, q_start, q_len, kv_len, tables):
        return ragged_paged_attention(q, k_pool, v_pool, LAYER, q_start, q_len, kv_len, tables, page_size=PAGE_SIZE,
                                      max_q_len=queries, **tile_options(variant))
    return run


def attention_reference_fn(queries):
    def run(k_pool, v_pool, q, q_start, q_len, kv_len, tables):
        return ragged_paged_attention_reference(q, k_pool, v_pool, LAYER, q_start, q_len, kv_len, tables,
                                                page_size=PAGE_SIZE, max_q_len=queries)
    return run


def jax_paged_attention_fn():
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    def run(k_pages, v_pages, q, q_start, q_len, kv_len, tables):
        return paged_attention(q, k_pages, v_pages, tables, kv_len)
    return run


def sparse_fn(variant):
    def run(k_pool, v_pool, q, slots, count):
        return sparse_decode_attention(q, k_pool, v_pool, LAYER, slots, count, **tile_options(variant))
    return run


def sparse_reference_fn(k_pool, v_pool, q, slots, count):
    return sparse_decode_attention_reference(q, k_pool, v_pool, LAYER, slots, count)


def scores_fn(variant):
    def run(k_pool, q, q_start, q_len, kv_len, tables, lse):
        return pillar_scores_paged(q, k_pool, LAYER, q_start, q_len, kv_len, tables, lse, page_size=PAGE_SIZE,
                                   max_q_len=VERIFY_QUERIES, **tile_options(variant))
    return run


def scores_reference_fn(k_pool, q, q_start, q_len, kv_len, tables, lse):
    return pillar_scores_paged_reference(q, k_pool, LAYER, q_start, q_len, kv_len, tables, lse, page_size=PAGE_SIZE,
                                         max_q_len=VERIFY_QUERIES)


def best_of(bench, op, model, shape, variants, make_fn, fixed, sets, nbytes, reps=7):
    timings = {}
    for variant in variants:
        seconds = bench.attempt(op, model, shape, "pallas-triton", variant_name(variant), make_fn(variant), fixed,
                                sets, nbytes, reps=reps)
        if seconds is not None:
            timings[variant] = seconds
    return min(timings, key=timings.get) if timings else variants[0]


def run_model(bench, model_name, shapes, *, sweep, peers, chosen=None):
    """Kernels at every shape; at the first one the variant sweep (if asked) and the peers and checks (if asked).

    Returns the chosen variant per op (the sweep's fastest, else `chosen`'s, else the first listed)."""
    model = MODELS[model_name]
    largest_batch = max(b for b, _ in shapes)
    largest_seq = max(s for _, s in shapes)
    pool_pages = largest_batch * largest_seq // PAGE_SIZE + 8
    k_pool, v_pool = make_pool(model, pool_pages * PAGE_SIZE, jax.random.key(0))
    kv_row_bytes = model["hkv"] * model["d"] * 2 * jnp.dtype(DTYPE).itemsize      # K + V of one position
    chosen = dict(chosen or {})
    for batch, seq in shapes:
        shape = f"B{batch} S{seq}"
        main = (batch, seq) == shapes[0]
        key = jax.random.key(batch * 100003 + seq)
        budget = max(1, int(np.ceil(SPARSE_FRACTION * seq)))

        for op, queries in (("verify", VERIFY_QUERIES), ("decode", 1)):
            sets = paged_sets(model, batch, seq, queries, 4, key, pool_pages)
            nbytes = batch * seq * kv_row_bytes
            variants = ATTENTION_VARIANTS if (sweep and main) else [automatic_splits(chosen.get(op, DEFAULTS))]
            best = best_of(bench, op, model_name, shape, variants, lambda v: attention_fn(v, queries),
                           (k_pool, v_pool), sets, nbytes)
            chosen.setdefault(op, best)
            if op == "decode" and (peers or model_name == "qwen3-8b"):
                k_pages = k_pool[LAYER].reshape(model["hkv"], -1, PAGE_SIZE, model["d"])
                v_pages = v_pool[LAYER].reshape(model["hkv"], -1, PAGE_SIZE, model["d"])
                bench.attempt(op, model_name, shape, "jax ops.gpu.paged_attn", "defaults",
                              jax_paged_attention_fn(), (k_pages, v_pages), sets, nbytes)
                del k_pages, v_pages
            if main and peers:
                check_attention(bench, op, model_name, shape, chosen[op], queries, (k_pool, v_pool), sets[0])
                bench.attempt(op, model_name, shape, "xla reference (f32)", "", attention_reference_fn(queries),
                              (k_pool, v_pool), sets[:1], nbytes, reps=3)

        sets = sparse_sets(model, batch, budget, 16, key, pool_pages * PAGE_SIZE)
        nbytes = batch * budget * kv_row_bytes
        sparse_shape = f"{shape} K{budget}"
        variants = SPARSE_VARIANTS if (sweep and main) else [automatic_splits(chosen.get("sparse", DEFAULTS))]
        chosen.setdefault("sparse", best_of(bench, "sparse", model_name, sparse_shape, variants, sparse_fn,
                                            (k_pool, v_pool), sets, nbytes))
        if main and peers:
            check_sparse(bench, model_name, sparse_shape, chosen["sparse"], (k_pool, v_pool), sets[0])
            bench.attempt("sparse", model_name, sparse_shape, "xla reference (f32)", "", sparse_reference_fn,
                          (k_pool, v_pool), sets[:4], nbytes, reps=5)

        sets = paged_sets(model, batch, seq, VERIFY_QUERIES, 4, key, pool_pages)
        sets = [s + (jax.random.normal(jax.random.fold_in(key, 7 + i), s[0].shape[:2], jnp.float32) + 6.0,)
                for i, s in enumerate(sets)]
        nbytes = batch * seq * kv_row_bytes // 2
        variants = SCORE_VARIANTS if (sweep and main) else [automatic_splits(chosen.get("scores", DEFAULTS))]
        chosen.setdefault("scores", best_of(bench, "scores", model_name, shape, variants, scores_fn, (k_pool,),
                                            sets, nbytes))
        if main and peers:
            bench.attempt("scores", model_name, shape, "xla reference (f32)", "", scores_reference_fn, (k_pool,),
                          sets[:1], nbytes, reps=3)
    del k_pool, v_pool
    return chosen


def check_attention(bench, op, model_name, shape, variant, queries, fixed, inputs):
    """Largest |kernel - reference| on the benchmark's own inputs, logged next to the timings."""
    if bench.deadline.left() < 30:
        return
    try:
        out, lse = jax.jit(attention_fn(variant, queries))(*fixed, *inputs)
        ref_out, ref_lse = jax.jit(attention_reference_fn(queries))(*fixed, *inputs)
        note = f"max|out-ref| {max_error(out, ref_out):.2e}, max|lse-ref| {max_error(lse, ref_lse):.2e}"
    except Exception as error:              # noqa: BLE001
        note = f"check FAILED: {str(error).splitlines()[-1][:160]}"
    bench.log.append(f"{op} {model_name} {shape} {variant_name(variant)}: {note}")
    print("  check:", bench.log[-1], flush=True)


def check_sparse(bench, model_name, shape, variant, fixed, inputs):
    if bench.deadline.left() < 30:
        return
    try:
        out, lse = jax.jit(sparse_fn(variant))(*fixed, *inputs)
        ref_out, ref_lse = jax.jit(sparse_reference_fn)(*fixed, *inputs)
        note = f"max|out-ref| {max_error(out, ref_out):.2e}, max|lse-ref| {max_error(lse, ref_lse):.2e}"
    except Exception as error:              # noqa: BLE001
        note = f"check FAILED: {str(error).splitlines()[-1][:160]}"
    bench.log.append(f"sparse {model_name} {shape} {variant_name(variant)}: {note}")
    print("  check:", bench.log[-1], flush=True)


def run_topk(bench, model_name, *, sweep):
    model = MODELS[model_name]
    rows, heads, positions = 64 * model["layers"], model["hkv"], 8192
    budget = int(np.ceil(SPARSE_FRACTION * positions))
    shape = f"{rows}x{heads}x{positions} K{budget}"
    scores = jnp.exp(2.0 * jax.random.normal(jax.random.key(3), (rows, heads, positions), jnp.float32))
    nbytes = scores.size * 4
    sets = [(jnp.full((rows,), budget - i, jnp.int32),) for i in range(4)]
    timings = {}
    for warps in (TOPK_WARPS if sweep else TOPK_WARPS[:1]):
        fn = functools.partial(lambda s, k, warps: topk_select(s, k, max_k=budget, num_warps=warps)[0], warps=warps)
        seconds = bench.attempt("topk", model_name, shape, "pallas-triton", f"w{warps}", fn, (scores,), sets, nbytes)
        if seconds is not None:
            timings[warps] = seconds
    bench.attempt("topk", model_name, shape, "lax.top_k", "", lambda s, k: jax.lax.top_k(s, budget)[1], (scores,),
                  sets[:1], nbytes, reps=5)
    if timings and bench.deadline.left() > 20:
        warps = min(timings, key=timings.get)
        try:
            indices, _ = jax.jit(functools.partial(topk_select, max_k=budget, num_warps=warps))(scores, sets[0][0])
            top_values = jax.lax.top_k(scores, budget)[0]
            picked = jnp.sort(jnp.take_along_axis(scores, indices, axis=-1), axis=-1)[..., ::-1]
            same = bool(jnp.all(picked == top_values))
            bench.log.append(f"topk {model_name} {shape} w{warps}: selected values equal lax.top_k's: {same}")
        except Exception as error:          # noqa: BLE001
            bench.log.append(f"topk check FAILED: {str(error).splitlines()[-1][:160]}")
        print("  check:", bench.log[-1], flush=True)


def summary(bench):
    lines = ["| op | model | shape | impl | config | ms | eff. TB/s | note |", "|---|---|---|---|---|---|---|---|"]
    best = {}
    for op, model, shape, impl, config, ms, tbps, note in bench.rows:
        slot = (op, model, shape, impl)
        if ms is not None and (slot not in best or ms < best[slot][5]):
            best[slot] = (op, model, shape, impl, config, ms, tbps, note)
        elif ms is None and slot not in best:
            best[slot] = (op, model, shape, impl, config, ms, tbps, note)
    for op, model, shape, impl, config, ms, tbps, note in best.values():
        lines.append(f"| {op} | {model} | {shape} | {impl} | {config} | {'-' if ms is None else f'{ms:.3f}'} | "
                     f"{'-' if tbps is None else f'{tbps:.2f}'} | {note} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new timings after this")
    parser.add_argument("--out", type=Path, help="write the full markdown report here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if jax.default_backend() != "gpu":
        raise SystemExit(f"bench/kernels.py needs a GPU; the default JAX backend is {jax.default_backend()!r}")
    device = jax.devices()[0]
    bench = Bench(Deadline(args.budget_s))
    print(f"device: {device.device_kind}, jax {jax.__version__}", flush=True)

    # Most important first: the time budget may cut the tail.
    chosen = run_model(bench, "qwen3-8b", [(64, 8192)], sweep=True, peers=True)
    run_topk(bench, "qwen3-8b", sweep=True)
    run_model(bench, "qwen3-8b", [(32, 4096), (64, 4096), (32, 8192)], sweep=False, peers=False, chosen=chosen)
    run_model(bench, "smollm2", [(64, 8192), (32, 4096)], sweep=False, peers=True)
    run_topk(bench, "smollm2", sweep=False)

    table = summary(bench)
    report = "\n".join([
        f"# Kernel benchmark, {datetime.date(2026, 11, 28).isoformat()}, {device.device_kind} (jax {jax.__version__})",
        "", f"Chosen Qwen3-8B configs: {', '.join(f'{k}: {variant_name(v)}' for k, v in chosen.items())}", "",
        "## All timings", "", "```",
        *(f"{r[0]} {r[1]} {r[2]} {r[3]} {r[4]} "
          f"{'-' if r[5] is None else f'{r[5]:.3f} ms'} {'' if r[6] is None else f'{r[6]:.2f} TB/s'} {r[7]}"
          for r in bench.rows),
        "```", "", "## Checks on benchmark inputs", "", *(f"- {line}" for line in bench.log), "",
        "## Best per (op, shape, implementation)", "", table, ""])
    if args.out:
        args.out.write_text(report)
    print("\n" + table)


if __name__ == "__main__":
    main()
