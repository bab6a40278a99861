"""Draft acceptance on the real SmolLM2-135M-Instruct: pillar vs streaming vs ngram, over k and budget ratio.

64 chat-templated reasoning-gym prompts (bench/data), 2048 new tokens each with ignore_eos, one batch.
Reports mean accepted drafts per verification (acceptance_mean), emitted tokens per round (a verify, or a
plain decode of a row without drafts) and wall time, writes bench/results/<name>.{json,md} and a PNG plot
(acceptance vs k, acceptance vs s).
Configurations run in the order listed; `--time-budget` stops launching new ones (the report says which ran).

  python bench/acceptance.py --model PATH --name acceptance_h200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, device_description, markdown_table, reasoning_prompts, today, write_result
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.loading import DEFAULT_MODEL, load_model
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

# (method, k, budget_ratio, temperature), most important first.
GRID = [
    ("pillar", 8, 0.05, 0.6), ("streaming", 8, 0.05, 0.6), ("ngram", 8, 0.05, 0.6),
    ("pillar", 8, 0.05, 0.0), ("streaming", 8, 0.05, 0.0), ("ngram", 8, 0.05, 0.0),
    ("pillar", 4, 0.05, 0.6), ("pillar", 12, 0.05, 0.6), ("pillar", 8, 0.03, 0.6), ("pillar", 8, 0.1, 0.6),
    ("streaming", 4, 0.05, 0.6), ("streaming", 12, 0.05, 0.6),
    ("pillar", 4, 0.03, 0.6), ("pillar", 12, 0.1, 0.6), ("pillar", 4, 0.1, 0.6), ("pillar", 12, 0.03, 0.6),
]


def run_config(loaded, prompts, method, k, ratio, temperature, args) -> dict:
    spec = SpecConfig(method=method, k=k, budget_ratio=ratio, min_budget=args.min_budget)
    context = max(map(len, prompts)) + args.new_tokens
    config = EngineConfig(attention_backend=args.attention_backend, dtype=args.dtype,
                          max_batch_size=len(prompts), max_model_len=context,
                          kv_cache_tokens=len(prompts) * (context + k + 16), max_num_batched_tokens=2048,
                          prefill_chunk_size=256, min_context_bucket=context + k + 1)
    engine = Engine(loaded.config, loaded.params, loaded.tokenizer, config, spec)
    requests = [engine.add_request(ids, SamplingParams(temperature=temperature, seed=i, max_tokens=args.new_tokens,
                                                       ignore_eos=True)) for i, ids in enumerate(prompts)]
    started = time.perf_counter()
    engine.run()
    wall = time.perf_counter() - started
    accepted = sum(r.stats.accepted_tokens for r in requests)
    verifies = sum(r.stats.verifies for r in requests)
    decodes = sum(r.stats.decodes for r in requests)
    drafted = sum(r.stats.drafted_tokens for r in requests)
    tokens = sum(len(r.output_ids) for r in requests)
    return {"method": method, "k": k, "budget_ratio": ratio, "temperature": temperature,
            "min_budget": args.min_budget, "prompts": len(prompts), "new_tokens": args.new_tokens,
            "attention_backend": engine.backend,
            "acceptance_mean": accepted / verifies, "accept_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_round": tokens / (verifies + decodes), "verifies": verifies, "decodes": decodes,
            "output_tokens": tokens, "wall_s": wall}


def plot(results: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_k, by_s) = plt.subplots(1, 2, figsize=(10, 4))
    results = [r for r in results if r["min_budget"] == 128]
    for method, marker in (("pillar", "o"), ("streaming", "s"), ("ngram", "^")):
        points = sorted((r["k"], r["acceptance_mean"]) for r in results
                        if r["method"] == method and r["budget_ratio"] == 0.05 and r["temperature"] == 0.6)
        if points:
            by_k.plot(*zip(*points), marker=marker, label=method)
        points = sorted((r["budget_ratio"], r["acceptance_mean"]) for r in results
                        if r["method"] == method and r["k"] == 8 and r["temperature"] == 0.6)
        if points and method != "ngram":
            by_s.plot(*zip(*points), marker=marker, label=method)
    by_k.set(xlabel="k (drafts per round)", ylabel="mean accepted per verify",
             title="s = 0.05, min_budget 128, T = 0.6")
    by_s.set(xlabel="budget ratio s", ylabel="mean accepted per verify", title="k = 8, min_budget 128, T = 0.6")
    for axis in (by_k, by_s):
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("SmolLM2-135M-Instruct, 64 reasoning prompts, 2048 new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: list[dict], name: str, device: str, date: str) -> None:
    header = ["method", "k", "s", "min_budget", "T", "acceptance_mean", "accept rate", "tokens/round", "wall s"]
    rows = [[r["method"], r["k"], r["budget_ratio"], r["min_budget"], r["temperature"],
             f"{r['acceptance_mean']:.2f}", f"{r['accept_rate']:.2f}", f"{r['tokens_per_round']:.2f}",
             f"{r['wall_s']:.1f}"] for r in results]
    first = results[0]
    markdown = (f"# Draft acceptance — SmolLM2-135M-Instruct, {first['prompts']} prompts x {first['new_tokens']} "
                f"new tokens, {device}, {date}\n\nfloat32. acceptance_mean = accepted drafts "
                f"per verification; accept rate = accepted / drafted.\n\n" + markdown_table(header, rows))
    write_result(name, {"device": device, "date": date, "results": results}, markdown)
    plot(results, RESULTS / f"{name}.png")
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="acceptance")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "pallas"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=2048)
    parser.add_argument("--min-budget", type=int, default=128)
    parser.add_argument("--configs", default=",".join(map(str, range(len(GRID)))),
                        help="comma-separated GRID indices to run, in order")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds; no new config after this")
    parser.add_argument("--merge", nargs="*", type=Path, help="only combine earlier result JSON files")
    args = parser.parse_args()
    if args.merge:
        runs = [json.loads(path.read_text()) for path in args.merge]
        report([r for run in runs for r in run["results"]], args.name, runs[0]["device"], runs[0]["date"])
        return
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
               for p in reasoning_prompts(args.prompts)]
    started, results = time.perf_counter(), []
    for method, k, ratio, temperature in (GRID[int(i)] for i in args.configs.split(",")):
        if time.perf_counter() - started > args.time_budget:
            print(f"time budget reached; skipped {method} k={k} s={ratio} T={temperature}", flush=True)
            continue
        results.append(run_config(loaded, prompts, method, k, ratio, temperature, args))
        print({key: round(v, 3) if isinstance(v, float) else v for key, v in results[-1].items()}, flush=True)
    report(results, args.name, device_description(), today())


if __name__ == "__main__":
    main()
