"""The engine gives identical greedy tokens with the Pallas kernels (interpreted on CPU) and the references."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import generate
from sparsespec_jax.attention import resolve_backend
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

pytestmark = pytest.mark.quick_compiles

TINY = ModelConfig(arch="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True, max_position_embeddings=512)


@pytest.fixture(scope="module")
def tiny_params():
    # Sharper than the default init so greedy continuations vary with context.
    return {name: np.asarray(value) * (1.0 if name.endswith("norm") else 3.0)
            for name, value in random_params(TINY, seed=3, dtype=jnp.float32).items()}


def run(tiny_params, tokenizer, backend: str, method: str) -> list[list[int]]:
    engine = Engine(TINY, tiny_params, tokenizer,
                    EngineConfig(max_batch_size=2, kv_cache_tokens=1024, max_model_len=256, page_size=8,
                                 prefill_chunk_size=16, max_num_batched_tokens=16, attention_backend=backend,
                                 min_context_bucket=64),
                    SpecConfig(method=method, k=3, min_budget=8, budget_ratio=0.1))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (37, 5, 20)]
    return generate(engine, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param("none", marks=pytest.mark.extended), "pillar"])
def test_pallas_and_reference_backends_agree(tiny_params, smollm2, method):
    reference = run(tiny_params, smollm2.tokenizer, "reference", method)
    pallas = run(tiny_params, smollm2.tokenizer, "pallas", method)
    assert pallas == reference
    assert len({tuple(out) for out in reference}) == 3          # distinct continuations: a real comparison


def test_auto_backend_is_reference_on_cpu_and_unknown_names_fail():
    assert resolve_backend("auto") == "reference"
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_backend("cuda")
