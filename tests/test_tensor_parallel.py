"""Tensor parallelism changes where heads live, not what is generated: greedy tokens match one device exactly.

Speculative decoding is lossless, so a pillar engine on N devices must reproduce vanilla greedy decoding on one
device token for token (one-device pillar against one-device vanilla is test_systems' check): each model's
one-device vanilla run is the one reference for both methods, computed once per module (a module runs on one
worker).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FACTS_PROMPT, generate
from sparsespec_jax.config import ModelConfig, param_shapes
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.sharding import ShardingError
from sparsespec_jax.spec.config import SpecConfig

# Qwen3-style: q/k norms, grouped queries (2 per KV head), an untied LM head; 8 KV heads split 2 or 4 ways.
TINY_GQA = ModelConfig(arch="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=16, num_kv_heads=8, head_dim=16, qk_norm=True, tie_word_embeddings=False,
                       max_position_embeddings=512)
SMOLLM2_PROMPTS = [
    FACTS_PROMPT,
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
# Contexts of 15-19 prompt tokens and a budget of 8: draft steps really attend to a per-head subset. Eight new
# tokens with k = 3 take a dense first round and at least one sparse one.
SMOLLM2_ENGINE = dict(max_batch_size=4, kv_cache_tokens=512, max_model_len=256, min_context_bucket=64,
                      prefill_chunk_size=32, max_num_batched_tokens=64, spec_k=3, min_budget=8)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_params():
    # Sharper than a unit-variance init so greedy continuations depend on the context.
    rng = np.random.default_rng(5)
    return {name: np.ones(shape, np.float32) if name.endswith("norm")
            else (3 * rng.standard_normal(shape) / np.sqrt(shape[-2] if name != "embed" else shape[-1]))
            .astype(np.float32) for name, shape in param_shapes(TINY_GQA).items()}


def assert_heads_split(engine: Engine, tensor_parallel: int) -> None:
    """Each device holds its share of the KV heads (pool and draft sets) and of the fused q/k/v projection only;
    checked after generating, so the steps' outputs kept the layout they were given."""
    cfg = engine.model_config
    pool_heads = {shard.data.shape[1] for shard in engine.kv.k.addressable_shards}
    assert len(engine.kv.k.addressable_shards) == tensor_parallel
    assert pool_heads == {cfg.num_kv_heads // tensor_parallel}
    qkv_heads = {shard.data.shape[2] for shard in engine.state["layers"]["wqkv"][...].addressable_shards}
    assert qkv_heads == {cfg.num_kv_heads // tensor_parallel}
    if engine.spec.drafts_with_model:
        assert {s.data.shape[2] for s in engine.slot_state.sets.positions.addressable_shards} == pool_heads


def run_tiny(params, tokenizer, tensor_parallel: int, method: str, burst_steps: int = 1) -> list[list[int]]:
    """Three one-token prompts, 16 greedy tokens each. One-token prompts make every vanilla step a decode step
    and every pillar step a round, and every context fits the narrowest page table: one compiled step per
    engine (multi-token prefill under tensor parallelism is SmolLM2's part)."""
    engine = Engine(TINY_GQA, params, tokenizer,
                    EngineConfig(max_batch_size=3, kv_cache_tokens=1024, max_model_len=256, page_size=8,
                                 prefill_chunk_size=16, max_num_batched_tokens=16, min_context_bucket=64,
                                 tensor_parallel=tensor_parallel, burst_steps=burst_steps),
                    SpecConfig(method=method, k=3, min_budget=8, budget_ratio=0.1))
    outputs = generate(engine, [[17], [101], [230]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert_heads_split(engine, tensor_parallel)
    return outputs


@pytest.fixture(scope="module")
def tiny_expected(tiny_params, smollm2):
    expected = run_tiny(tiny_params, smollm2.tokenizer, 1, "none")
    assert len({tuple(out) for out in expected}) == 3          # distinct continuations: a real comparison
    return expected


@pytest.mark.slow
@pytest.mark.quick_compiles
def test_tiny_qwen3_pillar_bursts_on_two_devices_generate_what_one_device_does(tiny_params, tiny_expected,
                                                                                 smollm2):
    assert run_tiny(tiny_params, smollm2.tokenizer, 2, "pillar", burst_steps=4) == tiny_expected


@pytest.mark.slow
@pytest.mark.quick_compiles
@pytest.mark.extended
def test_tiny_qwen3_on_two_and_four_devices_generates_what_one_device_does(tiny_params, tiny_expected, smollm2):
    split = {(tensor_parallel, method): run_tiny(tiny_params, smollm2.tokenizer, tensor_parallel, method)
             for tensor_parallel in (2, 4) for method in ("none", "pillar")}
    assert split == dict.fromkeys(split, tiny_expected)


@pytest.mark.slow
def test_smollm2_on_three_devices_generates_what_one_device_does(make_engine, smollm2):
    prompts = [smollm2.tokenizer.encode(p) for p in SMOLLM2_PROMPTS]
    expected = generate(make_engine("none", tensor_parallel=1, model=smollm2, **SMOLLM2_ENGINE), prompts, GREEDY)
    assert smollm2.tokenizer.decode(expected[0]).startswith(" Rome")
    split = {}
    for method in ("none", "pillar"):
        engine = make_engine(method, tensor_parallel=3, model=smollm2, **SMOLLM2_ENGINE)
        split[method] = generate(engine, prompts, GREEDY)
        assert_heads_split(engine, 3)
    assert split == dict.fromkeys(split, expected)


def test_smollm2_refuses_four_devices_naming_its_three_kv_heads(make_engine):
    with pytest.raises(ShardingError, match=r"KV-head count \(3\).*query-head count \(9\).*choose one of \[1, 3\]"):
        make_engine("none", tensor_parallel=4)
