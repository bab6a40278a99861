"""Unrolled decoder layers (EngineConfig.unroll_layers) give the same tokens as the layer loop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import generate
from sparsespec_jax.benchmark.e2e import TINY
from sparsespec_jax.benchmark.shapes import placeholder_tokenizer
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

pytestmark = pytest.mark.quick_compiles

MODEL = dataclasses.replace(TINY, num_layers=3)


def rows_of(layout, group: str) -> int:
    """Rows of a batch group (emits, sparse, drafts) in a packed step layout."""
    batch = jax.tree_util.tree_unflatten(layout.treedef, [shape for shape, _ in layout.leaves])[0]
    return getattr(batch, group).slot[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param("none", marks=pytest.mark.extended), "pillar"])
def test_unrolled_layers_match_the_layer_loop(method):
    params = random_params(MODEL, seed=3, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, MODEL.vocab_size, n).tolist() for n in (5, 40, 17, 90)]
    sampling = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    streams = []
    for unroll in (False, True):
        config = EngineConfig(max_batch_size=4, kv_cache_tokens=2048, max_model_len=256, unroll_layers=unroll)
        engine = Engine(MODEL, params, placeholder_tokenizer(), config,
                        SpecConfig(method=method, k=4, min_budget=16))
        streams.append(generate(engine, prompts, sampling))
    assert all(len(stream) == 24 for stream in streams[0])
    assert streams[0] == streams[1]


@pytest.mark.slow
@pytest.mark.extended
def test_unrolled_pillar_step_does_not_copy_the_kv_pool():
    """Each layer's attention reads the pool the next layer updates in place, and the score pass reads it after
    the last layer; a read XLA cannot order before a write makes it keep a copy of the whole pool per layer
    (on an H200 a Qwen3-8B-shaped step once asked for 654 GiB). The Pallas kernels read the pool directly,
    so they are the case that matters."""
    params = random_params(MODEL, seed=3, dtype=jnp.float32)
    config = EngineConfig(max_batch_size=8, kv_cache_tokens=8192, max_model_len=512, unroll_layers=True,
                          attention_backend="pallas", min_context_bucket=512)
    engine = Engine(MODEL, params, placeholder_tokenizer(), config, SpecConfig(method="pillar", k=4, min_budget=16))
    step_fn, calls = engine._step_fn, []
    engine._step_fn = lambda *args: calls.append(args) or step_fn(*args)
    rng = np.random.default_rng(0)
    for _ in range(8):
        engine.add_request(rng.integers(0, MODEL.vocab_size, 300).tolist(),
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    mixed = None
    while mixed is None and engine.has_unfinished():   # up to the first decode-only step with both row kinds
        engine.step()
        layout = calls[-1][4]
        if engine.metrics.steps[-1].prefill_rows == 0 and rows_of(layout, "emits") and rows_of(layout, "sparse"):
            mixed = calls[-1]
    assert mixed is not None, "no decode step had both verify rows (with a score pass) and sparse draft rows"
    pool_bytes = engine.kv.k.size * engine.kv.k.dtype.itemsize
    memory = step_fn.lower(*mixed).compile().memory_analysis()
    assert memory.temp_size_in_bytes < pool_bytes, (memory.temp_size_in_bytes, pool_bytes)
