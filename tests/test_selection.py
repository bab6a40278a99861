"""PillarAttn selection: budget, rematerialised scores and the kept token set, against brute force."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention.reference import gather_row_slots, ragged_paged_attention_reference
from pallas_kernels.pillar_scores.reference import pillar_scores_paged_reference
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.spec.draft_sets import pillar_refresh
from sparsespec_jax.spec.selection import SelectionError, append_slot, pillar_budget, select_tokens

stacked_scores = jax.jit(pillar_scores_paged_reference, static_argnames=("page_size", "max_q_len", "scale"))


def paged_scores(q, k_pool, layer, q_start, q_len, kv_len, page_tables, lse, **static):
    """One layer's scores, through the reference's layer stack."""
    return stacked_scores(q[None], k_pool, jnp.asarray([layer], jnp.int32), q_start, q_len, kv_len, page_tables,
                          lse[None], **static)[0]
select = jax.jit(select_tokens, static_argnames="capacity")


def brute_force_scores(q, keys, q_len, kv_len, scale):
    """Mean probability per (row, KV head, key) from a fresh softmax per (query, head); -inf if no pair sees it."""
    rows, _, num_q_heads, _ = q.shape
    num_keys, num_kv_heads = keys.shape[1], keys.shape[2]
    group = num_q_heads // num_kv_heads
    total = np.zeros((rows, num_kv_heads, num_keys))
    pairs = np.zeros((rows, num_kv_heads, num_keys))
    for r in range(rows):
        for t in range(q_len[r]):
            position = kv_len[r] - q_len[r] + t
            for h in range(num_q_heads):
                logits = scale * keys[r, :position + 1, h // group].astype(np.float64) @ q[r, t, h]
                probs = np.exp(logits - logits.max())
                total[r, h // group, :position + 1] += probs / probs.sum()
                pairs[r, h // group, :position + 1] += 1
    return np.where(pairs > 0, total / np.maximum(pairs, 1), -np.inf)


def numpy_lse(q, keys, q_len, kv_len, scale):
    rows, width, num_q_heads, _ = q.shape
    group = num_q_heads // keys.shape[2]
    lse = np.full((rows, width, num_q_heads), -np.inf)
    for r in range(rows):
        for t in range(q_len[r]):
            position = kv_len[r] - q_len[r] + t
            for h in range(num_q_heads):
                logits = scale * keys[r, :position + 1, h // group].astype(np.float64) @ q[r, t, h]
                lse[r, t, h] = np.logaddexp.reduce(logits)
    return lse.astype(np.float32)


def test_budget_follows_the_formula():
    kv_len = np.array([0, 1, 19, 20, 21, 60, 127, 128, 2559, 2560, 2561, 4096, 1_000_003])
    for ratio in (0.0, 0.05, 0.1, 1 / 3, 0.37, 1.0):
        for min_budget in (0, 3, 128):
            expected = [min(n, max(min_budget, math.ceil(ratio * n))) for n in kv_len]
            np.testing.assert_array_equal(pillar_budget(jnp.asarray(kv_len), ratio, min_budget), expected,
                                          err_msg=f"ratio {ratio}, min_budget {min_budget}")
    with pytest.raises(SelectionError, match="ratio"):
        pillar_budget(jnp.asarray(kv_len), 1.5, 0)
    with pytest.raises(SelectionError, match="min_budget"):
        pillar_budget(jnp.asarray(kv_len), 0.05, -1)


@pytest.mark.parametrize("width", [2, 9, 17])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_scores_match_a_fresh_softmax(width, group):
    """Dense keys laid out as one page per row; lse from an independent float64 computation."""
    rng = np.random.default_rng(width * 10 + group)
    rows, num_keys, num_kv_heads, head_dim = 4, 40, 2, 8
    q = rng.normal(size=(rows, width, num_kv_heads * group, head_dim)).astype(np.float32)
    keys = rng.normal(size=(rows, num_keys, num_kv_heads, head_dim)).astype(np.float32)
    q_len = np.array([width, max(width - 1, 1), 1, 0], np.int32)
    kv_len = np.array([num_keys, width + 3, 1, 5], np.int32)
    scale = 0.6
    lse = numpy_lse(q, keys, q_len, kv_len, scale)
    k_pool = rng.normal(size=(2, num_kv_heads, (rows + 1) * num_keys, head_dim)).astype(np.float32)
    for r in range(rows):                                   # row r owns page r + 1 of layer 1
        k_pool[1, :, (r + 1) * num_keys:(r + 2) * num_keys] = keys[r].transpose(1, 0, 2)
    page_tables = np.arange(1, rows + 1, dtype=np.int32)[:, None]
    q_start = np.arange(rows, dtype=np.int32) * width
    got = paged_scores(jnp.asarray(q.reshape(rows * width, -1, head_dim)), jnp.asarray(k_pool), 1,
                       jnp.asarray(q_start), jnp.asarray(q_len), jnp.asarray(kv_len), jnp.asarray(page_tables),
                       jnp.asarray(lse.reshape(rows * width, -1)), page_size=num_keys, max_q_len=width,
                       scale=scale)
    expected = brute_force_scores(q, keys, q_len, kv_len, scale)
    np.testing.assert_array_equal(np.isinf(np.asarray(got)), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(np.asarray(got)[finite], expected[finite], rtol=1e-4, atol=1e-6)


def test_scores_from_the_paged_verify_pass():
    """lse straight from the ragged paged attention reference, keys gathered through shuffled page tables."""
    rng = np.random.default_rng(7)
    layers, num_kv_heads, group, head_dim, page_size, pages_per_row = 2, 2, 3, 16, 4, 5
    q_len = np.array([5, 3, 5], np.int32)
    kv_len = np.array([17, 3, 20], np.int32)
    rows, width = len(q_len), 5
    num_pages = rows * pages_per_row + 1
    k_pool = rng.normal(size=(layers, num_kv_heads, num_pages * page_size, head_dim)).astype(np.float32)
    v_pool = rng.normal(size=k_pool.shape).astype(np.float32)
    page_tables = rng.permutation(np.arange(1, num_pages))[:rows * pages_per_row].reshape(rows, pages_per_row)
    q_start = np.concatenate([[0], np.cumsum(q_len)[:-1]]).astype(np.int32)
    q_flat = rng.normal(size=(int(q_len.sum()) + 2, num_kv_heads * group, head_dim)).astype(np.float32)
    _, lse_flat = ragged_paged_attention_reference(
        jnp.asarray(q_flat), jnp.asarray(k_pool), jnp.asarray(v_pool), 1, jnp.asarray(q_start), jnp.asarray(q_len),
        jnp.asarray(kv_len), jnp.asarray(page_tables), page_size=page_size, max_q_len=width)

    tokens = np.minimum(q_start[:, None] + np.arange(width), len(q_flat) - 1)
    valid = np.arange(width)[None, :] < q_len[:, None]
    q = np.where(valid[..., None, None], q_flat[tokens], 0)
    slots = np.asarray(gather_row_slots(jnp.asarray(page_tables), page_size))
    keys = k_pool[1][:, slots].transpose(1, 2, 0, 3)                                    # [R, S, Hkv, D]
    got = paged_scores(jnp.asarray(q_flat), jnp.asarray(k_pool), 1, jnp.asarray(q_start), jnp.asarray(q_len),
                       jnp.asarray(kv_len), jnp.asarray(page_tables), lse_flat, page_size=page_size,
                       max_q_len=width)
    expected = brute_force_scores(q, keys, q_len, kv_len, head_dim ** -0.5)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), finite)
    np.testing.assert_allclose(np.asarray(got)[finite], expected[finite], rtol=1e-4, atol=1e-6)


def brute_force_selection(scores, kv_len, num_recent, budget, capacity):
    """Expected ascending positions per (row, head) and count."""
    expected, counts = {}, []
    for r in range(scores.shape[0]):
        recent = min(num_recent[r], kv_len[r])
        count = min(max(budget[r], recent), kv_len[r], capacity)
        counts.append(count)
        older_end = kv_len[r] - recent
        for h in range(scores.shape[1]):
            by_score = sorted(range(older_end), key=lambda j: (-scores[r, h, j], j))
            chosen = list(range(older_end, kv_len[r])) + by_score[:count - recent]
            expected[r, h] = sorted(chosen)[:count]
    return expected, np.array(counts)


def test_selection_matches_brute_force_with_ties_and_edge_cases():
    rng = np.random.default_rng(11)
    num_keys, num_kv_heads, capacity = 30, 3, 16
    #                    plain  budget>=L  recent==L  L==1  recent=0  budget<recent  L==S  over capacity
    kv_len = np.array([25, 9, 6, 1, 20, 12, 30, 30])
    num_recent = np.array([4, 3, 6, 1, 0, 8, 5, 9])
    budget = np.array([10, 40, 6, 128, 7, 5, 14, 20])
    scores = rng.integers(0, 4, size=(len(kv_len), num_kv_heads, num_keys)).astype(np.float32)   # many ties
    positions, count = select(jnp.asarray(scores), jnp.asarray(kv_len), jnp.asarray(num_recent),
                              jnp.asarray(budget), capacity=capacity)
    positions, count = np.asarray(positions), np.asarray(count)
    expected, expected_count = brute_force_selection(scores, kv_len, num_recent, budget, capacity)
    np.testing.assert_array_equal(count, expected_count)
    for (r, h), chosen in expected.items():
        np.testing.assert_array_equal(positions[r, h, :count[r]], chosen, err_msg=f"row {r} head {h}")
        assert np.all(positions[r, h, count[r]:] == 0)
        recent = np.arange(kv_len[r] - min(num_recent[r], kv_len[r]), kv_len[r])
        assert np.isin(recent, positions[r, h, :count[r]]).all()


def test_selection_prefers_high_scores():
    rng = np.random.default_rng(12)
    scores = rng.random((2, 2, 64)).astype(np.float32)
    kv_len, num_recent = jnp.array([64, 50]), jnp.array([3, 3])
    budget = pillar_budget(kv_len, 0.25, 8)
    positions, count = select(jnp.asarray(scores), kv_len, num_recent, budget, capacity=24)
    np.testing.assert_array_equal(count, [16, 13])
    for r, length in enumerate([64, 50]):
        for h in range(2):
            best = np.argsort(-scores[r, h, :length - 3], kind="stable")[:int(count[r]) - 3]
            assert set(np.asarray(positions[r, h, :count[r]])) == set(best) | set(range(length - 3, length))


def test_a_recent_window_keeps_the_newest_tokens_and_top_k_fills_the_rest():
    """SpecConfig.recent_tokens: every (layer, KV head) set holds the newest max(a + 1, recent_tokens) positions
    even where older copies score higher, and the best older ones fill the rest of the budget; 0 keeps only
    the verify's own a + 1 (the paper's sets)."""
    rng = np.random.default_rng(14)
    layers, rows, heads, keys = 2, 3, 2, 96
    scores = rng.random((layers, rows, heads, keys)).astype(np.float32)
    scores[..., 80:] = 0.0                              # the newest tokens are never among the best
    kv_len, emitted = jnp.array([96, 90, 40]), jnp.array([3, 9, 1])
    for recent in (0, 12):
        spec = SpecConfig(method="pillar", budget_ratio=0.25, min_budget=16, recent_tokens=recent)
        positions, count = jax.jit(pillar_refresh, static_argnums=(3, 4, 5))(
            jnp.asarray(scores), kv_len, emitted, spec, 40, "reference")
        budget = np.asarray(pillar_budget(kv_len, 0.25, 16))
        np.testing.assert_array_equal(count, budget)
        for r in range(rows):
            kept = max(int(emitted[r]), recent)
            older_end = int(kv_len[r]) - kept
            for layer in range(layers):
                for h in range(heads):
                    chosen = set(np.asarray(positions[r, layer, h, :count[r]]).tolist())
                    best = np.argsort(-scores[layer, r, h, :older_end], kind="stable")[:budget[r] - kept]
                    assert chosen == set(best.tolist()) | set(range(older_end, int(kv_len[r]))), (recent, r)
    with pytest.raises(ValueError, match="recent_tokens"):
        SpecConfig(method="pillar", min_budget=16, recent_tokens=17)


def test_append_slot_adds_each_draft_position_for_every_head():
    scores = np.random.default_rng(13).random((3, 2, 20)).astype(np.float32)
    kv_len = jnp.array([20, 10, 4])
    positions, count = select(jnp.asarray(scores), kv_len, jnp.array([2, 2, 2]), jnp.array([6, 6, 6]), capacity=9)
    for step in range(3):
        positions, new_count = jax.jit(append_slot)(positions, count, kv_len + step)
        np.testing.assert_array_equal(new_count, count + 1)
        np.testing.assert_array_equal(np.take_along_axis(positions, count[:, None, None].repeat(2, 1), -1)[..., 0],
                                      np.broadcast_to((kv_len + step)[:, None], (3, 2)))
        count = new_count
    for r in range(3):
        assert np.all(np.diff(np.asarray(positions[r, :, :count[r]]), axis=-1) > 0)    # still ascending, unique


def test_bad_shapes_are_rejected():
    with pytest.raises(SelectionError, match="kv_len"):
        select_tokens(jnp.zeros((2, 1, 8)), jnp.zeros(3, jnp.int32), jnp.zeros(2, jnp.int32),
                      jnp.zeros(2, jnp.int32), 4)
    with pytest.raises(SelectionError, match="capacity"):
        select_tokens(jnp.zeros((2, 1, 8)), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32),
                      jnp.zeros(2, jnp.int32), 0)

