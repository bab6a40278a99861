"""KV offload on a tiny random model: the iterations that offload or restore are timed like any other, so any
compile they trigger must be flagged, or steady-state measurements charge it to the host."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsespec_jax.benchmark.shapes import placeholder_tokenizer
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.kv_offload import gather_pages, scatter_pages
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

# Three layers: shapes no other test compiles, so this engine's offload programs compile here.
CONFIG = ModelConfig(arch="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True,
                     max_position_embeddings=512)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.mark.slow
def test_iterations_that_compile_offload_or_restore_programs_are_flagged():
    """Every iteration during which XLA compiled anything (the step, or the gather / scatter / draft-set
    programs of a first offload and restore) is flagged `compiled`, so timed windows leave it out."""
    gather_pages.clear_cache()
    scatter_pages.clear_cache()
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
