"""Sparse decode attention kernel vs its jnp reference.

On CPU the kernel runs in Pallas interpret mode, which starts every output buffer as NaN, so an element the
kernel should write but does not fails the comparison; on a GPU the same tests run the compiled kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import sparse_decode_attention, sparse_decode_attention_reference

pytestmark = pytest.mark.quick_compiles

INTERPRET = jax.default_backend() == "cpu"
NUM_LAYERS = 2
LAYER = 1
POOL_SLOTS = 640


def make_sparse_batch(seed, counts, *, num_q_heads, num_kv_heads, head_dim, budget, dtype=jnp.float32):
    """Random draft rows: distinct slots per (row, KV head), garbage (out of range) past each row's count."""
    rng = np.random.default_rng(seed)
    num_rows = len(counts)
    slot_ids = np.stack([np.stack([rng.permutation(POOL_SLOTS)[:budget] for _ in range(num_kv_heads)])
                         for _ in range(num_rows)])
    for row, count in enumerate(counts):
        slot_ids[row, :, count:] = rng.choice([-3, 10 ** 7], size=slot_ids[row, :, count:].shape)
    pool_shape = (NUM_LAYERS, num_kv_heads, POOL_SLOTS, head_dim)
    return dict(q=jnp.asarray(rng.standard_normal((num_rows, num_q_heads, head_dim)), dtype),
                k_pool=jnp.asarray(rng.standard_normal(pool_shape), dtype),
                v_pool=jnp.asarray(rng.standard_normal(pool_shape), dtype),
                layer=jnp.int32(LAYER), slot_ids=jnp.asarray(slot_ids, jnp.int32),
                count=jnp.asarray(counts, jnp.int32))


def assert_matches(actual, expected, *, atol, rtol):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert not np.isnan(actual).any(), f"{np.isnan(actual).sum()} NaN elements (unwritten or invalid)"
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def run_both(batch, **kernel_options):
    kernel = jax.jit(functools.partial(sparse_decode_attention, interpret=INTERPRET, **kernel_options))
    with jax.default_matmul_precision("highest"):
        expected = jax.jit(sparse_decode_attention_reference)(**batch)
    return kernel(**batch), expected


CASES = {
    # name: (counts, Hq, Hkv, head_dim, budget, kernel options); budget entries past count are garbage
    "g1_d64": ([0, 1, 17, 50], 4, 4, 64, 50, dict(block_kv=16)),
    "g3_d64_split2": ([40, 3, 39], 9, 3, 64, 40, dict(block_kv=16, kv_splits=2)),
    "g4_d128_count_over_budget": ([99, 33, 140], 8, 2, 128, 100, dict(block_kv=32, kv_splits=3)),
    "g8_d64_default_blocks": ([129, 64, 1], 16, 2, 64, 130, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float32(name):
    counts, hq, hkv, head_dim, budget, options = CASES[name]
    batch = make_sparse_batch(sum(map(ord, name)), counts, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
                              budget=budget)
    (out, lse), (ref_out, ref_lse) = run_both(batch, **options)
    assert out.dtype == lse.dtype == jnp.float32
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)
    live = np.asarray(counts) > 0
    assert np.isfinite(np.asarray(lse)[live]).all() and np.isneginf(np.asarray(lse)[~live]).all()


def test_matches_reference_bfloat16():
    batch = make_sparse_batch(5, [409, 200, 7, 300], num_q_heads=32, num_kv_heads=8, head_dim=128, budget=409,
                              dtype=jnp.bfloat16)
    (out, lse), (ref_out, ref_lse) = run_both(batch)
    assert_matches(out, ref_out, atol=2e-2, rtol=2e-2)
    assert_matches(lse, ref_lse, atol=2e-3, rtol=2e-3)


def test_lists_stacked_over_layers_are_read_at_the_layer():
    # The engine hands every layer's lists at once and the kernel indexes them by layer, as it does the pools.
    batch = make_sparse_batch(8, [40, 3, 39], num_q_heads=9, num_kv_heads=3, head_dim=64, budget=40)
    (_, _), (ref_out, ref_lse) = run_both(batch, block_kv=16, kv_splits=2)
    other = np.random.default_rng(9).integers(0, POOL_SLOTS, (NUM_LAYERS,) + batch["slot_ids"].shape)
    other[LAYER] = np.asarray(batch["slot_ids"])
    stacked = {**batch, "slot_ids": jnp.asarray(other, jnp.int32)}
    kernel = jax.jit(functools.partial(sparse_decode_attention, interpret=INTERPRET, block_kv=16, kv_splits=2))
    out, lse = kernel(**stacked)
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_rejects_bad_shapes():
    batch = make_sparse_batch(1, [3, 3], num_q_heads=4, num_kv_heads=2, head_dim=64, budget=8)
    batch["slot_ids"] = batch["slot_ids"][:, :1]
    with pytest.raises(ValueError, match="slot_ids has shape"):
        sparse_decode_attention(**batch, interpret=True)
    batch = make_sparse_batch(1, [3, 3], num_q_heads=4, num_kv_heads=2, head_dim=64, budget=8)
    batch["count"] = batch["count"][:1]
    with pytest.raises(ValueError, match="count has shape"):
        sparse_decode_attention(**batch, interpret=True)
    batch = make_sparse_batch(1, [3, 3], num_q_heads=4, num_kv_heads=2, head_dim=64, budget=8)
    batch["slot_ids"] = jnp.stack([batch["slot_ids"]] * (NUM_LAYERS + 1))    # a stack of the wrong layer count
    with pytest.raises(ValueError, match="slot_ids has shape"):
        sparse_decode_attention(**batch, interpret=True)
