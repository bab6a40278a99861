"""On a GPU: the engine's greedy tokens with the Pallas kernels (unified launch, running ahead, staggered
cycles, decode bursts, bursts that offload and restore requests) equal vanilla decoding with the jnp
references, on a random float32 model.

  PYTHONPATH=$PWD:bench python scripts/gpu/engine_check.py
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from sparsespec_jax.benchmark.shapes import placeholder_tokenizer
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

MODEL = ModelConfig(arch="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=4,
                    num_heads=8, num_kv_heads=2, head_dim=64, qk_norm=True, tie_word_embeddings=True,
                    max_position_embeddings=4096)


def generate(method: str, backend: str, **fields) -> tuple[list[list[int]], Engine]:
    params = {name: np.asarray(v) * (1.0 if name.endswith("norm") else 3.0)
              for name, v in random_params(MODEL, seed=3, dtype=jnp.float32).items()}
    config = EngineConfig(**{**dict(max_batch_size=32, kv_cache_tokens=32 * 1024, max_model_len=1024,
                                    attention_backend=backend, max_num_batched_tokens=32 * 9,
                                    min_context_bucket=1024), **fields})
    engine = Engine(MODEL, params, placeholder_tokenizer(), config, SpecConfig(method=method, k=8, min_budget=32))
    rng = np.random.default_rng(0)
    requests = [engine.add_request(rng.integers(5, 4096, int(rng.integers(50, 400))).tolist(),
                                   SamplingParams(temperature=0, max_tokens=int(rng.integers(32, 160)),
                                                  ignore_eos=True)) for _ in range(48)]
    engine.run()
    return [r.output_ids for r in requests], engine


MODES = {
    "pillar": ("pillar", dict(burst_steps=1)),
    "pillar-phased-sync": ("pillar", dict(scheduler="phased", sync_host=True, burst_steps=1)),
    "none": ("none", dict(burst_steps=1)),
    "pillar-burst": ("pillar", dict(burst_steps=8)),
    "streaming-burst": ("streaming", dict(burst_steps=8)),
    "none-burst": ("none", dict(burst_steps=8)),
    # A pool of a third of what the batch needs: bursts offload requests to fit and restore them.
    "pillar-burst-offload": ("pillar", dict(burst_steps=8, kv_cache_tokens=4096, host_kv_tokens=32 * 1024)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()
    expected, _ = generate("none", "reference", sync_host=True)
    for name in args.modes:
        method, fields = MODES[name]
        outputs, engine = generate(method, "pallas", **fields)
        same = sum(a == b for a, b in zip(outputs, expected))
        print(f"{name} {fields or 'unified async'}: {same} of {len(expected)} token streams equal vanilla/reference"
              f" ({engine.scheduler.num_offloads} offloads, {engine.num_restores} restores)")


if __name__ == "__main__":
    main()
