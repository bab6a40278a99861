"""Interleaved A/B of this checkout's attention kernels against another checkout's, in one process.

The same kernel timed in two processes on one H200 differed by 10-15% (allocation and clock state), more than
many kernel changes are worth. Here both versions run in one process on the same random inputs, alternating
round by round, and the report gives each version's median and their ratio. Run it in a few processes still:
single points of one run carry about +-10% (a kernel identical on both sides measured 0.87x-1.08x over four
runs, and one run put a SmolLM2 decode at 1.55x that three others put at 0.96-1.08x). The baseline is any
directory holding a `pallas_kernels/` package (`git worktree add /tmp/old <commit>`, or `git archive <commit> |
tar -x -C /tmp/old`); its modules are imported from its own root and keep their own helpers.

Cases: a decode step (vanilla), a mixed pillar step (1/9 of the rows verify 9 queries, the rest draft over 5% of
the context) and a step's score pass over every layer, at SmolLM2 and Qwen3-8B heads, with ragged contexts whose
page tables are bucketed to the next power of two as the engine's are.

    python bench/kernel_ab.py --baseline /tmp/old [--heads smollm2 qwen3-8b] [--rounds 9] [--out ab.md]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

PAGE_SIZE = 16
VERIFY_QUERIES = 9
HEADS = {"smollm2": dict(hq=9, hkv=3, d=64, layers=30), "qwen3-8b": dict(hq=32, hkv=8, d=128, layers=36),
         "tiny": dict(hq=4, hkv=2, d=16, layers=2)}
# (heads, batch, context low, context high): contexts drawn in [low, high), just past a power of two or spread.
CASES = [("smollm2", 128, 2049, 2136), ("smollm2", 128, 4097, 4184), ("smollm2", 128, 7680, 7768),
         ("smollm2", 128, 1500, 4000), ("qwen3-8b", 128, 4097, 4184), ("qwen3-8b", 64, 8193, 8280)]
SMOKE_CASES = [("tiny", 8, 40, 70)]
KERNELS = ("paged_attention", "unified_attention", "pillar_scores")


def _package_modules() -> dict:
    return {name: module for name, module in sys.modules.items()
            if name == "pallas_kernels" or name.startswith("pallas_kernels.")}


@contextlib.contextmanager
def _package_root(root: Path):
    """Import `pallas_kernels` from `root` inside the block; this checkout's modules are back afterwards (the
    functions imported inside keep the module globals they were defined in)."""
    saved = _package_modules()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in _package_modules():
            del sys.modules[name]
        sys.modules.update(saved)


def load_kernels(root: Path) -> dict:
    """The GPU attention kernels of the checkout at `root`, by name."""
    if not (root / "pallas_kernels").is_dir():
        raise FileNotFoundError(f"--baseline {root}: no pallas_kernels/ package there")
    with _package_root(root):
        import pallas_kernels.paged_attention.triton_kernel as paged
        import pallas_kernels.pillar_scores.triton_kernel as scores
        import pallas_kernels.unified_attention.triton_kernel as unified
        return {"paged_attention": paged.ragged_paged_attention, "unified_attention": unified.unified_attention,
                "pillar_scores": scores.pillar_scores_paged}


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _tables(rng, rows: int, width: int, pool_pages: int):
    return jnp.asarray(rng.permutation(pool_pages)[: rows * width].reshape(rows, width), jnp.int32)


def case_inputs(heads: str, batch: int, low: int, high: int, sets: int):
    """Pools and, per kernel, `sets` input sets for one case (different contexts, queries and tables)."""
    m = HEADS[heads]
    rng = np.random.default_rng(0)
    width = _bucket(high + VERIFY_QUERIES) // PAGE_SIZE
    pool_pages = batch * width + 8
    shape = (2, m["hkv"], pool_pages * PAGE_SIZE, m["d"])
    k_pool = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)
    v_pool = jax.random.normal(jax.random.key(2), shape, jnp.bfloat16)
    verify_rows = -(-batch // VERIFY_QUERIES)
    draft_rows = batch - verify_rows
    budget = max(16, int(0.05 * high)) + VERIFY_QUERIES
    decode, mixed, scores = [], [], []
    for i in range(sets):
        key = jax.random.key(10 + i)
        decode.append((jax.random.normal(key, (batch, m["hq"], m["d"]), jnp.bfloat16),
                       jnp.arange(batch, dtype=jnp.int32), jnp.ones(batch, jnp.int32),
                       jnp.asarray(rng.integers(low, high, batch), jnp.int32), _tables(rng, batch, width, pool_pages)))
        verify = (jnp.arange(verify_rows, dtype=jnp.int32) * VERIFY_QUERIES,
                  jnp.full(verify_rows, VERIFY_QUERIES, jnp.int32),
                  jnp.asarray(rng.integers(low, high, verify_rows) + VERIFY_QUERIES, jnp.int32),
                  _tables(rng, verify_rows, width, pool_pages))
        mixed.append((jax.random.normal(key, (draft_rows + verify_rows * VERIFY_QUERIES, m["hq"], m["d"]),
                                        jnp.bfloat16),
                      jnp.asarray(rng.integers(0, pool_pages * PAGE_SIZE, (draft_rows, m["hkv"], budget)), jnp.int32),
                      jnp.asarray(rng.integers(budget // 2, budget, draft_rows), jnp.int32)) + verify)
        queries = jax.random.normal(key, (m["layers"], verify_rows * VERIFY_QUERIES, m["hq"], m["d"]), jnp.bfloat16)
        lse = 8.0 + jax.random.uniform(key, queries.shape[:3], jnp.float32)
        scores.append((queries, jnp.arange(m["layers"], dtype=jnp.int32) % 2) + verify + (lse,))
    return (k_pool, v_pool), {"paged_attention": decode, "unified_attention": mixed, "pillar_scores": scores}


def _call(name: str, kernel, interpret: bool):
    """`kernel` as fn(k_pool, v_pool, *one input set) for the case's kind."""
    if name == "paged_attention":
        return lambda k, v, q, qs, ql, kv, pt: kernel(q, k, v, 1, qs, ql, kv, pt, page_size=PAGE_SIZE, max_q_len=1,
                                                      interpret=interpret)
    if name == "unified_attention":
        return lambda k, v, q, sl, c, qs, ql, kv, pt: kernel(q, k, v, 1, sl, c, qs, ql, kv, pt, page_size=PAGE_SIZE,
                                                             max_q_len=VERIFY_QUERIES, interpret=interpret)
    return lambda k, v, q, ly, qs, ql, kv, pt, lse: kernel(q, k, ly, qs, ql, kv, pt, lse, page_size=PAGE_SIZE,
                                                           max_q_len=VERIFY_QUERIES, interpret=interpret)


def _timer(fn, pools, sets):
    """A function timing one call of `fn` over every set (one jitted program), per set; compiled and warm."""
    many = jax.jit(lambda pools, sets: [fn(*pools, *s) for s in sets])
    for _ in range(2):
        jax.block_until_ready(many(pools, sets))

    def once() -> float:
        started = time.perf_counter()
        jax.block_until_ready(many(pools, sets))
        return (time.perf_counter() - started) / len(sets)
    return once


def interleaved_medians(timers: dict, rounds: int, reps: int) -> dict:
    """Each version's median over `rounds` rounds; a round times every version once (median of `reps` calls),
    in turn, so slow drifts of the device touch both alike."""
    times = {name: [] for name in timers}
    for _ in range(rounds):
        for name, once in timers.items():
            times[name].append(statistics.median(once() for _ in range(reps)))
    return {name: statistics.median(values) for name, values in times.items()}


def run(baseline: Path, cases, rounds: int, reps: int, sets: int, interpret: bool) -> list[dict]:
    versions = {"baseline": load_kernels(baseline), "current": load_kernels(REPO_ROOT)}
    rows = []
    for heads, batch, low, high in cases:
        pools, inputs = case_inputs(heads, batch, low, high, sets)
        for name in KERNELS:
            timers = {version: _timer(_call(name, kernels[name], interpret), pools, inputs[name])
                      for version, kernels in versions.items()}
            medians = interleaved_medians(timers, rounds, reps)
            row = dict(kernel=name, heads=heads, batch=batch, contexts=f"{low}-{high - 1}",
                       baseline_ms=medians["baseline"] * 1e3, current_ms=medians["current"] * 1e3,
                       ratio=medians["current"] / medians["baseline"])
            rows.append(row)
            print(f"{name:18s} {heads:9s} B{batch:<4d} {row['contexts']:>10s}  baseline {row['baseline_ms']:.4f} ms  "
                  f"current {row['current_ms']:.4f} ms  current/baseline {row['ratio']:.3f}", flush=True)
    return rows


def render(rows: list[dict], baseline: Path, device: str, rounds: int) -> str:
    lines = [f"# Kernel A/B, {device}: this checkout against {baseline}", "",
             f"One process, the same random inputs, {rounds} interleaved rounds per row; ms per kernel call.", "",
             "| kernel | heads | batch | contexts | baseline ms | current ms | current / baseline |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['heads']} | {r['batch']} | {r['contexts']} | {r['baseline_ms']:.4f} | "
              f"{r['current_ms']:.4f} | {r['ratio']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="root of the checkout to compare against")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=5, help="calls per version and round (their median counts)")
    parser.add_argument("--sets", type=int, default=4, help="input sets per timed call")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--heads", nargs="+", choices=sorted({case[0] for case in CASES}),
                        default=sorted({case[0] for case in CASES}), help="run the cases of these head shapes")
    parser.add_argument("--smoke", action="store_true", help="one tiny case, kernels interpreted (CPU)")
    args = parser.parse_args(argv)
    for name in ("rounds", "reps", "sets"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be at least 1, got {getattr(args, name)}")
    interpret = jax.default_backend() != "gpu"
    if interpret and not args.smoke:
        parser.error("the Triton kernels need a GPU; on other platforms only --smoke runs (interpreted)")
    cases = SMOKE_CASES if args.smoke else [case for case in CASES if case[0] in args.heads]
    rows = run(args.baseline.resolve(), cases, args.rounds, args.reps, args.sets, interpret)
    report = render(rows, args.baseline, jax.devices()[0].device_kind, args.rounds)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
