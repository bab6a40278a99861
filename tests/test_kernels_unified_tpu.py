"""The unified (sparse draft + full attention) Pallas TPU kernel vs its jnp reference, run by the TPU interpreter.

As in test_kernels_tpu: the interpreter starts every output buffer as NaN, so an element the kernel should write
but does not fails the comparison; it runs the grid on two simulated TensorCores in a random order and its race
detector flags every access that overlaps an unfinished DMA (the K/V blocks both item kinds share, per-token
query and output copies). Draft entries past each row's count and page-table entries past each row's pages
hold out-of-range ids, which the kernel must never use as addresses.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_paged_attention import assert_matches
from test_kernels_tpu import TPU_V5E, reference, run_checked
from test_kernels_unified_attention import make_mixed_batch

from pallas_kernels.unified_attention import unified_attention_reference, unified_attention_tpu

pytestmark = pytest.mark.quick_compiles

CASES = {
    # name: (draft counts, full q_lens, full kv_lens, Hq, Hkv, head_dim, page_size, budget, max_q_len, options)
    # k=8 verify rows (9 queries), a decode row, a 2-token chunk; a draft with 0 live entries, one with 1, one
    # whose count runs past its list; the 20-entry budget and 45-position context are not multiples of the
    # 16-position block
    "k8_g4_page16_d64": ([20, 0, 1, 26], [9, 1, 9, 2], [9, 30, 45, 20], 8, 2, 64, 16, 20, 9,
                         dict(pages_per_block=1)),
    # k=1 verify rows (2 queries) and a length-1 row, G=8 on one KV head, both kinds split over the KV range
    "k1_g8_page8_d128_splits": ([19, 3, 0], [2, 2, 1], [2, 41, 17], 8, 1, 128, 8, 19, 2,
                                dict(pages_per_block=2, kv_splits=3, draft_kv_splits=2)),
    # G=1, a 24-position page (default blocks: 5 pages, 120 positions), a zero-query padding row
    "g1_page24_default_blocks": ([13, 0], [9, 1, 5, 0], [30, 1, 37, 3], 2, 2, 64, 24, 13, 9, {}),
    # 17 queries of 8 heads: two query tiles of 16 tokens, the second one live for one token
    "k16_g8_page32_two_query_tiles": ([12, 9], [17, 9, 1], [17, 40, 33], 16, 2, 64, 32, 12, 17,
                                      dict(pages_per_block=1)),
    "no_drafts_g4_d128": ([], [9, 1], [20, 9], 4, 1, 128, 8, 8, 9, dict(pages_per_block=2)),
    "no_full_rows_g4": ([11, 0, 7], [], [], 8, 2, 64, 16, 11, 9, dict(pages_per_block=1)),
}


def run_case(name, dtype=jnp.float32):
    counts, q_lens, kv_lens, hq, hkv, head_dim, page_size, budget, max_q_len, options = CASES[name]
    batch = make_mixed_batch(sum(map(ord, name)), counts, q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv,
                             head_dim=head_dim, page_size=page_size, budget=budget, dtype=dtype)
    static = dict(page_size=page_size, max_q_len=max_q_len)
    out, lse = run_checked(functools.partial(unified_attention_tpu, **static, **options), **batch)
    ref_out, ref_lse = reference(functools.partial(unified_attention_reference, **static), **batch)
    return batch, (out, lse), (ref_out, ref_lse)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float32(name):
    counts, q_lens = CASES[name][:2]
    batch, (out, lse), (ref_out, ref_lse) = run_case(name)
    assert out.dtype == lse.dtype == jnp.float32 and out.shape == batch["q"].shape
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)
    lse = np.asarray(lse)
    live_drafts = np.asarray(counts, int) > 0
    assert np.isfinite(lse[:len(counts)][live_drafts]).all() and np.isinf(lse[:len(counts)][~live_drafts]).all()
    full_owned = len(counts) + 2 + np.arange(sum(q_lens))           # make_paged_batch leaves tokens 0, 1 unowned
    assert np.isfinite(lse[full_owned]).all()
    assert np.isfinite(np.asarray(out)).all()


def test_matches_reference_bfloat16():
    batch = make_mixed_batch(11, [40, 5, 0], [9, 1], [9, 60], num_q_heads=8, num_kv_heads=2, head_dim=128,
                             page_size=16, budget=40, dtype=jnp.bfloat16)
    static = dict(page_size=16, max_q_len=9)
    out, lse = run_checked(functools.partial(unified_attention_tpu, **static, pages_per_block=2), **batch)
    ref_out, ref_lse = reference(functools.partial(unified_attention_reference, **static), **batch)
    assert_matches(out, ref_out, atol=2e-2, rtol=2e-2)
    assert_matches(lse, ref_lse, atol=2e-2, rtol=2e-2)


def test_dispatch_runs_the_tpu_kernel_and_matches_the_reference():
    from sparsespec_jax import attention

    counts, q_lens, kv_lens = [30, 0, 4], [4, 1], [4, 25]
    batch = make_mixed_batch(23, counts, q_lens, kv_lens, num_q_heads=6, num_kv_heads=3, head_dim=64, page_size=8,
                             budget=30)
    meta = attention.AttentionMetadata(q_start=batch["q_start"], q_len=batch["q_len"], kv_len=batch["kv_len"],
                                       page_tables=batch["page_tables"],
                                       write_slots=jnp.arange(batch["q"].shape[0], dtype=jnp.int32), page_size=8,
                                       max_q_len=4)
    args = [batch[name] for name in ("q", "k_pool", "v_pool", "layer", "slot_ids", "count")]

    def dispatch(backend):
        with jax.default_matmul_precision("highest"):
            return jax.jit(functools.partial(attention.unified_attention, backend))(*args, meta)

    traced = jax.jit(functools.partial(attention.unified_attention, "pallas-tpu")).trace(*args, meta)
    launches = str(traced.jaxpr).count("pallas_call[")
    assert launches == 1, f"{launches} pallas_call launches"
    out, lse = dispatch("pallas-tpu")
    ref_out, ref_lse = dispatch("reference")
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_kernel_lowers_for_tpu_v5e():
    for head_dim, group, page_size in ((128, 4, 16), (64, 1, 32)):
        batch = make_mixed_batch(5, [3, 5], [9, 1], [9, 40], num_q_heads=2 * group, num_kv_heads=2,
                                 head_dim=head_dim, page_size=page_size, budget=20, dtype=jnp.bfloat16)
        kernel = functools.partial(unified_attention_tpu, page_size=page_size, max_q_len=9)
        with jax.sharding.use_abstract_mesh(TPU_V5E):
            text = jax.jit(kernel).trace(**batch).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == 1


def test_rejects_shapes_the_kernel_cannot_serve():
    batch = make_mixed_batch(3, [3, 3], [2], [5], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16, budget=8)
    options = dict(page_size=16, max_q_len=2, interpret=True)
    with pytest.raises(ValueError, match="slot_ids has shape"):
        unified_attention_tpu(**{**batch, "slot_ids": batch["slot_ids"][:, :1]}, **options)
    with pytest.raises(ValueError, match="count has shape"):
        unified_attention_tpu(**{**batch, "count": batch["count"][:1]}, **options)
    with pytest.raises(ValueError, match="kv_len has shape"):
        unified_attention_tpu(**{**batch, "kv_len": jnp.array([5, 5], jnp.int32)}, **options)
    with pytest.raises(ValueError, match="page_size 12"):
        unified_attention_tpu(**batch, **{**options, "page_size": 12})
    wide = make_mixed_batch(3, [3], [2], [5], num_q_heads=2, num_kv_heads=2, head_dim=192, page_size=16, budget=8)
    with pytest.raises(ValueError, match="head_dim 192"):
        unified_attention_tpu(**wide, **options)
