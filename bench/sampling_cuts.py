"""What top-p and top-k cost a step's sampling: the time to turn a step's logits into the log-probs its rows
sample from (sampling.processed_log_probs), with no cut, a top-p cut and a top-k + top-p cut both by the
general search and by the small-top-k path (what a batch whose top_k are all <= 64 gets), side by side in one
run. Random float32 logits (scaled normal), T = 0.6, top_p 0.95, top_k 20 on every row; each time is the median
over repetitions of a jitted call, after a warm-up call; "x none" is the ratio to the no-cut time of the same
size, measured in the same run.

    python bench/sampling_cuts.py [--rows 242] [--vocab 49152 151936] [--reps 50] [--out results.md]

242 rows is a pillar step's sampling rows at batch 128 (draft rows plus k + 1 per verify); 49152 is SmolLM2's
vocabulary and 151936 Qwen3's.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsespec_jax.sampling import processed_log_probs  # noqa: E402

# cut -> (top_k, top_p)
CUTS = {"none": (0, 1.0), "top_p": (0, 0.95), "top_k_top_p": (20, 0.95), "small_top_k": (20, 0.95)}
TEMPERATURE = 0.6


def time_cuts(rows: int, vocab: int, reps: int, seed: int = 0) -> tuple[dict[str, float], bool]:
    """Median ms of processed_log_probs per cut for `rows` random rows of `vocab` logits, and whether both
    top-k + top-p paths kept the same tokens with the same probabilities (to float32 rounding: the two
    programs fuse the final log-softmax differently)."""
    logits = jnp.asarray(np.random.default_rng(seed).normal(size=(rows, vocab)).astype(np.float32) * 3)
    times, outputs = {}, {}
    for cut, (top_k, top_p) in CUTS.items():
        run = jax.jit(lambda x, cut=cut, top_k=top_k, top_p=top_p: processed_log_probs(
            x, jnp.full(rows, TEMPERATURE), jnp.full(rows, top_k, jnp.int32), jnp.full(rows, top_p), cut=cut))
        outputs[cut] = np.asarray(run(logits))
        samples = []
        for _ in range(reps):
            started = time.perf_counter()
            jax.block_until_ready(run(logits))
            samples.append(time.perf_counter() - started)
        times[cut] = 1e3 * statistics.median(samples)
    general, small = outputs["top_k_top_p"], outputs["small_top_k"]
    return times, (np.array_equal(general > -np.inf, small > -np.inf)
                   and np.allclose(np.exp(general), np.exp(small), rtol=1e-5, atol=1e-8))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=242)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    lines = [f"# Sampling cuts: log-probs of {args.rows} rows, T = {TEMPERATURE}, top_p 0.95, top_k 20", "",
             f"{getattr(device, 'device_kind', device.platform)}, jax {jax.__version__}, "
             f"{datetime.date.today().isoformat()}, median of {args.reps}. Command: "
             f"`python bench/sampling_cuts.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| vocab | none ms | top_p ms (x none) | top_k + top_p ms, general search (x none) | "
             "top_k + top_p ms, small-top-k path (x none) | same tokens and probabilities |",
             "|---|---|---|---|---|---|"]
    for vocab in args.vocab:
        ms, equal = time_cuts(args.rows, vocab, args.reps)
        cuts = " | ".join(f"{ms[cut]:.3f} ({ms[cut] / ms['none']:.1f}x)"
                          for cut in ("top_p", "top_k_top_p", "small_top_k"))
        lines.append(f"| {vocab} | {ms['none']:.3f} | {cuts} | {'yes' if equal else 'NO'} |")
        print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
