"""Systems ablation: naive sparse self-speculation, then + unified batches, + running ahead of the device,
+ KV offload, + decode bursts (several steps per jitted call, decode_burst.py) — one row each, same model, same
requests, same device pool, one run; vanilla decoding with and without bursts for reference.

Steady-state window: `--batch` requests are placed at `--context` tokens (random K/V, no prefill), then
`--warmup` steps (compiles included) and `--steps` timed steps run per configuration; output lengths are
spread over the window so requests finish and free pages; steps that compiled a new shape are left out. The
device pool leaves each request only `--headroom` tokens to grow, so eviction starts within the window in every
row: the first three recompute evicted requests (preemption), the last moves their KV to host memory and back.
Random weights accept nothing meaningful, so verify outcomes are replayed from `--replay` (probabilities of
accepting 0..k drafts, measured on the real model) — stated in the report. With `--real-model` (a .gguf, a
Hugging Face directory or a registry name) the real weights run instead: every request's context is real
text (the reasoning prompts chat-templated back to back) prefilled for real before the window, tokens are
sampled at `--temperature` and acceptance is the model's own; the pool then also leaves room for what early
requests decode while later ones still prefill. Per row: output tokens/s, host ms
per step, device ms per step (a second engine of the row's configuration in sync mode: the median wait right
after each dispatch), output tokens emitted per step and tokens fed per step (recomputed prompts included).
The first `--plot-steps` timed steps of every row are drawn as tokens fed per step (<name>_tokens_per_step.png):
the naive row's phase-synchronous steps swing between drafts and verifies, the unified rows' stay level.

  python bench/systems_ablation.py --batch 128 --context 2048 --steps 200
  python bench/systems_ablation.py --real-model ~/sparsespec-model/SmolLM2-135M-Instruct.Q4_1.gguf --context 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from common import RESULTS, device_description, markdown_table, today, write_result
from sparsespec_jax.benchmark.e2e import (DEFAULT_PROMPTS, FILL_CHUNK, FILL_TOKENS, chat_token_ids,
                                          context_prompts, fill_steps, read_prompts, run_fill)
from sparsespec_jax.benchmark.shapes import SHAPES, placeholder_tokenizer
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.benchmark.step_plot import plot_tokens_per_step, tokens_series
from sparsespec_jax.benchmark.timed_window import acceptance_summary, compile_split, time_window
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.loading import load_model
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

ROWS = [  # label, draft method, scheduler, sync_host, host pool, decode steps per call
    ("naive (phased, sync, recompute)", "pillar", "phased", True, False, 1),
    ("+ unified batches", "pillar", "unified", True, False, 1),
    ("+ delayed verification (async host)", "pillar", "unified", False, False, 1),
    ("+ KV offload to host", "pillar", "unified", False, True, 1),
    ("+ decode bursts (8 steps per call)", "pillar", "unified", False, True, 8),
    ("vanilla decoding (same engine, async, offload)", "none", "unified", False, True, 1),
    ("vanilla decoding, decode bursts (8 steps per call)", "none", "unified", False, True, 8),
]
# Accepted-draft counts 0..8 measured on SmolLM2 (pillar, k=8, T=0.6; bench/results/acceptance_h200.json).
DEFAULT_REPLAY = (0.08, 0.05, 0.05, 0.05, 0.06, 0.07, 0.08, 0.10, 0.46)
SMALL = ModelConfig(arch="qwen3", vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True, tie_word_embeddings=True,
                    max_position_embeddings=8192)


@dataclasses.dataclass
class Workload:
    """The model every row runs, and for real weights the text each request's context is filled with."""
    name: str
    weights: str                                     # how the report describes them
    cfg: ModelConfig
    params: dict
    tokenizer: object
    context_ids: list[list[int]] | None = None      # real weights: `--context` tokens of real text per request

    @property
    def real(self) -> bool:
        return self.context_ids is not None


def load_workload(args) -> Workload:
    if args.real_model is None:
        cfg = SHAPES.get(args.model, SMALL)
        params = random_params(cfg, seed=0, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
        return Workload(args.model, f"{args.dtype}, random weights", cfg, params, placeholder_tokenizer())
    loaded = load_model(args.real_model)
    prompt_ids = chat_token_ids(loaded.tokenizer, read_prompts(args.prompts), args.real_model)
    return Workload(Path(args.real_model).name, f"{args.dtype}, real weights", loaded.config, loaded.params,
                    loaded.tokenizer, context_prompts(prompt_ids, args.batch, args.context))


def placed_engine(workload: Workload, args, method: str, scheduler: str, sync_host: bool, offload: bool,
                  burst_steps: int = 1) -> tuple[Engine, float]:
    """An engine with the row's configuration and `--batch` requests at `--context`: placed with random KV
    (random weights) or prefilled with real text (real weights); and the mean context the window starts at
    (requests that finished prefilling first have decoded a little since)."""
    window = args.warmup + args.steps
    # Real fills: requests that finish prefilling first decode (up to a token per step, one verify more)
    # while the rest still prefill; the pool leaves that room on top of the window's headroom.
    fill_growth = fill_steps(args.batch, args.context) + args.k + 1 if workload.real else 0
    pool = args.batch * (args.context + fill_growth + args.headroom)
    need = args.batch * (args.context + fill_growth + window + args.k + 1)
    max_len = min(args.context + fill_growth + window + 64, workload.cfg.max_position_embeddings)
    config = EngineConfig(dtype=args.dtype, attention_backend=args.attention_backend, max_batch_size=args.batch,
                          max_model_len=max_len, kv_cache_tokens=pool,
                          max_num_batched_tokens=max(args.batch * (args.k + 1), FILL_TOKENS if workload.real else 0),
                          prefill_chunk_size=FILL_CHUNK if workload.real else EngineConfig.prefill_chunk_size,
                          min_batch_bucket=16, min_context_bucket=args.context, scheduler=scheduler,
                          sync_host=sync_host, unroll_layers=args.unroll_layers, burst_steps=burst_steps,
                          host_kv_tokens=need if offload else 0, seed=args.seed)
    replay = None if workload.real or method == "none" else args.replay
    spec = SpecConfig(method=method, k=args.k, min_budget=args.min_budget, replay_acceptance=replay)
    engine = Engine(workload.cfg, workload.params, workload.tokenizer, config, spec)
    # Output lengths spread over the window, so requests finish, free pages and evicted ones come back.
    rng = np.random.default_rng(2)
    temperature = args.temperature if workload.real else 0.0
    sampling = [SamplingParams(temperature=temperature, seed=args.seed + i, max_tokens=int(n) + fill_growth,
                               ignore_eos=True)
                for i, n in enumerate(rng.integers(window // 3, window, args.batch))]
    if not workload.real:
        place_at_context(engine, args.batch, args.context, window, seed=1, reserve=0, params=sampling)
        return engine, float(args.context)
    requests = [engine.add_request(ids, p) for ids, p in zip(workload.context_ids, sampling)]
    return engine, run_fill(engine, requests)


def device_ms(workload: Workload, args, method: str, scheduler: str, offload: bool) -> float:
    """Device time per step: the median wait of a sync-mode engine right after it dispatches each step (the
    host then blocks on the step alone), over --device-steps steps after a k + 2-step warm-up."""
    engine, _ = placed_engine(workload, args, method, scheduler, True, offload)
    for _ in range(args.k + 2 + args.device_steps):
        engine.step()
    steady, _, _ = compile_split(engine.metrics.steps[args.k + 2:])
    waits = [s.wait_ms for s in steady]
    del engine
    gc.collect()
    return float(np.median(waits)) if waits else float("nan")


def run_row(workload: Workload, args, method: str, scheduler: str, sync_host: bool, offload: bool,
            burst_steps: int) -> dict:
    engine, start_context = placed_engine(workload, args, method, scheduler, sync_host, offload, burst_steps)
    window = time_window(engine, args.warmup, args.steps)    # compile steps are left out
    result = {"tokens_per_s": window.tokens_per_s, "host_ms": window.mean("host_ms"),
              "wait_ms": window.mean("wait_ms"), "step_ms": window.step_ms,
              "steps_timed": sum(s.decode_steps for s in window.steady),
              "tokens_per_step": window.mean("tokens"), "emitted_per_step": window.mean("emitted_tokens"),
              "accepted_per_verify": acceptance_summary(window.acceptance_counts)["accepted_per_verify"],
              "preemptions": engine.scheduler.num_preemptions, "offloads": engine.scheduler.num_offloads,
              "restores": engine.num_restores, "peak_host_kv_tokens": engine.host_kv.peak_tokens,
              "context_mean_at_start": start_context, "tokens_fed_per_timed_step": tokens_series(window.steps)}
    del engine
    gc.collect()                  # an engine left in a reference cycle (a traceback) frees its KV pool
    result["device_ms"] = device_ms(workload, args, method, scheduler, offload)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="systems_ablation")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="row indices to run (default: all)")
    parser.add_argument("--model", default="qwen3-1.7b-shaped", choices=[*SHAPES, "small"],
                        help="random weights of this shape (acceptance is replayed, so weights do not matter)")
    parser.add_argument("--real-model", default=None,
                        help="run real weights instead (.gguf, Hugging Face directory or registry name): real text "
                             "prefilled to --context, sampling at --temperature, the model's own acceptance")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL prompts the real contexts are made of")
    parser.add_argument("--temperature", type=float, default=0.6, help="real weights only (random: greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--unroll-layers", action="store_true",
                        help="trace every layer into the step instead of a loop (about 5x the compile time)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device-steps", type=int, default=10, help="sync-mode steps timed for device ms")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--min-budget", type=int, default=128)
    parser.add_argument("--headroom", type=int, default=32, help="tokens each request may grow before eviction")
    parser.add_argument("--replay", type=float, nargs="*", default=DEFAULT_REPLAY)
    parser.add_argument("--plot-steps", type=int, default=60, help="timed steps per row in the tokens-per-step plot")
    args = parser.parse_args()
    workload = load_workload(args)
    header = ["configuration", "tok/s", "x naive", "host ms/step", "device ms/step", "waiting ms/step", "step ms",
              "emitted/step", "tokens fed/step", "accepted/verify", "preempt", "offload", "restore"]
    rows, results = [], []
    device = device_description()
    for index, (label, method, scheduler, sync_host, offload, burst_steps) in enumerate(ROWS):
        if args.only is not None and index not in args.only:
            continue
        result = run_row(workload, args, method, scheduler, sync_host, offload, burst_steps)
        results.append({"configuration": label, **result})
        base = results[0]["tokens_per_s"]                        # the first row run
        rows.append([label, f"{result['tokens_per_s']:.0f}", f"{result['tokens_per_s'] / base:.2f}",
                     f"{result['host_ms']:.2f}", f"{result['device_ms']:.2f}", f"{result['wait_ms']:.2f}",
                     f"{result['step_ms']:.2f}", f"{result['emitted_per_step']:.1f}",
                     f"{result['tokens_per_step']:.0f}", f"{result['accepted_per_verify']:.2f}",
                     result["preemptions"], result["offloads"], result["restores"]])
        print(rows[-1], flush=True)
        if workload.real:
            placement = (f"prefilled with real text to {args.context} tokens ({fill_steps(args.batch, args.context)} "
                         f"fill steps of {FILL_TOKENS} tokens before the window)")
            acceptance = f"Sampling at T={args.temperature}, the model's own acceptance (nothing replayed)."
        else:
            placement = f"placed at {args.context} tokens (random KV)"
            acceptance = f"Verify outcomes REPLAYED from {args.replay} (accepted 0..k), not computed."
        markdown = (f"# Systems ablation — {device}, {today()}\n\n"
                    f"Model {workload.name} ({workload.weights}), pillar k={args.k}, batch {args.batch} {placement}, "
                    f"{args.warmup} warm-up + {args.steps} timed steps per row, device pool batch x (context + "
                    f"{args.headroom}{' + fill growth' if workload.real else ''}) tokens. {acceptance} Device "
                    f"ms/step: median wait of a sync-mode engine of the row's configuration (one step per call) "
                    f"right after each dispatch, over {args.device_steps} steps. Decoder layers "
                    f"{'unrolled' if args.unroll_layers else 'in a loop'}. Script: bench/systems_ablation.py.\n\n"
                    + markdown_table(header, rows))
        write_result(args.name, {"device": device, "date": today(), "args": vars(args), "rows": results}, markdown)
        plot_tokens_per_step({r["configuration"]: r["tokens_fed_per_timed_step"][:args.plot_steps] for r in results},
                             RESULTS / f"{args.name}_tokens_per_step.png",
                             f"Tokens fed per step: {workload.name}, batch {args.batch}, context {args.context}, "
                             f"pillar k={args.k}")
    print(markdown)


if __name__ == "__main__":
    main()
