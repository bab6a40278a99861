"""Random engine configurations under KV pressure against vanilla decoding, on the CPU: every finished stream
must equal a roomy vanilla engine's greedy tokens, and no configuration may raise.

Each seed draws a workload (6-23 requests of 1-39 prompt and 1-89 new tokens, sometimes a stop token) and a
configuration (method, k, batch 4 or 8, a pool from just over one full-length request up to a third of what the
batch needs, host pool or none, burst steps 1/3/4/8, prefill chunk, sync or async) on a tiny random model.
Prints one line per seed; a failing seed reproduces alone with --first-seed N --seconds 1.

  PYTHONPATH=$PWD python scripts/fuzz_engine.py [--first-seed 0] [--seconds 600]
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from sparsespec_jax.benchmark.shapes import placeholder_tokenizer
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.xla_flags import quick_compiles

MODEL = ModelConfig(arch="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True,
                    max_position_embeddings=1024)
MAX_LEN, PAGE = 160, 8


def generate(engine: Engine, prompts, sampling) -> list[list[int]]:
    requests = [engine.add_request(ids, params) for ids, params in zip(prompts, sampling)]
    engine.run()
    return [request.output_ids for request in requests]


def check_seed(seed: int, params) -> str:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(6, 24))
    prompts = [rng.integers(3, 256, int(rng.integers(1, 40))).tolist() for _ in range(count)]
    stop = [int(rng.integers(3, 256))] if rng.random() < 0.3 else []
    sampling = [SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 90)), ignore_eos=True,
                               stop_token_ids=stop) for _ in range(count)]
    vanilla = Engine(MODEL, params, placeholder_tokenizer(),
                     EngineConfig(max_batch_size=8, kv_cache_tokens=8 * 256, max_model_len=MAX_LEN, page_size=PAGE,
                                  min_context_bucket=MAX_LEN, sync_host=True, burst_steps=1),
                     SpecConfig(method="none"))
    expected = generate(vanilla, prompts, sampling)
    method = str(rng.choice(["pillar", "streaming", "none", "pillar"]))
    batch = int(rng.choice([4, 8]))
    burst_steps = int(rng.choice([1, 3, 4, 8]))
    k = int(rng.choice([2, 4]))
    pool = int(rng.integers(MAX_LEN // PAGE + 2, batch * MAX_LEN // PAGE // 3 + 3)) * PAGE
    fields = dict(max_batch_size=batch, kv_cache_tokens=pool, max_model_len=MAX_LEN, page_size=PAGE,
                  min_context_bucket=MAX_LEN, burst_steps=burst_steps, host_kv_tokens=int(rng.choice([0, 4096])),
                  prefill_chunk_size=int(rng.choice([16, 64])), sync_host=bool(rng.random() < 0.3))
    where = f"seed {seed}: {method} k={k} {fields}"
    try:
        engine = Engine(MODEL, params, placeholder_tokenizer(), EngineConfig(**fields),
                        SpecConfig(method=method, k=k, min_budget=8, budget_ratio=0.1))
        outputs = generate(engine, prompts, sampling)
    except Exception as error:                        # report and go on to the next seed
        traceback.print_exc()
        return f"FAIL {where}: {type(error).__name__}: {error}"
    differing = [i for i, (got, want) in enumerate(zip(outputs, expected)) if got != want]
    moves = (f"offloads {engine.scheduler.num_offloads}, restores {engine.num_restores}, "
             f"preemptions {engine.scheduler.num_preemptions}, bursts "
             f"{sum(s.decode_steps > 1 for s in engine.metrics.steps)}")
    return f"{'DIFF' if differing else 'OK  '} {where}: {moves}" + (f"; requests {differing}" if differing else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=600, help="stop starting new seeds after this long")
    args = parser.parse_args()
    params = {name: np.asarray(value) * (1.0 if name.endswith("norm") else 3.0)   # sharper: varied streams
              for name, value in random_params(MODEL, seed=3, dtype=jnp.float32).items()}
    deadline, seed, failures = time.time() + args.seconds, args.first_seed, 0
    with quick_compiles():
        while time.time() < deadline:
            line = check_seed(seed, params)
            failures += not line.startswith("OK")
            print(line, flush=True)
            seed += 1
            # Every configuration compiles new programs; JAX keeps them all, and on a CPU each holds memory
            # maps: without this a process reaches Linux's map limit after a few dozen configurations.
            gc.collect()
            jax.clear_caches()
    print(f"{seed - args.first_seed} seeds, {failures} failing")


if __name__ == "__main__":
    main()
