"""Ragged paged attention kernel vs its jnp reference.

On CPU the kernel runs in Pallas interpret mode, which starts every output buffer as NaN, so an element the
kernel should write but does not fails the comparison; on a GPU the same tests run the compiled kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.paged_attention.reference import owned_tokens
from pallas_kernels.paged_attention.triton_kernel import split_range

pytestmark = pytest.mark.quick_compiles

INTERPRET = jax.default_backend() == "cpu"
NUM_LAYERS = 3
LAYER = 1


def make_paged_batch(seed, q_lens, kv_lens, *, num_q_heads, num_kv_heads, head_dim, page_size, dtype=jnp.float32):
    """Random step batch: rows in shuffled token order, scattered pages, garbage past each row's pages."""
    rng = np.random.default_rng(seed)
    q_lens, kv_lens = np.asarray(q_lens, np.int32), np.asarray(kv_lens, np.int32)
    num_rows = len(q_lens)
    pages_per_row = int(max(1, -(-kv_lens.max() // page_size)) + 1)
    num_pool_pages = num_rows * pages_per_row + 3
    order = rng.permutation(num_rows)
    q_start = np.zeros(num_rows, np.int32)
    q_start[order] = np.concatenate([[0], np.cumsum(q_lens[order])[:-1]]) + 2      # tokens 0, 1 are owned by nobody
    num_tokens = int(q_lens.sum()) + 4
    tables = rng.permutation(num_pool_pages)[: num_rows * pages_per_row].reshape(num_rows, pages_per_row)
    for row, kv in enumerate(kv_lens):
        used = -(-kv // page_size)
        tables[row, used:] = rng.choice([-7, 10 ** 6, num_pool_pages], size=pages_per_row - used)
    pool_shape = (NUM_LAYERS, num_kv_heads, num_pool_pages * page_size, head_dim)
    q = rng.standard_normal((num_tokens, num_q_heads, head_dim))
    k_pool, v_pool = rng.standard_normal(pool_shape), rng.standard_normal(pool_shape)
    return dict(q=jnp.asarray(q, dtype), k_pool=jnp.asarray(k_pool, dtype), v_pool=jnp.asarray(v_pool, dtype),
                layer=jnp.int32(LAYER), q_start=jnp.asarray(q_start), q_len=jnp.asarray(q_lens),
                kv_len=jnp.asarray(kv_lens), page_tables=jnp.asarray(tables, jnp.int32))


def assert_matches(actual, expected, *, atol, rtol):
    """Same values (inf where the reference has inf), and no NaN anywhere."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert not np.isnan(actual).any(), f"{np.isnan(actual).sum()} NaN elements (unwritten or invalid)"
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def run_both(batch, *, page_size, max_q_len, **kernel_options):
    kernel = jax.jit(functools.partial(ragged_paged_attention, page_size=page_size, max_q_len=max_q_len,
                                       interpret=INTERPRET, **kernel_options))
    reference = jax.jit(functools.partial(ragged_paged_attention_reference, page_size=page_size,
                                          max_q_len=max_q_len))
    with jax.default_matmul_precision("highest"):
        expected = reference(**batch)
    return kernel(**batch), expected


CASES = {
    # name: (q_lens, kv_lens, Hq, Hkv, head_dim, page_size, max_q_len, kernel options)
    "decode_g4_page16": ([1, 1, 1, 1, 1], [1, 15, 16, 17, 100], 8, 2, 64, 16, 1, {}),
    "verify_k8_g3_page8_mixed": ([9, 1, 9, 5, 9], [9, 40, 77, 21, 130], 9, 3, 64, 8, 9, dict(block_kv=32)),
    "verify_k16_g8_page32_two_query_tiles": ([17, 17, 1], [17, 90, 33], 16, 2, 64, 32, 17, dict(kv_splits=2)),
    "prefill_g1_page16_d128": ([40, 1, 9, 0], [40, 61, 9, 5], 4, 4, 128, 16, 40, dict(block_kv=16)),
    "verify_k1_g4_d128_split3": ([2, 2, 1], [2, 50, 33], 8, 2, 128, 16, 2, dict(block_kv=16, kv_splits=3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float32(name):
    q_lens, kv_lens, hq, hkv, head_dim, page_size, max_q_len, options = CASES[name]
    batch = make_paged_batch(sum(map(ord, name)), q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv,
                             head_dim=head_dim, page_size=page_size)
    (out, lse), (ref_out, ref_lse) = run_both(batch, page_size=page_size, max_q_len=max_q_len, **options)
    assert out.dtype == lse.dtype == jnp.float32
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert np.isfinite(np.asarray(lse)[2:2 + sum(q_lens)]).all()     # owned tokens all got a real softmax


def test_matches_reference_bfloat16():
    batch = make_paged_batch(7, [9, 1, 9, 4], [9, 300, 45, 130], num_q_heads=8, num_kv_heads=2, head_dim=128,
                             page_size=16, dtype=jnp.bfloat16)
    (out, lse), (ref_out, ref_lse) = run_both(batch, page_size=16, max_q_len=9)
    assert_matches(out, ref_out, atol=2e-2, rtol=2e-2)
    assert_matches(lse, ref_lse, atol=2e-3, rtol=2e-3)


def test_owned_mask_passed_in_gives_the_reference_result():
    batch = make_paged_batch(13, [9, 1, 4], [9, 60, 20], num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
    owned = owned_tokens(batch["q_start"], batch["q_len"], 9, batch["q"].shape[0])
    (out, lse), (ref_out, ref_lse) = run_both(batch, page_size=16, max_q_len=9, owned=owned)
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_kv_split_count_does_not_change_the_result():
    batch = make_paged_batch(11, [9, 3], [200, 70], num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
    kernel = functools.partial(ragged_paged_attention, page_size=16, max_q_len=9, block_kv=32, interpret=INTERPRET)
    out1, lse1 = jax.jit(functools.partial(kernel, kv_splits=1))(**batch)
    out4, lse4 = jax.jit(functools.partial(kernel, kv_splits=4))(**batch)
    assert_matches(out4, out1, atol=2e-5, rtol=2e-5)
    assert_matches(lse4, lse1, atol=2e-5, rtol=2e-5)


def test_splits_share_each_rows_own_length():
    """Every position of [0, end) falls in exactly one split, and no split walks more blocks than an even share
    of the row's own blocks: a row padded to a longer page table still spreads over all its splits."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        end, splits, block = int(rng.integers(0, 3000)), int(rng.integers(1, 9)), int(rng.choice([16, 32, 64]))
        ranges = [tuple(int(x) for x in split_range(jnp.int32(end), jnp.int32(s), splits, block))
                  for s in range(splits)]
        covered = np.concatenate([np.arange(start, stop) for start, stop in ranges])
        np.testing.assert_array_equal(covered, np.arange(end))
        blocks = [max(0, -(-stop // block) - start // block) for start, stop in ranges]
        assert max(blocks) == -(-(-(-end // block)) // splits)
        assert all(start % block == 0 for start, stop in ranges if stop > start)


def test_splits_over_a_padded_page_table_give_the_reference_result():
    """Rows far shorter than the page table (a bucket): each split's share comes from the row's length."""
    batch = make_paged_batch(17, [1, 9, 1, 4], [130, 33, 7, 260], num_q_heads=9, num_kv_heads=3, head_dim=64,
                             page_size=16)
    padding = np.full((4, 3 * batch["page_tables"].shape[1]), 10 ** 6, np.int32)
    batch["page_tables"] = jnp.concatenate([batch["page_tables"], jnp.asarray(padding)], axis=1)
    for splits in (2, 5):
        (out, lse), (ref_out, ref_lse) = run_both(batch, page_size=16, max_q_len=9, block_kv=16, kv_splits=splits)
        assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
        assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_rejects_bad_shapes():
    batch = make_paged_batch(3, [1], [5], num_q_heads=6, num_kv_heads=4, head_dim=64, page_size=16)
    with pytest.raises(ValueError, match="multiple of pool KV heads"):
        ragged_paged_attention(**batch, page_size=16, max_q_len=1, interpret=True)
    batch = make_paged_batch(3, [1], [5], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16)
    with pytest.raises(ValueError, match="block_kv 48"):
        ragged_paged_attention(**batch, page_size=16, max_q_len=1, block_kv=48, interpret=True)
    batch["kv_len"] = jnp.array([5, 5], jnp.int32)
    with pytest.raises(ValueError, match="kv_len has shape"):
        ragged_paged_attention(**batch, page_size=16, max_q_len=1, interpret=True)
