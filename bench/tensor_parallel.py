"""Tensor-parallel scaling: decode throughput of one engine split over 1, 2 and 4 devices, vanilla and pillar.

For each degree in `--tp` (degrees above this process's device count are skipped with a note) and each method
(vanilla decoding; pillar, k=8, verify outcomes REPLAYED from systems_ablation.DEFAULT_REPLAY because random
weights accept nothing meaningful), `--batch` requests are placed at `--context` tokens (random K/V generated in
the pool's sharded layout, no prefill), `--warmup` steps run (compiles) and `--steps` steps are timed; timed
steps that compiled a new shape are left out (counted). Random weights are made once, kept
on the host, and placed shard by shard by each engine. The device pool holds every request's whole window, so
nothing is evicted. Reported: tokens/s, scaling efficiency tokens/s(tp) / (tp x tokens/s(1)) per method, and
pillar/vanilla per degree.

`--check` first verifies that greedy float32 token streams of a small 8-KV-head model at each degree equal
those at one device (vanilla and pillar, through engine.run(); on a GPU this runs the Pallas kernels under
shard_map); a FAIL still lets the timing run, then exits non-zero. `--smoke` is a CPU run of the small model
on 4 forced host devices.

  cd bench && python tensor_parallel.py --check                 # 4-GPU host: TP 1, 2, 4
  python bench/tensor_parallel.py --smoke --check                # CPU (compile-bound: a few minutes)
"""

from __future__ import annotations

import os
import sys

# Four CPU devices for the smoke run, and most XLA optimizations off: compiling dominates a smoke run's time.
SMOKE_XLA_FLAGS = "--xla_force_host_platform_device_count=4"
# Qwen3-8B at batch 128 x 4k tokens needs ~97 GB of one H200 at TP1; jax reserves only 75% of it by default.
GPU_MEMORY_FRACTION = "0.92"


def prepare_environment(argv: list[str]) -> None:
    """Settings jax reads once, when it is first imported: a smoke run on 4 CPU devices, or a device memory
    pool large enough for the TP1 KV pool. Values already in the environment win."""
    if "--smoke" in argv:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("XLA_FLAGS", SMOKE_XLA_FLAGS)
        os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)


if __name__ == "__main__":
    prepare_environment(sys.argv[1:])

import argparse  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import device_description, markdown_table, today, write_result  # noqa: E402
from sparsespec_jax.benchmark.shapes import QWEN3_8B, placeholder_tokenizer  # noqa: E402
from sparsespec_jax.benchmark.steady_state import place_at_context  # noqa: E402
from sparsespec_jax.benchmark.timed_window import acceptance_summary, time_window  # noqa: E402
from sparsespec_jax.config import ModelConfig, param_shapes  # noqa: E402
from sparsespec_jax.engine import DTYPES, Engine, EngineConfig  # noqa: E402
from sparsespec_jax.model import random_params  # noqa: E402
from sparsespec_jax.sampling import SamplingParams  # noqa: E402
from sparsespec_jax.sharding import TP_AXIS, check_tensor_parallel, param_partition_spec  # noqa: E402
from sparsespec_jax.spec.config import SpecConfig  # noqa: E402
from systems_ablation import DEFAULT_REPLAY  # noqa: E402

METHODS = ("none", "pillar")
METHOD_LABELS = {"none": "vanilla", "pillar": "pillar"}
# Qwen3-style, 8 KV heads (splits 1, 2, 4 and 8 ways), an untied (vocabulary-split) LM head; head_dim 64 as
# the GPU kernels are exercised with.
TINY = ModelConfig(arch="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=2,
                   num_heads=16, num_kv_heads=8, head_dim=64, qk_norm=True, tie_word_embeddings=False,
                   max_position_embeddings=4096)
MODELS = {"qwen3-8b-shaped": QWEN3_8B, "tiny": TINY}
SMOKE = dict(model="tiny", dtype="float32", batch=4, context=64, warmup=4, steps=8, tp=[1, 2, 4], min_budget=16)
PAGE_SIZE = 16

# --check: a few float32 requests of 16-24 prompt tokens, longer than the draft budget (drafts really are
# sparse). All prompts fit one prefill step and every group one row bucket: few compiled shapes per engine.
CHECK_REQUESTS = 4
CHECK_PROMPT_TOKENS = (16, 24)
CHECK_NEW_TOKENS = 16
CHECK_MAX_LEN = 64
CHECK_MIN_BUDGET = 8


# -- memory ----------------------------------------------------------------------------------------------

def estimated_device_bytes(cfg: ModelConfig, config: EngineConfig, spec: SpecConfig) -> int:
    """Bytes one device holds for weights, the KV pool and the slot state (activations and compiled code not
    counted): split tensors divided by the degree, replicated ones whole."""
    tp = config.tensor_parallel
    itemsize = jnp.dtype(DTYPES[config.dtype]).itemsize
    weights = 0
    for name, shape in param_shapes(cfg).items():
        split = TP_AXIS in param_partition_spec(name, shape, tp)
        weights += math.prod(shape) * itemsize // (tp if split else 1)
    num_pages = -(-config.kv_cache_tokens // config.page_size) + 1
    pool = 2 * cfg.num_layers * cfg.num_kv_heads * num_pages * config.page_size * cfg.head_dim * itemsize // tp
    slots = config.max_batch_size + 1
    state = slots * (spec.k + 1) * 4
    if spec.drafts_with_model:
        max_len = min(config.max_model_len, cfg.max_position_embeddings)
        capacity = spec.max_budget(max_len) + spec.k
        state += slots * cfg.num_layers * cfg.num_kv_heads * capacity * 4 // tp     # draft sets
        state += slots * spec.k * cfg.vocab_size * 4                                  # draft log-probs
    return weights + pool + state


def device_bytes_in_use(tensor_parallel: int) -> int | None:
    """Largest allocator use among the engine's devices, where the platform reports it (GPUs do, CPUs not)."""
    stats = [device.memory_stats() for device in jax.local_devices()[:tensor_parallel]]
    if any(s is None or "bytes_in_use" not in s for s in stats):
        return None
    return max(s["bytes_in_use"] for s in stats)


# -- timing ----------------------------------------------------------------------------------------------

def steady_state_config(args, tensor_parallel: int) -> tuple[EngineConfig, int]:
    """Engine settings whose pool holds every request's whole window, and the new tokens each may take."""
    new_tokens = args.warmup + args.steps + 2 * (args.k + 1)      # <= 1 token per step, plus a round in flight
    max_len = args.context + new_tokens + 1
    per_request = -(-(max_len + args.k) // PAGE_SIZE) * PAGE_SIZE
    config = EngineConfig(dtype=args.dtype, attention_backend=args.attention_backend, page_size=PAGE_SIZE,
                          max_batch_size=args.batch, max_model_len=max_len, kv_cache_tokens=args.batch * per_request,
                          max_num_batched_tokens=args.batch * (args.k + 1), min_batch_bucket=min(16, args.batch),
                          min_context_bucket=max_len, host_kv_tokens=0, tensor_parallel=tensor_parallel,
                          unroll_layers=args.unroll_layers, burst_steps=args.burst_steps)
    return config, new_tokens


def spec_for(method: str, args) -> SpecConfig:
    return SpecConfig(method=method, k=args.k, min_budget=args.min_budget,
                      replay_acceptance=tuple(args.replay) if method != "none" else None)


def time_engine(cfg, params, tokenizer, args, tensor_parallel: int, method: str) -> dict:
    """Throughput of `--steps` steady-state decode steps of one engine; wall_s is the whole row (placing weights,
    compiling, warming up), for planning runs."""
    started = time.perf_counter()
    config, new_tokens = steady_state_config(args, tensor_parallel)
    spec = spec_for(method, args)
    engine = Engine(cfg, params, tokenizer, config, spec)
    place_at_context(engine, args.batch, args.context, new_tokens, seed=1)
    window = time_window(engine, args.warmup, args.steps)
    result = {"tokens_per_s": window.tokens_per_s, "step_ms": window.step_ms, "host_ms": window.mean("host_ms"),
              "wait_ms": window.mean("wait_ms"), "tokens_per_step": window.mean("tokens"),
              "accepted_per_verify": acceptance_summary(window.acceptance_counts)["accepted_per_verify"],
              "steps_timed": sum(s.decode_steps for s in window.steady), "steps_excluded": len(window.compiled),
              "preemptions": engine.scheduler.num_preemptions, "burst_steps": engine.burst_steps,
              "device_bytes_in_use": device_bytes_in_use(tensor_parallel),
              "wall_s": time.perf_counter() - started}
    del engine
    gc.collect()                  # an engine left in a reference cycle (a traceback) frees its KV pool
    return result


def host_params(cfg: ModelConfig, dtype: str, seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random weights on the host, made once: each engine places them shard by shard (a device never holds a
    whole split tensor), and no device keeps a copy between engines. `scale` sharpens all but the norms."""
    params = {}
    for name, value in random_params(cfg, seed=seed, dtype=DTYPES[dtype]).items():
        host = np.asarray(value)
        params[name] = host if scale == 1 or name.endswith("norm") else (host * scale).astype(host.dtype)
        value.delete()                                    # frees the device copy before the next tensor lands
    return params


# -- correctness ----------------------------------------------------------------------------------------

def greedy_streams(params, tokenizer, args, tensor_parallel: int, method: str) -> list[list[int]]:
    """Greedy float32 output tokens of CHECK_REQUESTS random prompts on the small model."""
    engine = Engine(TINY, params, tokenizer,
                    EngineConfig(attention_backend=args.attention_backend, page_size=PAGE_SIZE,
                                 max_batch_size=CHECK_REQUESTS, kv_cache_tokens=CHECK_REQUESTS * CHECK_MAX_LEN * 2,
                                 max_model_len=CHECK_MAX_LEN, prefill_chunk_size=CHECK_PROMPT_TOKENS[1],
                                 max_num_batched_tokens=CHECK_REQUESTS * max(CHECK_PROMPT_TOKENS[1], args.k + 1),
                                 min_context_bucket=CHECK_MAX_LEN, min_batch_bucket=CHECK_REQUESTS,
                                 tensor_parallel=tensor_parallel, burst_steps=args.burst_steps),
                    SpecConfig(method=method, k=args.k, min_budget=CHECK_MIN_BUDGET))
    rng = np.random.default_rng(7)
    greedy = SamplingParams(temperature=0, max_tokens=CHECK_NEW_TOKENS, ignore_eos=True)
    lengths = rng.integers(*CHECK_PROMPT_TOKENS, size=CHECK_REQUESTS, endpoint=True)
    requests = [engine.add_request(rng.integers(0, TINY.vocab_size, int(n)).tolist(), greedy) for n in lengths]
    engine.run()
    streams = [request.output_ids for request in requests]
    del engine, requests
    gc.collect()
    return streams


def check_degrees(degrees: list[int], tokenizer, args) -> list[dict]:
    """Compare each degree's greedy streams with one device's, per method; prints PASS/FAIL per degree."""
    if max(degrees) == 1:
        print("check: nothing to compare, no degree above 1 runs here", flush=True)
        return []
    # Sharper than the default init, so each continuation depends on its prompt.
    params = host_params(TINY, "float32", seed=3, scale=3.0)
    reference = {method: greedy_streams(params, tokenizer, args, 1, method) for method in METHODS}
    distinct = len({tuple(stream) for stream in reference["none"]})
    lossless = sum(a == b for a, b in zip(reference["pillar"], reference["none"]))
    print(f"check: TP1 reference has {distinct} distinct streams of {CHECK_REQUESTS}; pillar equals vanilla "
          f"on {lossless} of {CHECK_REQUESTS} at TP1", flush=True)
    results = []
    for tensor_parallel in (d for d in degrees if d > 1):
        equal = {}
        for method in METHODS:
            streams = greedy_streams(params, tokenizer, args, tensor_parallel, method)
            equal[method] = sum(a == b for a, b in zip(streams, reference[method]))
        passed = all(count == CHECK_REQUESTS for count in equal.values())
        results.append({"tensor_parallel": tensor_parallel, "passed": passed,
                        **{f"{METHOD_LABELS[m]}_equal": equal[m] for m in METHODS}, "requests": CHECK_REQUESTS})
        print(f"check TP{tensor_parallel}: {'PASS' if passed else 'FAIL'} (streams equal to TP1: "
              + ", ".join(f"{METHOD_LABELS[m]} {equal[m]}/{CHECK_REQUESTS}" for m in METHODS) + ")", flush=True)
    return results


# -- report ----------------------------------------------------------------------------------------------

def add_comparisons(rows: list[dict]) -> dict[int, float]:
    """Fill each row's scaling efficiency against the same method at TP1; return pillar/vanilla per degree."""
    rate = {(r["tensor_parallel"], r["method"]): r.get("tokens_per_s") for r in rows}
    for row in rows:
        base = rate.get((1, row["method"]))
        row["scaling_efficiency"] = (row["tokens_per_s"] / (row["tensor_parallel"] * base)
                                     if base and row.get("tokens_per_s") else None)
    ratios = {}
    for tensor_parallel in sorted({r["tensor_parallel"] for r in rows}):
        vanilla, pillar = rate.get((tensor_parallel, "none")), rate.get((tensor_parallel, "pillar"))
        if vanilla and pillar:
            ratios[tensor_parallel] = pillar / vanilla
    return ratios


def render(args, device: str, num_devices: int, rows: list[dict], ratios: dict[int, float], check, skipped) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    header = ["TP", "method", "tok/s", "scaling eff.", "step ms", "host ms", "wait ms", "tokens/step",
              "accepted/verify", "excluded steps", "steps per call", "est. GiB/device", "in use GiB/device"]
    table = [[r["tensor_parallel"], METHOD_LABELS[r["method"]]]
             + ([r["error"]] + ["-"] * 8 if "error" in r else
                [f"{r['tokens_per_s']:.0f}", fmt(r["scaling_efficiency"], ".2f"), f"{r['step_ms']:.2f}",
                 f"{r['host_ms']:.2f}", f"{r['wait_ms']:.2f}", f"{r['tokens_per_step']:.0f}",
                 f"{r['accepted_per_verify']:.2f}", r["steps_excluded"], r["burst_steps"]])
             + [f"{r['estimated_device_bytes'] / 2**30:.2f}",
                fmt(r.get("device_bytes_in_use") and r["device_bytes_in_use"] / 2**30, ".2f")] for r in rows]
    text = (f"# Tensor-parallel scaling — {num_devices} x {device}, {today()}\n\n"
            f"Model {args.model} ({args.dtype}, random weights), batch {args.batch} placed at {args.context} tokens, "
            f"{args.warmup} warm-up + {args.steps} timed steps per row (steps that compiled a "
            f"shape excluded), pool holding every request's window (no eviction). Pillar k={args.k}, min budget "
            f"{args.min_budget}; its verify outcomes are REPLAYED from {tuple(args.replay)} (accepted 0..k), not "
            f"computed. Scaling efficiency = tok/s(TP) / (TP x tok/s(TP1)) of the same method. Estimated memory: "
            f"weights + KV pool + slot state. Decoder layers {'unrolled' if args.unroll_layers else 'in a loop'}. "
            f"Script: bench/tensor_parallel.py.\n\n")
    if skipped:
        text += f"Skipped degrees {skipped}: more than the {num_devices} device(s) of this host.\n\n"
    if check is not None:
        text += "Check (greedy float32 streams of the tiny model equal TP1's): " + (", ".join(
            f"TP{c['tensor_parallel']} {'PASS' if c['passed'] else 'FAIL'} (vanilla {c['vanilla_equal']}/"
            f"{c['requests']}, pillar {c['pillar_equal']}/{c['requests']})" for c in check) or "no degree > 1") + "\n\n"
    text += markdown_table(header, table)
    if ratios:
        text += "\n" + markdown_table(["TP", "pillar / vanilla tok/s"],
                                      [[tp, f"{ratio:.2f}"] for tp, ratio in ratios.items()])
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="tensor_parallel", help="result file name under bench/results")
    parser.add_argument("--model", default="qwen3-8b-shaped", choices=sorted(MODELS))
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--unroll-layers", action="store_true",
                        help="trace every layer into the step instead of a loop (about 5x the compile time)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="tensor-parallel degrees")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--min-budget", type=int, default=128)
    parser.add_argument("--replay", type=float, nargs="+", default=DEFAULT_REPLAY,
                        help="probabilities of accepting 0..k drafts (pillar)")
    parser.add_argument("--check", action="store_true", help="first check TP=N greedy streams equal TP=1")
    parser.add_argument("--burst-steps", type=int, default=None,
                        help="decode steps per jitted call (EngineConfig.burst_steps), in the check too; default: "
                             "the engine's (8 on GPUs, else 1)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"CPU run of the tiny model on 4 host devices: defaults {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)           # explicit flags still win
        args = parser.parse_args(argv)
    for name in ("batch", "context", "warmup", "steps"):
        if getattr(args, name) < (2 if name == "context" else 1):
            parser.error(f"--{name}: must be at least {2 if name == 'context' else 1}, got {getattr(args, name)}")
    if min(args.tp) < 1:
        parser.error(f"--tp: degrees must be positive, got {args.tp}")
    max_len = args.context + args.warmup + args.steps + 2 * (args.k + 1) + 1
    if max_len > MODELS[args.model].max_position_embeddings:
        parser.error(f"--context {args.context} + window: {max_len} tokens exceed {args.model}'s "
                     f"{MODELS[args.model].max_position_embeddings} positions")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = MODELS[args.model]
    num_devices = jax.local_device_count()
    degrees = sorted(set(args.tp))
    skipped = [d for d in degrees if d > num_devices]
    degrees = [d for d in degrees if d <= num_devices]
    for tensor_parallel in skipped:
        print(f"note: skipping TP{tensor_parallel}: this host has {num_devices} device(s)", flush=True)
    for tensor_parallel in degrees:
        check_tensor_parallel(cfg, tensor_parallel, model_name=args.model)
    for method in METHODS:
        spec_for(method, args)                # bad --k / --replay / --min-budget fail here, before any work
    tokenizer = placeholder_tokenizer()
    device = device_description()

    check = check_degrees(degrees, tokenizer, args) if args.check else None
    params = host_params(cfg, args.dtype, seed=0)
    rows = []
    for tensor_parallel in degrees:
        for method in METHODS:
            config, _ = steady_state_config(args, tensor_parallel)
            estimate = estimated_device_bytes(cfg, config, spec_for(method, args))
            print(f"TP{tensor_parallel} {METHOD_LABELS[method]}: ~{estimate / 2**30:.2f} GiB per device "
                  f"(weights + KV pool + slot state)", flush=True)
            row = {"tensor_parallel": tensor_parallel, "method": method, "estimated_device_bytes": estimate}
            try:
                row.update(time_engine(cfg, params, tokenizer, args, tensor_parallel, method))
            except jax.errors.JaxRuntimeError as error:
                if "RESOURCE_EXHAUSTED" not in str(error):
                    raise
                row["error"] = "out of device memory"        # recorded; the other rows still run
            gc.collect()                                     # (the failed engine dies with the traceback)
            rows.append(row)
            print(f"TP{tensor_parallel} {METHOD_LABELS[method]}:", row, flush=True)
            ratios = add_comparisons(rows)
            markdown = render(args, device, num_devices, rows, ratios, check, skipped)
            write_result(args.name, {"device": device, "devices": num_devices, "date": today(), "args": vars(args),
                                     "replay_acceptance": list(args.replay), "skipped_degrees": skipped,
                                     "check": check, "rows": rows,
                                     "pillar_over_vanilla": {str(tp): r for tp, r in ratios.items()}}, markdown)
    print(f"total {time.perf_counter() - started:.0f} s\n", flush=True)
    print(render(args, device, num_devices, rows, add_comparisons(rows), check, skipped))
    return 1 if check is not None and not all(c["passed"] for c in check) else 0


if __name__ == "__main__":
    sys.exit(main())
