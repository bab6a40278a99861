"""Vanilla decode throughput: real SmolLM2 at several batch sizes, and a random-weight Qwen3-1.7B-shaped
model decoding at a steady-state long context.

SmolLM2: chat-templated reasoning prompts, greedy, `--new-tokens` per request with ignore_eos. One run per
batch size; steps that compiled a new shape are excluded from the median step time, and the decode rate is
batch / median step time (end-to-end wall time, compiles included, is reported beside it).
Qwen3-1.7B-shaped (random bf16 weights): requests are placed directly at `--context` tokens with random K/V
in their pages (no prefill), then `--steps` decode steps are timed; the median step gives tokens/s.

  python bench/decode_throughput.py --name decode_cpu --batch 1 16 --new-tokens 512 --qwen3-context 0
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from common import device_description, markdown_table, reasoning_prompts, today, write_result
from sparsespec_jax.attention import resolve_backend
from sparsespec_jax.benchmark.shapes import QWEN3_1_7B
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.loading import DEFAULT_MODEL, load_model
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams

def timed_steps(engine: Engine) -> list[float]:
    times = []
    while engine.has_unfinished():
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return times


def steady_median(times: list[float]) -> float:
    """Median of the steps that did not compile: drop those far slower than the overall median."""
    median = float(np.median(times))
    return float(np.median([t for t in times if t < 3 * median]))


def smollm2_rows(args) -> list[list]:
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    rows = []
    for batch in args.batch:
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
                   for p in reasoning_prompts(batch)]
        config = EngineConfig(attention_backend=args.attention_backend, dtype=args.dtype, max_batch_size=batch,
                              max_model_len=1024,
                              kv_cache_tokens=batch * 1024, max_num_batched_tokens=max(512, batch),
                              prefill_chunk_size=128)
        engine = Engine(loaded.config, loaded.params, tok, config)
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        requests = [engine.add_request(ids, params) for ids in prompts]
        started = time.perf_counter()
        times = timed_steps(engine)
        wall = time.perf_counter() - started
        tokens = sum(len(r.output_ids) for r in requests)
        step = steady_median(times)
        rows.append(["SmolLM2-135M", args.dtype, batch, f"{np.mean([len(p) for p in prompts]):.0f}+{args.new_tokens}",
                     f"{step * 1e3:.2f}", f"{batch / step:.0f}", f"{tokens / wall:.0f}", len(times)])
        print(rows[-1], flush=True)
    return rows


def qwen3_rows(args) -> list[list]:
    cfg = QWEN3_1_7B
    params = random_params(cfg, seed=0, dtype=jnp.bfloat16)
    tokenizer = load_model(args.model).tokenizer     # any tokenizer: ids past its vocabulary decode to ""
    rows = []
    for batch in args.qwen3_batch:
        config = EngineConfig(attention_backend=args.attention_backend, dtype="bfloat16", max_batch_size=batch,
                              max_model_len=args.qwen3_context + 512,
                              kv_cache_tokens=batch * (args.qwen3_context + 512),
                              max_num_batched_tokens=max(512, batch))
        engine = Engine(cfg, params, tokenizer, config)
        place_at_context(engine, batch, args.qwen3_context, args.steps, seed=1)
        times = timed_steps(engine)
        step = float(np.median(times[2:]))
        rows.append(["Qwen3-1.7B-shaped (random)", "bfloat16", batch, f"{args.qwen3_context}+{args.steps}",
                     f"{step * 1e3:.2f}", f"{batch / step:.0f}", "-", len(times)])
        print(rows[-1], flush=True)
        del engine
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="decode_throughput")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "pallas"])
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--qwen3-context", type=int, default=4096, help="0 skips the Qwen3-shaped run")
    parser.add_argument("--qwen3-batch", type=int, nargs="*", default=[64])
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    rows = smollm2_rows(args) if args.batch else []
    if args.qwen3_context:
        rows += qwen3_rows(args)
    header = ["model", "dtype", "batch", "context", "median step ms", "decode tok/s", "end-to-end tok/s", "steps"]
    device = device_description()
    markdown = (f"# Vanilla decode throughput — {device}, {today()}\n\n"
                f"Attention backend: {resolve_backend(args.attention_backend)}. Script: bench/decode_throughput.py.\n\n"
                + markdown_table(header, rows))
    write_result(args.name, {"device": device, "date": today(), "header": header, "rows": rows}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
