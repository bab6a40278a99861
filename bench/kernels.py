"""Times the Pallas GPU kernels against their peers in one run, on random inputs, and prints a table last.

Peers: the jnp references (XLA gather + einsum), jax's own Pallas `ops.gpu.paged_attention` (decode only)
and `lax.top_k`. Shapes: Qwen3-8B-like (Hq 32, Hkv 8, D 128) and SmolLM2 (Hq 9, Hkv 3, D 64), bf16, page 16.
Each timing is the median over repetitions of a jitted call that runs the op on several input sets back to
back (different queries and page tables, so nothing is cached or deduplicated), divided by the set count.
"Effective TB/s" counts the bytes that must be read: K+V of every attended position (K only for scores,
the float32 scores for top-K) over the time; for the KV write, the bytes written. The device's copy bandwidth
(a jitted x * 2 over 1 GiB: read + write bytes over the time) is measured first in the same run, and every
rate is also given as a fraction of it.

Sections: "kernels" (each kernel alone, variant sweeps, peers), "mixed" (a unified-scheduler step at k = 8:
1/(k+1) of the rows verify, the rest draft over 5% of the context; the unified launch against the separate
draft + verify launches) and "kv_write" (the per-step scatter of new K/V into the pool, alone and inside the
jit that also runs the step's attention).

    python bench/kernels.py [--budget-s 300] [--out results.md] [--sections kernels mixed kv_write]

With --out, the rows also go to the same path with a .json suffix.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
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
from pallas_kernels.unified_attention import unified_attention, unified_attention_reference  # noqa: E402
from sparsespec_jax.benchmark.roofline import copy_bandwidth  # noqa: E402

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
MIX_BATCHES = (64, 128)
# Qwen3-8B-like shapes timed with the chosen configurations, after the sweep at B64 S8k (most wanted first: the
# time budget may cut the tail).
GRID = [(b, s) for s in (8192, 4096, 16384) for b in (32, 64, 128) if (b, s) != (64, 8192)]
MIX_SEQ = 8192
MIX_SETS = 16                       # input sets per timed call: a mixed step takes only ~0.2 ms
UNIFIED_SPEEDUP_TARGET = 1.2
# Unified-launch options; {} = the kernel's own choice.
UNIFIED_VARIANTS = [{}, dict(target_programs=768), dict(target_programs=1024), dict(target_programs=1536),
                    dict(target_programs=2048), dict(num_stages=4), dict(num_stages=2),
                    dict(block_kv=64, num_stages=3)]
SECTIONS = ("kernels", "mixed", "kv_write")


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


def median_seconds_in_place(step, pools, sets, *, reps):
    """Median wall time per set of `pools, out = step(pools, *set)` chained over the sets by lax.scan (as the
    model chains its layers) in one jitted call that donates the pools, so writes land in place as in the
    engine's step. Works on a copy of `pools`.

    Not a Python loop: there each step's kernel reads the pool that the next step's scatter updates with no
    data dependency ordering the two, and XLA then copies the whole pool before every scatter."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *sets)
    many = jax.jit(lambda pools, stacked: jax.lax.scan(lambda p, inputs: step(p, *inputs), pools, stacked),
                   donate_argnums=0)
    pools = jax.tree.map(jnp.copy, pools)
    for _ in range(2):                                  # compile and warm up
        pools, outputs = jax.block_until_ready(many(pools, stacked))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        pools, outputs = jax.block_until_ready(many(pools, stacked))
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
        self.mixed = []         # (model, shape, separate ms, unified defaults ms, best unified ms, its config)
        self.kv_write = []      # (model, shape, alone ms, attention ms, attention + write ms)

    def record(self, op, model, shape, impl, config, seconds, nbytes, note=""):
        tbps = None if nbytes is None or seconds is None else nbytes / seconds / 1e12
        self.rows.append((op, model, shape, impl, config, None if seconds is None else seconds * 1e3, tbps, note))
        ms = "-" if seconds is None else f"{seconds * 1e3:.3f} ms"
        rate = "" if tbps is None else f"  {tbps:.2f} TB/s"
        print(f"  {op:8s} {model:9s} {shape:18s} {impl:24s} {config:22s} {ms}{rate} {note}", flush=True)

    def attempt(self, op, model, shape, impl, config, fn, fixed, sets, nbytes, *, reps=7, min_left=20.0,
                timer=median_seconds):
        """Time one implementation; failures and the deadline are recorded, never fatal."""
        if self.deadline.left() < min_left:
            self.record(op, model, shape, impl, config, None, nbytes, "skipped (time budget)")
            return None
        try:
            seconds = timer(fn, fixed, sets, reps=reps)
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
    """One layer's score pass (a stack of one)."""
    def run(k_pool, q, q_start, q_len, kv_len, tables, lse):
        return pillar_scores_paged(q[None], k_pool, jnp.full((1,), LAYER, jnp.int32), q_start, q_len, kv_len, tables,
                                   lse[None], page_size=PAGE_SIZE, max_q_len=VERIFY_QUERIES, **tile_options(variant))
    return run


def scores_reference_fn(k_pool, q, q_start, q_len, kv_len, tables, lse):
    return pillar_scores_paged_reference(q[None], k_pool, jnp.full((1,), LAYER, jnp.int32), q_start, q_len, kv_len,
                                         tables, lse[None], page_size=PAGE_SIZE, max_q_len=VERIFY_QUERIES)


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


def mixed_sets(model, batch, seq, budget, count, key, pool_pages):
    """Input sets of a unified-scheduler step at k = 8: round(B/(k+1)) rows verify (k+1 queries over a context
    of seq), the others draft over `budget` listed slots; draft tokens come first, as the engine lays them out."""
    num_verify = max(1, round(batch / VERIFY_QUERIES))
    verify = paged_sets(model, num_verify, seq, VERIFY_QUERIES, count, key, pool_pages)
    drafts = sparse_sets(model, batch - num_verify, budget, count, jax.random.fold_in(key, 1), pool_pages * PAGE_SIZE)
    return [(jnp.concatenate([draft_q, verify_q]), slots, counts, q_start, q_len, kv_len, tables)
            for (verify_q, q_start, q_len, kv_len, tables), (draft_q, slots, counts) in zip(verify, drafts)]


def unified_fn(options):
    def run(k_pool, v_pool, q, slots, count, q_start, q_len, kv_len, tables):
        return unified_attention(q, k_pool, v_pool, LAYER, slots, count, q_start, q_len, kv_len, tables,
                                 page_size=PAGE_SIZE, max_q_len=VERIFY_QUERIES, **options)
    return run


def separate_launches_fn(k_pool, v_pool, q, slots, count, q_start, q_len, kv_len, tables):
    """What the unified launch replaces: the draft and the full-attention kernels (their defaults), concatenated."""
    num_drafts = slots.shape[0]
    draft_out, draft_lse = sparse_decode_attention(q[:num_drafts], k_pool, v_pool, LAYER, slots, count)
    full_out, full_lse = ragged_paged_attention(q[num_drafts:], k_pool, v_pool, LAYER, q_start, q_len, kv_len, tables,
                                                page_size=PAGE_SIZE, max_q_len=VERIFY_QUERIES)
    return jnp.concatenate([draft_out, full_out]), jnp.concatenate([draft_lse, full_lse])


def unified_reference_fn(k_pool, v_pool, q, slots, count, q_start, q_len, kv_len, tables):
    return unified_attention_reference(q, k_pool, v_pool, LAYER, slots, count, q_start, q_len, kv_len, tables,
                                       page_size=PAGE_SIZE, max_q_len=VERIFY_QUERIES)


def options_name(options):
    return " ".join(f"{name}={value}" for name, value in options.items()) or "defaults"


def fastest_ms(timings):
    """The fastest of several timings in seconds (None = failed or skipped), in milliseconds."""
    done = [seconds for seconds in timings if seconds is not None]
    return min(done) * 1e3 if done else None


def run_mixed(bench, model_name, batches, seq):
    """The unified launch (its variants) against the separate draft + verify launches at each batch size."""
    model = MODELS[model_name]
    pool_pages = max(batches) * seq // PAGE_SIZE + 8
    k_pool, v_pool = make_pool(model, pool_pages * PAGE_SIZE, jax.random.key(1))
    kv_row_bytes = model["hkv"] * model["d"] * 2 * jnp.dtype(DTYPE).itemsize
    budget = int(np.ceil(SPARSE_FRACTION * seq))
    for batch in batches:
        sets = mixed_sets(model, batch, seq, budget, MIX_SETS, jax.random.key(batch), pool_pages)
        num_drafts = sets[0][1].shape[0]
        num_verify = batch - num_drafts
        shape = f"B{batch} S{seq} V{num_verify} K{budget}"
        nbytes = (num_verify * seq + num_drafts * budget) * kv_row_bytes

        def attempt(impl, config, fn):
            return bench.attempt("mixed", model_name, shape, impl, config, fn, (k_pool, v_pool), sets, nbytes)

        # The first timing of a group tends to be slow: the separate launches and the unified defaults are timed
        # first and again last, and each keeps its faster time.
        separate = [attempt("pallas 2 launches", "defaults", separate_launches_fn)]
        unified = {options_name(options): [attempt("pallas unified", options_name(options), unified_fn(options))]
                   for options in UNIFIED_VARIANTS}
        separate.append(attempt("pallas 2 launches", "defaults", separate_launches_fn))
        unified["defaults"].append(attempt("pallas unified", "defaults", unified_fn({})))
        fastest = {name: fastest_ms(times) for name, times in unified.items()}
        timed = {name: ms for name, ms in fastest.items() if ms is not None}
        best = min(timed, key=timed.get) if timed else None
        bench.mixed.append((model_name, shape, fastest_ms(separate), fastest["defaults"], timed.get(best), best))
        if best is not None and batch == batches[0]:
            check_mixed(bench, model_name, shape, UNIFIED_VARIANTS[0], (k_pool, v_pool), sets[0])
    del k_pool, v_pool


def check_mixed(bench, model_name, shape, options, fixed, inputs):
    if bench.deadline.left() < 30:
        return
    try:
        out, lse = jax.jit(unified_fn(options))(*fixed, *inputs)
        ref_out, ref_lse = jax.jit(unified_reference_fn)(*fixed, *inputs)
        note = f"max|out-ref| {max_error(out, ref_out):.2e}, max|lse-ref| {max_error(lse, ref_lse):.2e}"
    except Exception as error:              # noqa: BLE001
        note = f"check FAILED: {str(error).splitlines()[-1][:160]}"
    bench.log.append(f"mixed {model_name} {shape} unified {options_name(options)}: {note}")
    print("  check:", bench.log[-1], flush=True)


def write_step(attend):
    """One layer of a step: scatter the new K/V into the pool (XLA `.at[].set`, as the model does), then,
    if `attend`, the step's unified attention over the updated pool."""

    def step(pools, k_new, v_new, write_slots, *attention_inputs):
        k_pool = pools[0].at[LAYER, :, write_slots].set(k_new)
        v_pool = pools[1].at[LAYER, :, write_slots].set(v_new)
        out = unified_fn({})(k_pool, v_pool, *attention_inputs) if attend else None
        return (k_pool, v_pool), out
    return step


def attention_step(pools, k_new, v_new, write_slots, *attention_inputs):
    """The same step without the write: the baseline the write's marginal cost is measured against."""
    return pools, unified_fn({})(*pools, *attention_inputs)


def run_kv_write(bench, model_name, batches, seq):
    """Cost of the per-layer KV write of a mixed step (draft tokens + k+1 per verify row): the scatter alone, and
    its marginal cost inside the jit that also runs the step's attention (pools donated in both)."""
    model = MODELS[model_name]
    pool_pages = max(batches) * seq // PAGE_SIZE + 8
    pools = make_pool(model, pool_pages * PAGE_SIZE, jax.random.key(2))
    budget = int(np.ceil(SPARSE_FRACTION * seq))
    for batch in batches:
        key = jax.random.key(batch + 1)
        attention_sets = mixed_sets(model, batch, seq, budget, MIX_SETS, key, pool_pages)
        num_tokens = attention_sets[0][0].shape[0]
        sets = []
        for i, inputs in enumerate(attention_sets):
            k_key, v_key, s_key = jax.random.split(jax.random.fold_in(key, 100 + i), 3)
            new_shape = (num_tokens, model["hkv"], model["d"])
            write_slots = jax.random.permutation(s_key, pool_pages * PAGE_SIZE)[:num_tokens].astype(jnp.int32)
            sets.append((jax.random.normal(k_key, new_shape, DTYPE), jax.random.normal(v_key, new_shape, DTYPE),
                         write_slots, *inputs))
        shape = f"B{batch} S{seq} N{num_tokens}"
        nbytes = num_tokens * model["hkv"] * model["d"] * 2 * jnp.dtype(DTYPE).itemsize
        timed = [bench.attempt("kv_write", model_name, shape, impl, "", step, pools, sets, nbytes,
                               timer=median_seconds_in_place)
                 for impl, step in (("xla scatter alone", write_step(False)),
                                    ("unified attention alone", attention_step),
                                    ("scatter+attention 1 jit", write_step(True)))]
        bench.kv_write.append((model_name, shape, *(fastest_ms([seconds]) for seconds in timed)))
    del pools


def comparison_sections(bench):
    """Markdown of the unified-vs-separate and KV-write comparisons (empty when those sections did not run)."""
    lines = []
    if bench.mixed:
        lines += ["## Unified launch vs separate draft + verify launches (k = 8 mix)", "",
                  "| model | shape | 2 launches ms | unified ms | speedup | target | best unified ms (config) |",
                  "|---|---|---|---|---|---|---|"]
        for model, shape, separate, unified, best, config in bench.mixed:
            speedup = "-" if None in (separate, unified) else f"{separate / unified:.2f}x"
            cells = ["-" if value is None else f"{value:.3f}" for value in (separate, unified, best)]
            lines.append(f"| {model} | {shape} | {cells[0]} | {cells[1]} | {speedup} | >= {UNIFIED_SPEEDUP_TARGET}x | "
                         f"{cells[2]} ({config or '-'}) |")
        lines.append("")
    if bench.kv_write:
        lines += ["## KV write per layer (multiply by the layer count for a step)", "",
                  "| model | shape | scatter alone ms | attention ms | scatter + attention ms | write's marginal ms |",
                  "|---|---|---|---|---|---|"]
        for model, shape, alone, attention, both in bench.kv_write:
            marginal = "-" if None in (attention, both) else f"{both - attention:.4f}"
            cells = ["-" if value is None else f"{value:.4f}" for value in (alone, attention, both)]
            lines.append(f"| {model} | {shape} | {' | '.join(cells)} | {marginal} |")
        lines.append("")
    return lines


def summary(bench, copy_tbps: float):
    lines = ["| op | model | shape | impl | config | ms | eff. TB/s | of copy bw | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for op, model, shape, impl, config, ms, tbps, note in bench.rows:
        slot = (op, model, shape, impl)
        if ms is not None and (slot not in best or ms < best[slot][5]):
            best[slot] = (op, model, shape, impl, config, ms, tbps, note)
        elif ms is None and slot not in best:
            best[slot] = (op, model, shape, impl, config, ms, tbps, note)
    for op, model, shape, impl, config, ms, tbps, note in best.values():
        lines.append(f"| {op} | {model} | {shape} | {impl} | {config} | {'-' if ms is None else f'{ms:.3f}'} | "
                     f"{'-' if tbps is None else f'{tbps:.2f}'} | {'-' if tbps is None else f'{tbps / copy_tbps:.0%}'} "
                     f"| {note} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new timings after this")
    parser.add_argument("--out", type=Path, help="write the full markdown report here")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to time")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if jax.default_backend() != "gpu":
        raise SystemExit(f"bench/kernels.py needs a GPU; the default JAX backend is {jax.default_backend()!r}")
    device = jax.devices()[0]
    bench = Bench(Deadline(args.budget_s))
    copy = copy_bandwidth(1 << 30)
    copy_tbps = copy["bytes_per_s"] / 1e12
    print(f"device: {device.device_kind}, jax {jax.__version__}, copy bandwidth {copy_tbps:.2f} TB/s", flush=True)

    # Most important first: the time budget may cut the tail.
    chosen = {}
    if "kernels" in args.sections:
        chosen = run_model(bench, "qwen3-8b", [(64, 8192)], sweep=True, peers=True)
    if "mixed" in args.sections:
        run_mixed(bench, "qwen3-8b", MIX_BATCHES, MIX_SEQ)
    if "kv_write" in args.sections:
        run_kv_write(bench, "qwen3-8b", MIX_BATCHES, MIX_SEQ)
    if "kernels" in args.sections:
        run_topk(bench, "qwen3-8b", sweep=True)
        run_model(bench, "qwen3-8b", GRID, sweep=False, peers=False, chosen=chosen)
        run_model(bench, "smollm2", [(64, 8192), (32, 4096)], sweep=False, peers=True)
        run_topk(bench, "smollm2", sweep=False)

    table = summary(bench, copy_tbps)
    today = datetime.date.today().isoformat()
    report = "\n".join([
        f"# Kernel benchmark, {today}, {device.device_kind} (jax {jax.__version__})", "",
        f"Copy bandwidth in this run: {copy_tbps:.2f} TB/s (jitted x * 2 over 1 GiB, read + write bytes over the "
        "median time).", "",
        f"Chosen Qwen3-8B configs: {', '.join(f'{k}: {variant_name(v)}' for k, v in chosen.items()) or '-'}", "",
        *comparison_sections(bench),
        "## All timings", "", "```",
        *(f"{r[0]} {r[1]} {r[2]} {r[3]} {r[4]} "
          f"{'-' if r[5] is None else f'{r[5]:.3f} ms'} {'' if r[6] is None else f'{r[6]:.2f} TB/s'} {r[7]}"
          for r in bench.rows),
        "```", "", "## Checks on benchmark inputs", "", *(f"- {line}" for line in bench.log), "",
        "## Best per (op, shape, implementation)", "", table, ""])
    if args.out:
        args.out.write_text(report)
        fields = ("op", "model", "shape", "impl", "config", "ms", "tbps", "note")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"date": today, "device": device.device_kind, "jax": jax.__version__, "copy_bandwidth": copy,
             "rows": [dict(zip(fields, row)) for row in bench.rows], "mixed": bench.mixed,
             "kv_write": bench.kv_write}, indent=1))
    print("\n" + table)
    print("\n".join(comparison_sections(bench)))


if __name__ == "__main__":
    main()
