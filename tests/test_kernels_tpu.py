"""Pallas TPU kernels vs their jnp references, run by the TPU interpreter on CPU.

The interpreter simulates HBM, VMEM, SMEM, DMAs and semaphores and starts every buffer as NaN (int32 buffers
as INT32_MAX), so an output element the kernel should write but does not fails the comparison. It runs the
parallel grid on two simulated TensorCores in a random order, and its race detector flags every access that
overlaps an unfinished DMA (double-buffered K/V blocks, per-token query and output copies). The last tests
lower each kernel for a TPU v5e without running it, which catches operations Mosaic cannot lower.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call   # race detector state: no public accessor
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.paged_attention import ragged_paged_attention_reference, ragged_paged_attention_tpu
from pallas_kernels.pillar_scores import pillar_scores_paged_reference, pillar_scores_paged_tpu
from pallas_kernels.sparse_attention import sparse_decode_attention_reference, sparse_decode_attention_tpu
from pallas_kernels.topk_select import topk_select_reference, topk_select_tpu
from test_kernels_paged_attention import assert_matches, make_paged_batch
from test_kernels_pillar_scores import score_inputs
from test_kernels_sparse_attention import make_sparse_batch
from test_kernels_topk_select import random_scores

pytestmark = pytest.mark.quick_compiles

CHECKED = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2)
TPU_V5E = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                                                    platform="tpu"))


def run_checked(kernel, **inputs):
    """Run a TPU kernel in the interpreter with race detection; fail if any race was seen."""
    result = jax.block_until_ready(jax.jit(functools.partial(kernel, interpret=CHECKED))(**inputs))
    assert not interpret_pallas_call.races.races_found, "race detector flagged an unsynchronised access"
    return result


def stacked_score_inputs(batch):
    """Score-kernel arguments for shape checks and lowering: the batch's queries as a one-layer stack, zero LSEs."""
    inputs = {name: value for name, value in batch.items() if name not in ("v_pool", "layer")}
    return dict(inputs, q=batch["q"][None], layers=batch["layer"].reshape(1),
                lse=jnp.zeros((1,) + batch["q"].shape[:2], jnp.float32))


def reference(fn, **inputs):
    with jax.default_matmul_precision("highest"):
        return jax.jit(fn)(**inputs)


PAGED_CASES = {
    # name: (q_lens, kv_lens, Hq, Hkv, head_dim, page_size, max_q_len, kernel options)
    "verify_k16_k1_decode_g8_page32_two_query_tiles": ([17, 2, 1], [17, 45, 33], 8, 1, 64, 32, 17, {}),
    "verify_k8_g4_page8_split2_d128": ([9, 1, 9, 5], [9, 40, 27, 21], 4, 1, 128, 8, 9,
                                       dict(pages_per_block=2, kv_splits=2)),
    "prefill_verify_k1_g1_page4": ([1, 13, 2], [1, 13, 19], 2, 2, 64, 4, 13, dict(pages_per_block=3)),
}


@pytest.mark.parametrize("name", list(PAGED_CASES))
def test_ragged_paged_attention_matches_reference(name):
    q_lens, kv_lens, hq, hkv, head_dim, page_size, max_q_len, options = PAGED_CASES[name]
    batch = make_paged_batch(sum(map(ord, name)), q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv,
                             head_dim=head_dim, page_size=page_size)
    static = dict(page_size=page_size, max_q_len=max_q_len)
    out, lse = run_checked(functools.partial(ragged_paged_attention_tpu, **static, **options), **batch)
    ref_out, ref_lse = reference(functools.partial(ragged_paged_attention_reference, **static), **batch)
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert np.isfinite(np.asarray(lse)[2:2 + sum(q_lens)]).all()     # every owned token got a real softmax


SPARSE_CASES = {
    # name: (counts, Hq, Hkv, head_dim, budget, dtype, kernel options); budget entries past count are garbage
    "g8_d128_bf16_counts_0_1_split2": ([30, 0, 1, 13], 8, 1, 128, 27, jnp.bfloat16, dict(block_kv=8, kv_splits=2)),
}


@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_sparse_decode_attention_matches_reference(name):
    counts, hq, hkv, head_dim, budget, dtype, options = SPARSE_CASES[name]
    batch = make_sparse_batch(sum(map(ord, name)), counts, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
                              budget=budget, dtype=dtype)
    out, lse = run_checked(functools.partial(sparse_decode_attention_tpu, **options), **batch)
    ref_out, ref_lse = reference(sparse_decode_attention_reference, **batch)
    tolerance = 2e-5 if dtype == jnp.float32 else 2e-2
    assert_matches(out, ref_out, atol=tolerance, rtol=tolerance)
    assert_matches(lse, ref_lse, atol=tolerance, rtol=tolerance)


PILLAR_CASES = {
    # name: (q_lens, kv_lens, Hq, Hkv, head_dim, page_size, max_q_len, kernel options)
    "verify_k8_k1_g4_page8_split3": ([9, 2, 1, 0], [9, 50, 33, 30], 8, 2, 128, 8, 9,
                                     dict(pages_per_block=2, kv_splits=3)),
}


@pytest.mark.parametrize("name", list(PILLAR_CASES))
def test_pillar_scores_match_reference(name):
    q_lens, kv_lens, hq, hkv, head_dim, page_size, max_q_len, options = PILLAR_CASES[name]
    batch = make_paged_batch(sum(map(ord, name)), q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv,
                             head_dim=head_dim, page_size=page_size)
    static = dict(page_size=page_size, max_q_len=max_q_len)
    inputs = score_inputs(batch, **static)
    scores = run_checked(functools.partial(pillar_scores_paged_tpu, **static, **options), **inputs)
    expected = reference(functools.partial(pillar_scores_paged_reference, **static), **inputs)
    assert_matches(scores, expected, atol=1e-6, rtol=2e-5)
    assert np.isfinite(np.asarray(expected)).any() and np.isinf(np.asarray(expected)).any()   # both kinds checked


TOPK_CASES = {
    # name: (rows, heads, positions, k per row, max_k); 300 positions need a padded last 128-lane chunk
    "k_0_1_8_130_padded_row": (4, 3, 300, [0, 1, 8, 130], 140),
}


@pytest.mark.parametrize("name", list(TOPK_CASES))
def test_topk_select_matches_reference(name):
    rows, heads, positions, k, max_k = TOPK_CASES[name]
    inputs = dict(scores=jnp.asarray(random_scores(sum(map(ord, name)), rows, heads, positions)),
                  k=jnp.asarray(k, jnp.int32))
    indices, count = run_checked(functools.partial(topk_select_tpu, max_k=max_k), **inputs)
    expected_indices, expected_count = topk_select_reference(**inputs, max_k=max_k)
    np.testing.assert_array_equal(np.asarray(count), np.asarray(expected_count))
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(expected_indices))


def test_race_detector_flags_a_read_before_its_dma_completes():
    """The race assertions above can fail: reading a VMEM buffer while its DMA is in flight is reported."""

    def kernel(x_hbm, out_ref, buffer, sem):
        copy = pltpu.make_async_copy(x_hbm, buffer, sem.at[0])
        copy.start()
        out_ref[...] = buffer[...]
        copy.wait()

    x = jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)

    def racy(x, interpret):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                              scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA((1,))],
                              interpret=interpret)(x)

    with pytest.raises(AssertionError, match="race detector"):
        run_checked(racy, x=x)


def test_kernels_lower_for_tpu_v5e():
    paged = make_paged_batch(5, [9, 1], [9, 40], num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=16,
                             dtype=jnp.bfloat16)
    static = dict(page_size=16, max_q_len=9)
    scores_inputs = stacked_score_inputs(paged)
    sparse = make_sparse_batch(5, [3, 5], num_q_heads=8, num_kv_heads=2, head_dim=64, budget=20, dtype=jnp.bfloat16)
    lowered = [
        (functools.partial(ragged_paged_attention_tpu, **static), paged),
        (functools.partial(pillar_scores_paged_tpu, **static), scores_inputs),
        (sparse_decode_attention_tpu, sparse),
        (functools.partial(topk_select_tpu, max_k=200), dict(scores=jnp.zeros((2, 3, 1000)),
                                                             k=jnp.zeros((2,), jnp.int32))),
    ]
    with jax.sharding.use_abstract_mesh(TPU_V5E):
        for kernel, inputs in lowered:
            text = jax.jit(kernel).trace(**inputs).lower(lowering_platforms=("tpu",)).as_text()
            assert "tpu_custom_call" in text


def test_rejects_shapes_the_tpu_kernels_cannot_tile():
    batch = make_paged_batch(3, [1], [5], num_q_heads=4, num_kv_heads=2, head_dim=192, page_size=16)
    with pytest.raises(ValueError, match="head_dim 192"):
        ragged_paged_attention_tpu(**batch, page_size=16, max_q_len=1, interpret=True)
    batch = make_paged_batch(3, [1], [5], num_q_heads=32, num_kv_heads=1, head_dim=128, page_size=16)
    inputs = stacked_score_inputs(batch)
    with pytest.raises(ValueError, match="max_q_len 600"):
        pillar_scores_paged_tpu(**inputs, page_size=16, max_q_len=600, interpret=True)
    with pytest.raises(ValueError, match="k has shape"):
        topk_select_tpu(jnp.zeros((2, 1, 10)), jnp.zeros((3,), jnp.int32), max_k=4)
