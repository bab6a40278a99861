"""Unified (sparse draft + full attention) kernel vs its jnp reference.

On CPU the kernel runs in Pallas interpret mode, which starts every output buffer as NaN, so an element the
kernel should write but does not fails the comparison; on a GPU the same tests run the compiled kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_paged_attention import INTERPRET, LAYER, NUM_LAYERS, assert_matches, make_paged_batch

from pallas_kernels.paged_attention.reference import owned_tokens
from pallas_kernels.unified_attention import unified_attention, unified_attention_reference
from pallas_kernels.unified_attention.triton_kernel import balanced_kv_splits

pytestmark = pytest.mark.quick_compiles


def make_mixed_batch(seed, counts, q_lens, kv_lens, *, num_q_heads, num_kv_heads, head_dim, page_size, budget,
                     dtype=jnp.float32):
    """Draft rows (distinct pool slots, garbage past each count) in front of a random ragged full-row batch."""
    rng = np.random.default_rng(seed)
    batch = make_paged_batch(seed, q_lens or [1], kv_lens or [1], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, page_size=page_size, dtype=dtype)
    if not q_lens:                        # no full rows: keep the pool, drop the rows (their tokens stay unowned)
        batch.update(q_start=batch["q_start"][:0], q_len=batch["q_len"][:0], kv_len=batch["kv_len"][:0],
                     page_tables=batch["page_tables"][:0])
    pool_slots = batch["k_pool"].shape[2]
    slot_ids = np.zeros((len(counts), num_kv_heads, budget), np.int32)
    for row, count in enumerate(counts):
        slot_ids[row] = [rng.permutation(pool_slots)[:budget] for _ in range(num_kv_heads)]
        slot_ids[row, :, count:] = rng.choice([-3, 10 ** 7], size=slot_ids[row, :, count:].shape)
    drafts = rng.standard_normal((len(counts), num_q_heads, head_dim))
    batch.update(q=jnp.concatenate([jnp.asarray(drafts, dtype), batch["q"]]), slot_ids=jnp.asarray(slot_ids),
                 count=jnp.asarray(counts, jnp.int32))
    return batch


def run_both(batch, *, page_size, max_q_len, **kernel_options):
    kernel = jax.jit(functools.partial(unified_attention, page_size=page_size, max_q_len=max_q_len,
                                       interpret=INTERPRET, **kernel_options))
    reference = jax.jit(functools.partial(unified_attention_reference, page_size=page_size, max_q_len=max_q_len))
    with jax.default_matmul_precision("highest"):
        expected = reference(**batch)
    return kernel(**batch), expected


CASES = {
    # name: (draft counts, full q_lens, full kv_lens, Hq, Hkv, head_dim, page_size, budget, max_q_len, options)
    # verify k=8 rows, a dense draft row, an odd prefill chunk and a row of zero queries beside sparse drafts;
    # the first draft's count runs past its 40-entry list, which the kernel must clamp
    "k8_g4_page16": ([47, 0, 1, 17, 33], [9, 1, 9, 13, 0], [9, 30, 77, 13, 5], 8, 2, 64, 16, 40, 13, {}),
    "k1_g3_page8_split": ([25, 3], [2, 2, 1, 7], [2, 41, 17, 60], 9, 3, 64, 8, 25, 7,
                          dict(kv_splits=3, draft_kv_splits=2)),
    "k8_g8_page16_two_query_tiles": ([50, 9, 2], [17, 9], [17, 66], 16, 2, 64, 16, 50, 17, {}),
    "no_drafts_g1_page32_d128": ([], [9, 1, 5], [50, 1, 37], 4, 4, 128, 32, 8, 9, dict(block_kv=16)),
    "no_full_rows": ([20, 0, 7], [], [], 8, 2, 64, 16, 20, 9, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float32(name):
    counts, q_lens, kv_lens, hq, hkv, head_dim, page_size, budget, max_q_len, options = CASES[name]
    batch = make_mixed_batch(sum(map(ord, name)), counts, q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv,
                             head_dim=head_dim, page_size=page_size, budget=budget)
    (out, lse), (ref_out, ref_lse) = run_both(batch, page_size=page_size, max_q_len=max_q_len, **options)
    assert out.dtype == lse.dtype == jnp.float32 and out.shape == batch["q"].shape
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)
    lse = np.asarray(lse)
    assert np.isfinite(lse[:len(counts)][np.asarray(counts) > 0]).all()
    full_owned = len(counts) + 2 + np.arange(sum(q_lens))           # make_paged_batch leaves tokens 0, 1 unowned
    assert np.isfinite(lse[full_owned]).all()


def test_matches_reference_bfloat16():
    batch = make_mixed_batch(7, [200, 64, 5], [9, 1, 9], [9, 300, 45], num_q_heads=8, num_kv_heads=2, head_dim=128,
                             page_size=16, budget=200, dtype=jnp.bfloat16)
    (out, lse), (ref_out, ref_lse) = run_both(batch, page_size=16, max_q_len=9)
    assert_matches(out, ref_out, atol=2e-2, rtol=2e-2)
    assert_matches(lse, ref_lse, atol=2e-3, rtol=2e-3)


def test_owned_mask_passed_in_gives_the_reference_result():
    # The engine computes the owned-token mask once per step and hands it to every layer's launch.
    batch = make_mixed_batch(5, [30, 4], [9, 1, 0], [9, 40, 3], num_q_heads=8, num_kv_heads=2, head_dim=64,
                             page_size=16, budget=30)
    owned = owned_tokens(batch["q_start"], batch["q_len"], 9, batch["q"].shape[0] - 2)
    assert not np.asarray(owned)[:2].any() and np.asarray(owned)[2:12].all()   # two unowned tokens lead
    (out, lse), (ref_out, ref_lse) = run_both(batch, page_size=16, max_q_len=9, owned=owned)
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)


def stacked_over_layers(slot_ids, layer, pool_slots, seed):
    """slot_ids [R, Hkv, B] at `layer` of a [L, R, Hkv, B] stack whose other layers list other valid slots, so
    reading the wrong layer's lists gives a finite but different result."""
    rng = np.random.default_rng(seed)
    stack = rng.integers(0, pool_slots, (NUM_LAYERS,) + slot_ids.shape).astype(np.int32)
    stack[layer] = np.asarray(slot_ids)
    return jnp.asarray(stack)


def test_lists_stacked_over_layers_are_read_at_the_layer():
    # The engine hands every layer's lists at once and the kernel indexes them by layer, as it does the pools.
    batch = make_mixed_batch(11, [30, 4, 17], [9, 1], [9, 40], num_q_heads=8, num_kv_heads=2, head_dim=64,
                             page_size=16, budget=30)
    (_, _), (ref_out, ref_lse) = run_both(batch, page_size=16, max_q_len=9)
    stacked = {**batch, "slot_ids": stacked_over_layers(batch["slot_ids"], LAYER, batch["k_pool"].shape[2], seed=4)}
    kernel = jax.jit(functools.partial(unified_attention, page_size=16, max_q_len=9, interpret=INTERPRET))
    out, lse = kernel(**stacked)
    assert_matches(out, ref_out, atol=2e-5, rtol=2e-5)
    assert_matches(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_splits_balance_kv_positions_per_program():
    # Qwen3-8B-like B64 step at k=8: 7 verify rows (1 query tile each) and 57 draft rows of a 5% budget, 8 KV heads.
    assert balanced_kv_splits(7 * 8, 8192, 57 * 8, 416, min_chunk=32) == (7, 1)
    assert balanced_kv_splits(7 * 8, 8192, 57 * 8, 416, min_chunk=32, target_programs=1024) == (13, 1)
    assert balanced_kv_splits(0, 64, 4, 32, min_chunk=32) == (2, 1)      # tiny launches stop at one block per chunk


def test_rejects_bad_shapes():
    batch = make_mixed_batch(3, [3, 3], [2], [5], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16, budget=8)
    options = dict(page_size=16, max_q_len=2, interpret=True)
    with pytest.raises(ValueError, match="slot_ids has shape"):
        unified_attention(**{**batch, "slot_ids": batch["slot_ids"][:, :1]}, **options)
    with pytest.raises(ValueError, match="count has shape"):
        unified_attention(**{**batch, "count": batch["count"][:1]}, **options)
    with pytest.raises(ValueError, match="slot_ids has shape"):     # a stack of the wrong number of layers
        unified_attention(**{**batch, "slot_ids": jnp.stack([batch["slot_ids"]] * (NUM_LAYERS + 1))}, **options)
    with pytest.raises(ValueError, match="kv_len has shape"):
        unified_attention(**{**batch, "kv_len": jnp.array([5, 5], jnp.int32)}, **options)
    with pytest.raises(ValueError, match="draft_block_kv 24"):
        unified_attention(**batch, draft_block_kv=24, **options)
    with pytest.raises(ValueError, match="multiple of the pool's KV heads"):
        unified_attention(**{**batch, "q": batch["q"][:, :3]}, **options)
