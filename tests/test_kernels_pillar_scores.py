"""PillarAttn score kernel vs its jnp reference, and the reference vs the meaning of a score.

On CPU the kernel runs in Pallas interpret mode, which starts every output buffer as NaN, so an element the
kernel should write but does not fails the comparison; on a GPU the same tests run the compiled kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import ragged_paged_attention_reference
from pallas_kernels.pillar_scores import pillar_scores_paged, pillar_scores_paged_reference
from test_kernels_paged_attention import INTERPRET, LAYER, make_paged_batch

pytestmark = pytest.mark.quick_compiles


def score_inputs(batch, *, page_size, max_q_len, layers=(LAYER, 0)):
    """The batch without v_pool as a stack of verify passes, one per pool layer in `layers` (entry 0 with the
    batch's queries, later ones with fresh random queries), each with the LSE its own pass produces."""
    rng = np.random.default_rng(len(layers))
    attention = jax.jit(functools.partial(ragged_paged_attention_reference, page_size=page_size, max_q_len=max_q_len))
    queries, lses = [], []
    for entry, layer in enumerate(layers):
        q = batch["q"] if entry == 0 else jnp.asarray(rng.standard_normal(batch["q"].shape), batch["q"].dtype)
        with jax.default_matmul_precision("highest"):
            _, lse = attention(**dict(batch, q=q, layer=jnp.int32(layer)))
        queries.append(q)
        lses.append(lse)
    inputs = {name: value for name, value in batch.items() if name not in ("v_pool", "layer")}
    return dict(inputs, q=jnp.stack(queries), layers=jnp.asarray(layers, jnp.int32), lse=jnp.stack(lses))


def run_both(inputs, *, page_size, max_q_len, **kernel_options):
    kernel = jax.jit(functools.partial(pillar_scores_paged, page_size=page_size, max_q_len=max_q_len,
                                       interpret=INTERPRET, **kernel_options))
    with jax.default_matmul_precision("highest"):
        expected = jax.jit(functools.partial(pillar_scores_paged_reference, page_size=page_size,
                                             max_q_len=max_q_len))(**inputs)
    return np.asarray(kernel(**inputs)), np.asarray(expected)


CASES = {
    # name: (q_lens, kv_lens, Hq, Hkv, head_dim, page_size, max_q_len, kernel options)
    "verify_k8_g4_page16": ([9, 1, 9, 0], [9, 40, 77, 30], 8, 2, 64, 16, 9, dict(block_kv=32)),
    "verify_k8_g3_page8_split3": ([9, 9, 5], [130, 21, 50], 9, 3, 64, 8, 9, dict(block_kv=16, kv_splits=3)),
    "verify_k16_g8_page32_two_pair_tiles": ([17, 4, 17], [17, 90, 70], 16, 2, 64, 32, 17, {}),
    "verify_k1_g1_d128": ([2, 2, 1], [2, 50, 33], 4, 4, 128, 16, 2, dict(block_kv=16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float32(name):
    q_lens, kv_lens, hq, hkv, head_dim, page_size, max_q_len, options = CASES[name]
    batch = make_paged_batch(sum(map(ord, name)), q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv,
                             head_dim=head_dim, page_size=page_size)
    inputs = score_inputs(batch, page_size=page_size, max_q_len=max_q_len)
    scores, expected = run_both(inputs, page_size=page_size, max_q_len=max_q_len, **options)
    assert scores.shape == expected.shape == (2, len(q_lens), hkv, batch["page_tables"].shape[1] * page_size)
    assert not np.isnan(scores).any()
    np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=2e-5)
    for row, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        seen = kv_len if q_len else 0
        assert np.isfinite(scores[:, row, :, :seen]).all() and np.isneginf(scores[:, row, :, seen:]).all()
    assert not np.allclose(scores[0], scores[1])        # each entry read its own layer with its own queries


def test_matches_reference_bfloat16():
    batch = make_paged_batch(3, [9, 9, 2], [200, 9, 64], num_q_heads=32, num_kv_heads=8, head_dim=128,
                             page_size=16, dtype=jnp.bfloat16)
    inputs = score_inputs(batch, page_size=16, max_q_len=9)
    scores, expected = run_both(inputs, page_size=16, max_q_len=9)
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=2e-2)


def test_reference_scores_are_attention_probabilities():
    """A lone decode query's scores are its softmax: they sum to 1 over the row's keys for every layer of the
    stack and every KV head."""
    batch = make_paged_batch(4, [1, 1], [37, 5], num_q_heads=2, num_kv_heads=2, head_dim=64, page_size=16)
    inputs = score_inputs(batch, page_size=16, max_q_len=1)
    with jax.default_matmul_precision("highest"):
        scores = np.asarray(jax.jit(functools.partial(pillar_scores_paged_reference, page_size=16,
                                                      max_q_len=1))(**inputs))
    sums = np.where(np.isfinite(scores), scores, 0.0).sum(axis=-1)
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)


def test_rejects_a_mismatched_stack():
    batch = make_paged_batch(2, [1], [5], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16)
    inputs = score_inputs(batch, page_size=16, max_q_len=1)
    with pytest.raises(ValueError, match="lse has shape"):
        pillar_scores_paged(**dict(inputs, lse=inputs["lse"][:, :, :2]), page_size=16, max_q_len=1, interpret=True)
    with pytest.raises(ValueError, match="layers has shape"):
        pillar_scores_paged(**dict(inputs, layers=inputs["layers"][:1]), page_size=16, max_q_len=1, interpret=True)
