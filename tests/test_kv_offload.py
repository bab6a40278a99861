"""KV offload: the pool round-trips pages through host memory without the host waiting on a copy, and on a tiny
random model the iterations that offload or restore are timed like any other, so any compile they trigger must
be flagged, or steady-state measurements charge it to the host."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsespec_jax.benchmark.shapes import placeholder_tokenizer
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.kv_cache import KVCache
from sparsespec_jax.kv_offload import (HostKVPool, host_memory_kind, offload_chunks, power_of_two_groups,
                                       restore_chunks)
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

pytestmark = pytest.mark.quick_compiles

# Three layers: shapes no other test compiles, so this engine's offload programs compile here.
CONFIG = ModelConfig(arch="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True,
                     max_position_embeddings=512)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_pool_round_trips_pages_through_host_memory_while_they_are_reused():
    page_size, rng = 4, np.random.default_rng(0)
    shape = (2, 2, 12 * page_size, 8)                              # 12 pages, page 0 the padding page
    original = KVCache(k=jnp.asarray(rng.standard_normal(shape), jnp.float32),
                       v=jnp.asarray(rng.standard_normal(shape), jnp.float32), page_size=page_size)
    kv = KVCache(k=original.k + 0, v=original.v + 0, page_size=page_size)
    pool = HostKVPool(capacity_tokens=5 * page_size, page_size=page_size, chunk_tokens=2 * page_size)
    sets = (jnp.asarray(rng.integers(0, 40, (2, 2, 6)), jnp.int32), jnp.int32(5))
    evicted = [3, 7, 1, 9, 4]                                      # 3 chunks, the last one padded
    assert pool.fits(5) and not pool.fits(6)
    record = pool.offload(kv, evicted, sets)
    host = host_memory_kind(jax.devices()[0])
    assert all(a.sharding.memory_kind == host for chunk in record.chunks for a in chunk)
    assert pool.used_tokens == pool.peak_tokens == 5 * page_size
    assert [chunk[0].shape[2] for chunk in record.chunks] == [2, 1]    # groups of 2 chunks and 1, one call each
    # The pages are reused at once: overwritten with poison before the copies are known to have landed.
    slots = (np.asarray(evicted)[:, None] * page_size + np.arange(page_size)).reshape(-1)
    kv = KVCache(k=kv.k.at[:, :, slots].set(jnp.nan), v=kv.v.at[:, :, slots].set(jnp.nan), page_size=page_size)
    granted = [10, 2, 11, 5, 6]
    kv, restored_sets = pool.restore(kv, record, granted)
    assert pool.used_tokens == 0
    for before, after in zip(evicted, granted):
        for name in ("k", "v"):
            np.testing.assert_array_equal(
                np.asarray(getattr(kv, name))[:, :, after * page_size:(after + 1) * page_size],
                np.asarray(getattr(original, name))[:, :, before * page_size:(before + 1) * page_size])
    assert all(a.sharding.memory_kind == "device" for a in restored_sets)
    np.testing.assert_array_equal(np.asarray(restored_sets[0]), np.asarray(sets[0]))
    assert int(restored_sets[1]) == 5
    assert np.isnan(np.asarray(kv.k)[:, :, 3 * page_size]).all()  # an evicted page not granted back keeps the poison


def test_power_of_two_groups():
    assert power_of_two_groups(1) == [1]
    assert power_of_two_groups(5) == [4, 1]
    assert power_of_two_groups(14) == [8, 4, 2]
    assert sum(power_of_two_groups(1000)) == 1000


@pytest.mark.slow
@pytest.mark.extended         # CI keeps the step's own compile flags (test_engine)
def test_iterations_that_compile_offload_or_restore_programs_are_flagged():
    """Every iteration during which XLA compiled anything (the step, or the gather / scatter / draft-set
    programs of a first offload and restore) is flagged `compiled`, so timed windows leave it out."""
    offload_chunks.clear_cache()
    restore_chunks.clear_cache()
    params = random_params(CONFIG, seed=3, dtype=jnp.float32)
    config = EngineConfig(max_batch_size=8, kv_cache_tokens=384, max_model_len=128, page_size=8,
                          prefill_chunk_size=32, max_num_batched_tokens=40, min_context_bucket=128,
                          min_batch_bucket=8, host_kv_tokens=1024)
    engine = Engine(CONFIG, params, placeholder_tokenizer(), config,
                    SpecConfig(method="pillar", k=4, min_budget=8, budget_ratio=0.1))
    rng = np.random.default_rng(4)
    for _ in range(8):
        engine.add_request(rng.integers(5, 256, int(rng.integers(20, 40))).tolist(),
                           SamplingParams(temperature=0, max_tokens=int(rng.integers(30, 60)), ignore_eos=True))
    compiles = []

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        unflagged, moving_steps = [], []
        while engine.has_unfinished():
            before, moves = len(compiles), engine.scheduler.num_offloads + engine.num_restores
            engine.step()
            step = engine.metrics.steps[-1]
            if engine.scheduler.num_offloads + engine.num_restores > moves:
                moving_steps.append(step.step)
            if len(compiles) > before and not step.compiled:
                unflagged.append(step.step)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert engine.scheduler.num_offloads > 0 and engine.num_restores == engine.scheduler.num_offloads
    assert moving_steps
    assert not unflagged, f"iterations {unflagged} compiled without being flagged (offloads/restores in {moving_steps})"
