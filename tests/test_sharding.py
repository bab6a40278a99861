"""Tensor-parallel layout: parameter splits, placement shard by shard, refusals, and per-device attention."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparsespec_jax.attention import AttentionMetadata, paged_attention, pillar_scores, sparse_attention
from sparsespec_jax.config import ConfigError, ModelConfig, param_shapes
from sparsespec_jax.kv_cache import KVCache
from sparsespec_jax.llm import LLM
from sparsespec_jax.sharding import (TP_AXIS, ShardingError, check_tensor_parallel, create_on_mesh, make_mesh,
                                     param_partition_specs, place_params)
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.spec.draft_sets import DraftSets, pillar_refresh
from test_kernels_paged_attention import make_paged_batch

# Biases and an untied head cover every split parameter; a vocabulary of 98 does not split 4 ways.
BIASED = ModelConfig(arch="qwen2", vocab_size=98, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=8,
                     num_kv_heads=4, head_dim=8, attention_bias=True, tie_word_embeddings=False)


def test_columns_then_rows_per_layer_vocabulary_split_norms_replicated():
    specs = param_partition_specs(BIASED, 2)
    columns = P(None, None, TP_AXIS)
    assert {specs[name] for name in ("layers.wq", "layers.wk", "layers.wv", "layers.w_gate", "layers.w_up")} == {columns}
    assert specs["layers.wo"] == specs["layers.w_down"] == P(None, TP_AXIS, None)
    assert specs["layers.bq"] == specs["layers.bk"] == specs["layers.bv"] == P(None, TP_AXIS)
    assert specs["embed"] == P(TP_AXIS, None) and specs["lm_head"] == P(None, TP_AXIS)
    assert specs["layers.attn_norm"] == specs["layers.mlp_norm"] == specs["final_norm"] == P()
    uneven = param_partition_specs(BIASED, 4)          # 98 vocabulary rows: replicated rather than refused
    assert uneven["embed"] == uneven["lm_head"] == P() and uneven["layers.wq"] == columns


def test_params_arrive_shard_by_shard_in_the_engine_dtype():
    params = host_params(BIASED, seed=1)
    placed = place_params(BIASED, params, make_mesh(BIASED, 4), jnp.bfloat16)
    wq = placed["layers.wq"]
    assert wq.dtype == jnp.bfloat16 and len(wq.addressable_shards) == 4
    for shard in wq.addressable_shards:
        assert shard.data.shape == (2, 32, 16)                       # one device: 2 of the 8 query heads
        np.testing.assert_array_equal(np.asarray(shard.data, np.float32),
                                      params["layers.wq"][shard.index].astype(jnp.bfloat16).astype(np.float32))
    assert {s.data.shape for s in placed["layers.w_down"].addressable_shards} == {(2, 12, 32)}
    assert {s.data.shape for s in placed["final_norm"].addressable_shards} == {(32,)}
    truncated = {**params, "layers.wq": params["layers.wq"][:, :, :8]}
    with pytest.raises(ConfigError, match="layers.wq"):
        place_params(BIASED, truncated, make_mesh(BIASED, 2), jnp.float32)


def test_cache_and_draft_sets_are_created_split_over_kv_heads():
    mesh = make_mesh(BIASED, 2)
    kv = create_on_mesh(lambda: KVCache.create(BIASED, 3, 4, jnp.float32), mesh)
    assert {s.data.shape for s in kv.v.addressable_shards} == {(2, 2, 12, 8)} and kv.page_size == 4
    sets = create_on_mesh(lambda: DraftSets.create(5, 2, 4, 7), mesh)
    assert {s.data.shape for s in sets.positions.addressable_shards} == {(5, 2, 2, 7)}
    assert {s.data.shape for s in sets.count.addressable_shards} == {(5,)}


def test_refusals_name_the_counts_and_the_model():
    with pytest.raises(ShardingError, match=r"tensor_parallel=3 must divide both the KV-head count \(4\) and the "
                                            r"query-head count \(8\) of this qwen2 model.*\[1, 2, 4\]"):
        check_tensor_parallel(BIASED, 3)
    with pytest.raises(ShardingError, match=r"tensor_parallel=8 exceeds the 4 device\(s\)"):
        check_tensor_parallel(heads_config(16, 8), 8)
    with pytest.raises(ShardingError, match="positive integer"):
        check_tensor_parallel(BIASED, 0)
    with pytest.raises(ShardingError, match=r"KV-head count \(3\).*smollm2-135m-instruct"):
        LLM("smollm2-135m-instruct", tensor_parallel=2)


def heads_config(num_heads: int, num_kv_heads: int) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=16)


def on_mesh(mesh, value, *spec):
    return jax.device_put(value, NamedSharding(mesh, P(*spec)))


def host_params(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in param_shapes(cfg).items()}


@functools.partial(jax.jit, static_argnums=0)
def attention_passes(backend, meta, q, k_pool, v_pool, layer, slot_ids, count):
    """A full pass, a sparse pass over the first rows' queries and the scores of the full pass."""
    with jax.default_matmul_precision("highest"):
        out, lse = paged_attention(backend, q, k_pool, v_pool, layer, meta)
        sparse = sparse_attention(backend, q[:count.shape[0]], k_pool, v_pool, layer, slot_ids, count)
        scores = pillar_scores(backend, q[None], k_pool, jnp.reshape(layer, (1,)), meta, lse[None])
        return (out, lse) + sparse + (scores,)


def test_pallas_attention_on_each_devices_heads_equals_reference_attention_on_one_device():
    """The Pallas kernels under shard_map, each device on its own heads with nothing exchanged (engines on CPU
    run the references, so only this runs the kernels split)."""
    page_size = 8
    batch = make_paged_batch(7, [5, 1, 3], [29, 17, 5], num_q_heads=8, num_kv_heads=4, head_dim=16,
                             page_size=page_size)
    meta = AttentionMetadata(q_start=batch["q_start"], q_len=batch["q_len"], kv_len=batch["kv_len"],
                             page_tables=batch["page_tables"], write_slots=jnp.zeros(1, jnp.int32),
                             page_size=page_size, max_q_len=5)
    slot_ids = jnp.asarray(np.random.default_rng(8).integers(0, batch["k_pool"].shape[2], (3, 4, 6)), jnp.int32)
    count = jnp.asarray([6, 2, 0], jnp.int32)
    q, k_pool, v_pool, layer = batch["q"], batch["k_pool"], batch["v_pool"], batch["layer"]
    expected = attention_passes("reference", meta, q, k_pool, v_pool, layer, slot_ids, count)
    mesh = make_mesh(BIASED, 2)
    args = (meta, on_mesh(mesh, q, None, TP_AXIS), on_mesh(mesh, k_pool, None, TP_AXIS),
            on_mesh(mesh, v_pool, None, TP_AXIS), layer, on_mesh(mesh, slot_ids, None, TP_AXIS), count)
    compiled = attention_passes.lower("pallas", *args).compile()
    assert not re.search(r"all-gather|all-to-all|all-reduce|collective-permute", compiled.as_text())
    split = compiled(*args)
    assert {s.data.shape for s in split[0].addressable_shards} == {(q.shape[0], 4, 16)}    # heads stay put
    for got, want in zip(split, expected):
        assert not np.isnan(np.asarray(got)).any()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_pillar_selection_split_over_kv_heads_is_the_same_selection(backend):
    """Top-K over layers x heads split 4 ways picks exactly what one device picks, without any collective."""
    layers, rows, heads, keys = 3, 2, 4, 40
    scores = jnp.asarray(np.random.default_rng(9).random((layers, rows, heads, keys)), jnp.float32)
    kv_len, recent = jnp.asarray([40, 23], jnp.int32), jnp.asarray([3, 1], jnp.int32)
    spec = SpecConfig(method="pillar", k=2, min_budget=6, budget_ratio=0.1)
    expected = jax.jit(functools.partial(pillar_refresh, spec=spec, capacity=10, backend="reference"))(
        scores, kv_len, recent)
    split_scores = on_mesh(make_mesh(BIASED, 4), scores, None, None, TP_AXIS)
    refresh = jax.jit(functools.partial(pillar_refresh, spec=spec, capacity=10, backend=backend))
    compiled = refresh.lower(split_scores, kv_len, recent).compile()
    assert not re.search(r"all-gather|all-to-all|all-reduce|collective-permute", compiled.as_text())
    positions, count = compiled(split_scores, kv_len, recent)
    np.testing.assert_array_equal(np.asarray(positions), np.asarray(expected[0]))
    np.testing.assert_array_equal(np.asarray(count), np.asarray(expected[1]))
    assert {s.data.shape for s in positions.addressable_shards} == {(rows, layers, 1, 10)}
