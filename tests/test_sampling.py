"""Sampling parameters, the processed distribution (temperature / top-k / top-p) and batch-independent draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sparsespec_jax import sampling
from sparsespec_jax.sampling import (SamplingArrays, SamplingError, SamplingParams, Stream, derive_seed,
                                     processed_log_probs, sample_tokens, token_key, truncation_cut)

pytestmark = pytest.mark.quick_compiles

processed = jax.jit(processed_log_probs)
sample = jax.jit(sample_tokens)


def reference_support(logits, temperature, top_k, top_p):
    """Brute-force support and probabilities of one row in float64: (bool[V], probs[V])."""
    vocab = logits.shape[-1]
    if temperature == 0:
        support = np.arange(vocab) == np.argmax(logits)
        return support, support.astype(np.float64)
    scaled = logits.astype(np.float64) / temperature
    ordered = np.sort(scaled)[::-1]
    k = vocab if top_k <= 0 or top_k >= vocab else top_k
    in_top_k = ordered >= ordered[k - 1]                    # the k largest and every tie of the k-th
    probs = np.exp(ordered[in_top_k] - ordered[0])
    probs /= probs.sum()
    kept = in_top_k.sum() if top_p >= 1 else max(int(np.sum(np.cumsum(probs) - probs < top_p)), 1)
    support = scaled >= ordered[kept - 1]
    weights = np.where(support, np.exp(scaled - scaled.max()), 0.0)
    return support, weights / weights.sum()


def check_against_reference(logits, temperature, top_k, top_p):
    out = np.asarray(processed(jnp.asarray(logits), jnp.asarray(temperature, jnp.float32),
                               jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)))
    for index in np.ndindex(logits.shape[:-1]):
        r = index[0]
        support, probs = reference_support(logits[index], temperature[r], top_k[r], top_p[r])
        np.testing.assert_array_equal(out[index] > -np.inf, support, err_msg=f"support of row {index}")
        np.testing.assert_allclose(np.exp(out[index]), probs, rtol=2e-5, atol=1e-7, err_msg=f"row {index}")
    return out


# -- SamplingParams / SamplingArrays -------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("top_k", 2.0), ("max_tokens", 0), ("max_tokens", 1.5),
    ("seed", -1), ("seed", 2 ** 32), ("stop", "eos"), ("stop", [""]), ("stop_token_ids", [-3]),
    ("ignore_eos", "yes"),
])
def test_params_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value})


def test_params_accept_limits_and_normalise_sequences():
    params = SamplingParams(temperature=0, top_p=1.0, top_k=-1, seed=2 ** 32 - 1, max_tokens=1,
                            stop=["a", "bc"], stop_token_ids=[7])
    assert params.stop == ("a", "bc") and params.stop_token_ids == (7,) and params.greedy
    hash(params)


def test_arrays_pad_rows_and_derive_missing_seeds():
    params = [SamplingParams(temperature=0.5, top_p=0.9, top_k=-1, seed=11), SamplingParams(top_k=40),
              SamplingParams(temperature=0)]
    arrays = SamplingArrays.from_params(params, num_rows=5, default_seed=7)
    np.testing.assert_allclose(arrays.temperature, [0.5, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(arrays.top_p, [0.9, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(arrays.top_k, [0, 40, 0, 0, 0])
    np.testing.assert_array_equal(arrays.seed, [11, derive_seed(7, 1), derive_seed(7, 2), 0, 0])
    assert arrays.seed.dtype == jnp.uint32 and arrays.top_k.dtype == jnp.int32
    moved = SamplingArrays.from_params(params[1:2], num_rows=1, default_seed=7, request_indices=[1])
    assert int(moved.seed[0]) == derive_seed(7, 1) != derive_seed(7, 0)
    with pytest.raises(SamplingError, match="num_rows"):
        SamplingArrays.from_params(params, num_rows=2, default_seed=0)
    with pytest.raises(SamplingError, match="seeds"):
        SamplingArrays.from_rows(params, [1], num_rows=3)


# -- processed_log_probs ---------------------------------------------------------------------------------------

def test_top_k_keeps_exactly_the_k_largest_and_broadcasts_over_middle_axes():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3, 48)).astype(np.float32) * 2
    top_k = np.array([1, 5, 17, 0, 48, 80])
    out = check_against_reference(logits, np.full(6, 0.8), top_k, np.ones(6))
    for r, k in enumerate(top_k):
        expected = min(k, 48) if k > 0 else 48
        assert np.all((out[r] > -np.inf).sum(-1) == expected)
        largest = np.argsort(-logits[r], axis=-1)[:, :expected]
        assert np.all(np.take_along_axis(out[r], largest, axis=-1) > -np.inf)


def test_top_p_keeps_the_minimal_nucleus():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 3, 48)).astype(np.float32) * 1.5
    top_p = np.array([0.05, 0.3, 0.6, 0.9, 0.999, 1.0])
    out = check_against_reference(logits, np.full(6, 1.1), np.zeros(6, int), top_p)
    probs = np.exp(out.astype(np.float64))
    for index in np.ndindex(out.shape[:-1]):
        full = np.exp(logits[index] / 1.1 - np.max(logits[index] / 1.1))
        full /= full.sum()
        kept = out[index] > -np.inf
        assert full[kept].sum() >= top_p[index[0]] - 1e-6                      # reaches top_p
        assert full[kept].sum() - full[kept].min() < top_p[index[0]]           # no kept token is superfluous
        assert probs[index].sum() == pytest.approx(1.0, abs=1e-5)


def test_combined_truncation_matches_reference_on_peaked_and_flat_rows():
    """Peaked rows keep a few tokens, flat rows most of a vocabulary of thousands; a row's cut never depends on
    the rest of the batch."""
    rng = np.random.default_rng(2)
    vocab = 1924
    spread = np.array([8.0, 8.0, 0.05, 0.05, 8.0, 0.05, 3.0])[:, None, None]
    logits = (rng.normal(size=(7, 2, vocab)) * spread).astype(np.float32)
    temperature = np.array([0.7, 1.0, 1.0, 1.3, 0.9, 1.0, 0.0])
    top_k = np.array([0, 20, 0, 1500, 0, 1100, 5])
    top_p = np.array([0.9, 0.8, 0.95, 1.0, 1.0, 0.5, 0.5])
    out = check_against_reference(logits, temperature, top_k, top_p)
    assert (out[2] > -np.inf).sum(-1).min() > vocab // 2                              # flat: a wide nucleus
    assert (out[0] > -np.inf).sum(-1).max() < 20                                       # peaked: a narrow one
    alone = processed(jnp.asarray(logits[:1]), jnp.asarray(temperature[:1], jnp.float32),
                      jnp.asarray(top_k[:1], jnp.int32), jnp.asarray(top_p[:1], jnp.float32))
    np.testing.assert_array_equal(np.asarray(alone)[0], out[0])                       # no batch dependence


@pytest.mark.parametrize("ways", [4, 16])
def test_wider_searches_find_the_same_cuts(ways, monkeypatch):
    """GPUs search 16 ways per pass where CPUs bisect (sampling._search_ways): every width finds the same cut."""
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(6, 1500)) * np.array([8.0, 0.05, 3.0, 1.0, 0.3, 5.0])[:, None]).astype(np.float32)
    args = (logits, np.array([0.7, 1.0, 1.3, 0.6, 1.0, 0.9]), np.array([0, 0, 30, 900, 0, 2]),
            np.array([0.9, 0.95, 0.8, 1.0, 0.5, 0.99]))
    bisected = processed(*(jnp.asarray(a) for a in args))
    monkeypatch.setattr(sampling, "_search_ways", lambda: ways)
    wide = jax.jit(lambda *a: processed_log_probs(*a))(*(jnp.asarray(a) for a in args))      # a fresh trace
    np.testing.assert_array_equal(np.asarray(wide), np.asarray(bisected))
    check_against_reference(*args)


def test_ties_at_the_cut_are_kept_whole():
    """Equal logits at the k-th place or at the nucleus's edge are kept together, whatever their order."""
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0],
                       [1.0, 2.0, 2.0, 0.0, 5.0, 2.0]], np.float32)
    out = check_against_reference(logits, np.ones(2), np.array([2, 0]), np.array([1.0, 0.9]))
    np.testing.assert_array_equal(out > -np.inf, [[1, 0, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1]])


def test_static_cuts_match_the_general_path_and_no_cut_branches_on_device(monkeypatch):
    """A batch whose truncation is known on the host ("none", "top_p") gets the distribution the general cut
    gives, and no cut branches on data or loops on a GPU (either would make a GPU dispatch wait for the step);
    elsewhere the search's passes are one loop of a fixed count."""
    rng = np.random.default_rng(4)
    vocab = 1324
    logits = (rng.normal(size=(5, vocab)) * 3).astype(np.float32)
    cases = {"none": (np.array([0.0, 0.7, 1.2, 0.0, 0.9]), np.array([0, 0, 0, 3, 0]), np.ones(5)),
             "top_p": (np.array([0.7, 1.0, 0.0, 1.3, 0.8]), np.array([0, 0, 40, 0, 0]),
                       np.array([1.0, 0.6, 0.3, 0.9, 1.0])),
             "small_top_k": (np.array([0.7, 1.0, 0.0, 1.3, 0.8]), np.array([1, 40, 0, 64, 7]),
                             np.array([1.0, 0.6, 0.3, 0.9, 1.0])),
             "top_k_top_p": (np.array([0.7, 1.0, 0.0, 1.3, 0.8]), np.array([1, 40, 0, vocab + 1, 7]),
                             np.array([1.0, 0.6, 0.3, 0.9, 1.0]))}
    for cut, (temperature, top_k, top_p) in cases.items():
        assert truncation_cut(temperature, top_k, top_p) == cut
        args = (jnp.asarray(logits), jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                jnp.asarray(top_p, jnp.float32))
        for unrolled in (False, True):            # elsewhere / as traced on a GPU, whichever runs this test
            with monkeypatch.context() as patch:
                patch.setattr(sampling, "_unrolled_search", lambda: unrolled)
                static = jax.jit(lambda *a, cut: processed_log_probs(*a, cut=cut), static_argnames="cut")
                np.testing.assert_array_equal(np.asarray(static(*args, cut=cut)), np.asarray(processed(*args)))
                program = static.lower(*args, cut=cut).as_text()
            assert "stablehlo.case" not in program and "stablehlo.sort" not in program
            loops = 0 if unrolled else {"none": 0, "top_p": 1, "small_top_k": 0, "top_k_top_p": 2}[cut]
            assert program.count("while") == program.count("stablehlo.while") == loops, (cut, unrolled)
    assert truncation_cut(np.array([0.6]), np.array([0]), np.array([0.95])) == "top_p"
    assert truncation_cut(np.array([0.6, 0.0]), np.array([0, 20]), np.array([0.95, 1.0])) == "top_p"   # greedy row
    assert truncation_cut(np.array([0.6, 0.6]), np.array([20, 0]), np.array([0.95, 1.0])) == "small_top_k"
    assert truncation_cut(np.array([0.6, 0.6]), np.array([20, 0]), np.array([0.95, 0.9])) == "top_k_top_p"
    assert truncation_cut(np.array([0.6, 0.0]), np.array([20, 65]), np.array([0.95, 1.0])) == "small_top_k"
    assert truncation_cut(np.array([0.6, 0.6]), np.array([20, 65]), np.array([0.95, 1.0])) == "top_k_top_p"


@pytest.mark.parametrize("vocab", [40, 5 * 128, 9000])
def test_small_top_k_cut_matches_reference_with_ties_past_its_list(vocab):
    """The "small_top_k" cut reads both cuts off a row's 64 largest values, found through chunk maxima: exact
    for any vocabulary size (a partial last chunk, fewer values than the list), over middle axes, and when
    the k-th value's ties run past the list (they count whole in the top-k mass)."""
    rng = np.random.default_rng(7)
    rows = 6
    logits = (rng.normal(size=(rows, 2, vocab)) * np.array([6.0, 0.1, 2.0, 1.0, 0.3, 0.5])[:, None, None])
    logits = logits.astype(np.float32)
    for middle in range(2):              # 10 tokens at 3, the rest of the top 30 and more tied at 2, all spread
        spread = rng.permutation(vocab)
        logits[4, middle, spread[:10]] = 3.0
        logits[4, middle, spread[10:10 + min(200, vocab // 2)]] = 2.0
    logits[5, 0, :] = 0.25                                     # a row of one value: every token ties the k-th
    temperature = np.array([0.6, 1.0, 0.8, 1.2, 0.7, 1.0])
    top_k = np.array([20, 64, 1, 50, 30, 10])
    top_p = np.array([0.95, 0.5, 0.9, 1.0, 0.3, 0.7])
    assert truncation_cut(temperature, top_k, top_p) == "small_top_k"
    args = tuple(jnp.asarray(a, d) for a, d in
                 zip((logits, temperature, top_k, top_p), (jnp.float32, jnp.float32, jnp.int32, jnp.float32)))
    static = np.asarray(jax.jit(lambda *a: processed_log_probs(*a, cut="small_top_k"))(*args))
    general = np.asarray(processed(*args))        # the search: same support; a GPU may fuse the softmax apart
    np.testing.assert_array_equal(static > -np.inf, general > -np.inf)
    np.testing.assert_allclose(np.exp(static), np.exp(general), rtol=1e-6, atol=1e-9)
    check_against_reference(logits, temperature, top_k, top_p)
    kept = (static > -np.inf).sum(-1)
    assert kept[5, 0] == vocab                                 # every tie of the k-th value kept
    if vocab >= 640:           # the k-th value's 200 ties run past the list; by their mass the nucleus keeps them
        assert np.all(kept[4] == 210)


def test_temperature_zero_is_the_argmax_point_mass():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 3, 48)).astype(np.float32)
    out = np.asarray(processed(logits, jnp.zeros(6), jnp.array([0, 3, 0, 7, 1, 0]),
                               jnp.array([1.0, 1.0, 0.2, 0.5, 1.0, 0.01])))
    np.testing.assert_array_equal(np.argmax(out, -1), np.argmax(logits, -1))
    np.testing.assert_array_equal((out == 0).sum(-1), 1)
    assert np.all((out == 0) | (out == -np.inf))


# -- keys and sample_tokens ------------------------------------------------------------------------------------

def test_token_keys_separate_seed_position_stream_and_nonce():
    base = jax.random.key_data(token_key(5, 10, Stream.SAMPLE))
    for other in (token_key(6, 10, Stream.SAMPLE), token_key(5, 11, Stream.SAMPLE),
                  token_key(5, 10, Stream.DRAFT), token_key(5, 10, Stream.SAMPLE, 3)):
        assert not np.array_equal(jax.random.key_data(other), base)
    batched = token_key(jnp.array([[5, 6]], jnp.uint32), jnp.array([[10], [11]]), Stream.SAMPLE)
    assert batched.shape == (2, 2)
    np.testing.assert_array_equal(jax.random.key_data(batched[0, 0]), base)


def test_sampling_is_reproducible_and_independent_of_the_batch():
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(8, 512)).astype(np.float32))
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(8)]
    positions = jnp.arange(40, 48, dtype=jnp.int32)
    tokens = np.asarray(sample(logits, SamplingArrays.from_params(params, 8, 0), positions))
    assert np.array_equal(tokens, np.asarray(sample(logits, SamplingArrays.from_params(params, 8, 0), positions)))
    assert len(set(tokens.tolist())) > 4
    # row 2 moved to the end of a different batch, next to greedy, truncated and padding rows
    other = [SamplingParams(temperature=0), SamplingParams(temperature=0.3, top_k=2, seed=99), params[2]]
    mixed_logits = jnp.concatenate([logits[4:6] * 3, logits[2:3], logits[:5]])
    mixed = sample(mixed_logits, SamplingArrays.from_params(other, 8, 0), jnp.arange(8, dtype=jnp.int32).at[2].set(42))
    assert int(mixed[2]) == tokens[2]
    assert int(mixed[0]) == int(jnp.argmax(mixed_logits[0]))


def test_greedy_rows_take_the_argmax():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(8, 512)).astype(np.float32))
    arrays = SamplingArrays.from_params([SamplingParams(temperature=0, top_p=0.5, seed=s) for s in range(8)], 8, 0)
    np.testing.assert_array_equal(sample(logits, arrays, jnp.arange(8, dtype=jnp.int32)), np.argmax(logits, -1))


def assert_matches(counts, probs, label):
    """Zero counts outside the support and a chi-square fit inside it (p > 0.001)."""
    support = probs > 0
    assert counts[~support].sum() == 0, f"{label}: sampled outside the support"
    if support.sum() > 1:
        result = stats.chisquare(counts[support], probs[support] / probs[support].sum() * counts.sum())
        assert result.pvalue > 1e-3, f"{label}: chi-square p = {result.pvalue:.2e}, counts {counts}"


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.7), (0.9, 5, 0.8)])
def test_empirical_distribution_matches_the_processed_softmax(temperature, top_k, top_p):
    rows, vocab = 16384, 8
    logits = np.array([1.2, -0.3, 0.8, 2.0, 0.1, -1.0, 1.5, 0.4], np.float32)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s) for s in range(rows)]
    tokens = sample(jnp.broadcast_to(jnp.asarray(logits), (rows, vocab)), SamplingArrays.from_params(params, rows, 0),
                    jnp.full(rows, 17, jnp.int32))
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    _, probs = reference_support(logits, temperature, top_k, top_p)
    assert_matches(counts, probs, f"T={temperature} top_k={top_k} top_p={top_p}")
    if top_k or top_p < 1:
        untruncated = np.exp(logits.astype(np.float64) / temperature)
        untruncated /= untruncated.sum()
        assert stats.chisquare(counts, untruncated * rows).pvalue < 1e-6       # the check has power


def test_bad_shapes_are_rejected():
    arrays = SamplingArrays.from_params([SamplingParams()], 2, 0)
    with pytest.raises(SamplingError, match="positions"):
        sample_tokens(jnp.zeros((2, 8)), arrays, jnp.zeros(3, jnp.int32))
    with pytest.raises(SamplingError, match="shape"):
        processed_log_probs(jnp.zeros((2, 8)), jnp.ones(3), jnp.zeros(3, jnp.int32), jnp.ones(3))
