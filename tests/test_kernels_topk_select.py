"""Top-K threshold select kernel vs its jnp reference, and the reference vs a plain numpy selection.

On CPU the kernel runs in Pallas interpret mode, which starts the int32 output as INT32_MIN, so an entry the
kernel should write but does not fails the comparison; on a GPU the same tests run the compiled kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.topk_select import topk_select, topk_select_reference

pytestmark = pytest.mark.quick_compiles

INTERPRET = jax.default_backend() == "cpu"


def numpy_topk(scores, k, max_k):
    """Selection by a full lexicographic sort: larger score first, then lower position."""
    num_rows, num_heads, num_positions = scores.shape
    count = np.clip(k, 0, min(max_k, num_positions))
    indices = np.zeros((num_rows, num_heads, max_k), np.int32)
    for row in range(num_rows):
        for head in range(num_heads):
            values = scores[row, head]
            keys = np.where(values == 0, np.copysign(1e-300, values), values.astype(np.float64))  # -0.0 < +0.0
            best = np.lexsort((np.arange(num_positions), -keys))[: count[row]]
            indices[row, head, : count[row]] = np.sort(best)
    return indices, count


def random_scores(seed, num_rows, num_heads, num_positions):
    """Random scores with ties, signed zeros and -inf runs mixed in."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((num_rows, num_heads, num_positions)).astype(np.float32)
    scores[0, 0, ::3] = scores[0, 0, 1]
    scores[-1, -1, 5:num_positions - 3] = -np.inf
    scores[0, -1, : num_positions // 4] = 0.0
    scores[0, -1, num_positions // 4: num_positions // 2] = -0.0
    scores[-1, 0] = np.round(scores[-1, 0] * 2) / 2                                  # many ties
    if num_heads > 2:                                 # keys that differ only in their lowest bits, both signs
        ulps = rng.integers(0, 40, num_positions).astype(np.int32)
        scores[:, 1] = (np.float32(0.37).view(np.int32) + ulps).view(np.float32)
        scores[:, 2] = (np.float32(-2.5).view(np.int32) + ulps).view(np.float32)
    return scores


def test_reference_matches_numpy_selection():
    scores = random_scores(1, 3, 4, 70)
    k = np.array([0, 9, 30], np.int32)
    indices, count = topk_select_reference(jnp.asarray(scores), jnp.asarray(k), max_k=33)
    expected_indices, expected_count = numpy_topk(scores, k, 33)
    np.testing.assert_array_equal(np.asarray(count), expected_count)
    np.testing.assert_array_equal(np.asarray(indices), expected_indices)


CASES = {
    # name: (rows, heads, positions, k per row, max_k, max_resident)
    "k_1_8_16_resident": (3, 2, 100, [1, 8, 16], 16, 16384),
    "k_over_finite_count_and_zero": (3, 3, 64, [0, 40, 64], 48, 16384),
    "low_bit_differences": (2, 4, 300, [16, 77], 80, 16384),
    "max_k_over_positions": (2, 2, 37, [37, 50], 64, 16384),
    "chunked_rows": (3, 3, 300, [1, 8, 16], 37, 64),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    num_rows, num_heads, num_positions, ks, max_k, max_resident = CASES[name]
    scores = jnp.asarray(random_scores(sum(map(ord, name)), num_rows, num_heads, num_positions))
    k = jnp.asarray(ks, jnp.int32)
    indices, count = jax.jit(functools.partial(topk_select, max_k=max_k, max_resident=max_resident,
                                               interpret=INTERPRET))(scores, k)
    expected_indices, expected_count = topk_select_reference(scores, k, max_k=max_k)
    np.testing.assert_array_equal(np.asarray(count), np.asarray(expected_count))
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(expected_indices))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="k has shape"):
        topk_select(jnp.ones((2, 1, 8)), jnp.ones((3,), jnp.int32), max_k=4, interpret=True)
    with pytest.raises(ValueError, match="scores must be"):
        topk_select(jnp.ones((2, 8)), jnp.ones((2,), jnp.int32), max_k=4, interpret=True)
