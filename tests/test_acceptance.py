"""Speculative acceptance: emitted tokens follow the target distribution exactly, whatever the draft."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sparsespec_jax.sampling import SamplingArrays, SamplingError, SamplingParams, processed_log_probs, sample_tokens
from sparsespec_jax.spec.acceptance import NO_TOKEN, draft_sample, replay_acceptance, verify_drafts

pytestmark = pytest.mark.quick_compiles

VOCAB = 8
ROWS = 16384
START = VOCAB           # context index of the last committed token in the toy Markov chain
_rng = np.random.default_rng(0)
TARGET = (_rng.normal(size=(VOCAB + 1, VOCAB)) * 1.2).astype(np.float32)         # target logits given previous
DRAFT = (TARGET + _rng.normal(size=TARGET.shape) * 1.5).astype(np.float32)        # a deliberately biased draft
NGRAM = DRAFT.argmax(-1)                                                            # deterministic proposals

verify = jax.jit(verify_drafts)
draft = jax.jit(draft_sample)
processed = jax.jit(processed_log_probs)


def toy_arrays(rows, temperature, top_k, top_p, first_seed=0):
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=first_seed + s)
              for s in range(rows)]
    return SamplingArrays.from_params(params, rows, 0)


@functools.partial(jax.jit, static_argnames=("k", "ngram"))
def _speculative_round(target, draft, ngram_table, arrays, positions, num_drafts, *, k, ngram):
    previous = jnp.full(positions.shape, START, jnp.int32)
    drafts, draft_lps, target_logits = [], [], [target[previous]]
    for i in range(k):
        if ngram:
            token = ngram_table[previous]
        else:
            token, log_probs = draft_sample(draft[previous], arrays, positions + i, positions)
            draft_lps.append(log_probs)
        drafts.append(token)
        target_logits.append(target[token])
        previous = token
    draft_tokens = jnp.stack(drafts, axis=1) if k else jnp.zeros((positions.shape[0], 0), jnp.int32)
    draft_log_probs = None if ngram else jnp.stack(draft_lps, axis=1)
    tokens, emitted = verify_drafts(jnp.stack(target_logits, axis=1), draft_tokens, draft_log_probs, num_drafts,
                                    arrays, positions)
    return tokens, emitted, draft_tokens


def speculative_round(arrays, positions, num_drafts, *, k, ngram):
    """k draft steps on the toy chain, then verification; target logits follow the drafted context."""
    return _speculative_round(jnp.asarray(TARGET), jnp.asarray(DRAFT), jnp.asarray(NGRAM, jnp.int32), arrays,
                              positions, num_drafts, k=k, ngram=ngram)


def target_probs(context, temperature, top_k, top_p):
    logits = jnp.asarray(TARGET[context][None])
    lp = processed(logits, jnp.array([temperature]), jnp.array([top_k]), jnp.array([top_p]))
    return np.exp(np.asarray(lp[0], np.float64))


def chi_square(counts, probs):
    """(statistic, degrees of freedom) of counts against probs; counts outside the support must be zero."""
    support = probs > 0
    assert counts[~support].sum() == 0, f"emitted a token outside the support: {counts} vs {probs}"
    if support.sum() < 2 or counts.sum() == 0:
        return 0.0, 0
    expected = probs[support] / probs[support].sum() * counts.sum()
    return float(np.sum((counts[support] - expected) ** 2 / expected)), int(support.sum()) - 1


def check_structure(tokens, emitted, drafts, num_drafts, vocab=VOCAB):
    accepted = emitted - 1
    assert np.all((emitted >= 1) & (emitted <= num_drafts + 1))
    for r in range(len(tokens)):
        np.testing.assert_array_equal(tokens[r, :accepted[r]], drafts[r, :accepted[r]])
        assert 0 <= tokens[r, accepted[r]] < vocab
        assert np.all(tokens[r, emitted[r]:] == NO_TOKEN)


CASES = [  # k, temperature, top_k, top_p, n-gram drafts, drafts per row vary
    (1, 1.0, 0, 1.0, False, False),
    (4, 0.8, 5, 1.0, False, True),
    (4, 1.2, 0, 0.8, False, False),
    (3, 1.0, 6, 0.9, True, True),
]


@pytest.mark.parametrize("k, temperature, top_k, top_p, ngram, ragged", CASES)
def test_emitted_tokens_follow_the_target_distribution(k, temperature, top_k, top_p, ngram, ragged):
    arrays = toy_arrays(ROWS, temperature, top_k, top_p)
    num_drafts = np.random.default_rng(k).integers(0, k + 1, ROWS) if ragged else np.full(ROWS, k)
    tokens, emitted, drafts = map(np.asarray, speculative_round(
        arrays, jnp.full(ROWS, 50, jnp.int32), jnp.asarray(num_drafts, jnp.int32), k=k, ngram=ngram))
    check_structure(tokens[:512], emitted[:512], drafts[:512], num_drafts[:512])
    assert np.all((emitted >= 1) & (emitted <= num_drafts + 1))
    assert 0.05 < np.mean(emitted > 1) < 0.95, "the toy must both accept and reject drafts"

    first = target_probs(START, temperature, top_k, top_p)
    stat, dof = chi_square(np.bincount(tokens[:, 0], minlength=VOCAB), first)
    assert stats.chi2.sf(stat, dof) > 1e-3, "first emitted token does not follow the target"
    if not ngram:   # the check has power: the raw drafts do not pass it
        draft_counts = np.bincount(drafts[:, 0], minlength=VOCAB)
        assert draft_counts[first == 0].sum() > 0 or stats.chi2.sf(*chi_square(draft_counts, first)) < 1e-6

    # second token given the first was an accepted draft: target conditioned on that context
    total_stat, total_dof = 0.0, 0
    chained = emitted >= 2
    for context in range(VOCAB):
        rows = chained & (tokens[:, 0] == context)
        if rows.sum() >= 100:
            stat, dof = chi_square(np.bincount(tokens[rows, 1], minlength=VOCAB),
                                   target_probs(context, temperature, top_k, top_p))
            total_stat, total_dof = total_stat + stat, total_dof + dof
    assert total_dof > 0
    assert stats.chi2.sf(total_stat, total_dof) > 1e-3, "second emitted token does not follow the target"


ROWS_SMALL, K_SMALL, VOCAB_SMALL = 256, 3, 40


def test_greedy_rows_reduce_to_exact_match_with_the_argmax():
    rows, k, vocab = ROWS_SMALL, K_SMALL, VOCAB_SMALL
    rng = np.random.default_rng(1)
    target_logits = rng.normal(size=(rows, k + 1, vocab)).astype(np.float32)
    best = target_logits.argmax(-1)
    drafts = np.where(rng.random((rows, k)) < 0.75, best[:, :k], rng.integers(0, vocab, (rows, k))).astype(np.int32)
    num_drafts = rng.integers(0, k + 1, rows).astype(np.int32)
    arrays = toy_arrays(rows, 0.0, 0, 1.0)
    positions = jnp.arange(rows, dtype=jnp.int32)
    draft_lps = np.where(np.arange(vocab) == drafts[..., None], 0.0, -np.inf).astype(np.float32)
    for given in (None, jnp.asarray(draft_lps)):
        tokens, emitted = map(np.asarray, verify(
            jnp.asarray(target_logits), jnp.asarray(drafts), given, jnp.asarray(num_drafts), arrays, positions))
        for r in range(rows):
            matches = drafts[r, :num_drafts[r]] == best[r, :num_drafts[r]]
            accepted = num_drafts[r] if matches.all() else int(np.argmin(matches))
            assert emitted[r] == accepted + 1
            np.testing.assert_array_equal(tokens[r, :accepted + 1],
                                          np.append(drafts[r, :accepted], best[r, accepted]))
        check_structure(tokens, emitted, drafts, num_drafts, vocab)


def test_zero_drafts_is_a_plain_sampling_step():
    rows, k, vocab = ROWS_SMALL, K_SMALL, VOCAB_SMALL
    rng = np.random.default_rng(2)
    target_logits = jnp.asarray(rng.normal(size=(rows, k + 1, vocab)).astype(np.float32))
    drafts = jnp.asarray(rng.integers(0, vocab, (rows, k)), jnp.int32)
    arrays = toy_arrays(rows, 0.9, 20, 0.95)
    positions = jnp.arange(100, 100 + rows, dtype=jnp.int32)
    tokens, emitted = verify(target_logits, drafts, None, jnp.zeros(rows, jnp.int32), arrays,
                                             positions)
    np.testing.assert_array_equal(emitted, 1)
    np.testing.assert_array_equal(tokens[:, 0], jax.jit(sample_tokens)(target_logits[:, 0], arrays, positions))
    assert np.all(np.asarray(tokens[:, 1:]) == NO_TOKEN)
    no_draft_slots = verify(target_logits[:, :1], drafts[:, :0], None, jnp.zeros(rows, jnp.int32), arrays,
                                   positions)
    np.testing.assert_array_equal(no_draft_slots[0][:, 0], tokens[:, 0])


def test_a_draft_equal_to_the_target_is_always_accepted():
    rows, k, vocab = ROWS_SMALL, K_SMALL, VOCAB_SMALL
    rng = np.random.default_rng(3)
    target_logits = jnp.asarray(rng.normal(size=(rows, k + 1, vocab)).astype(np.float32))
    arrays = toy_arrays(rows, 1.1, 10, 0.9)
    target_lp = processed(target_logits, arrays.temperature, arrays.top_k, arrays.top_p)
    drafts = jax.vmap(jax.random.categorical)(jax.random.split(jax.random.key(3), rows), target_lp[:, :k])
    num_drafts = jnp.asarray(rng.integers(0, k + 1, rows), jnp.int32)
    tokens, emitted = verify(target_logits, drafts.astype(jnp.int32), target_lp[:, :k], num_drafts, arrays,
                                    jnp.zeros(rows, jnp.int32))
    np.testing.assert_array_equal(emitted, num_drafts + 1)


def test_proposals_outside_the_support_are_always_rejected():
    rows, k, vocab = ROWS_SMALL, K_SMALL, VOCAB_SMALL
    rng = np.random.default_rng(4)
    target_logits = rng.normal(size=(rows, k + 1, vocab)).astype(np.float32)
    worst = target_logits.argmin(-1)[:, :k].astype(np.int32)          # never inside a top-3 support
    arrays = toy_arrays(rows, 1.0, 3, 1.0)
    tokens, emitted = verify(jnp.asarray(target_logits), jnp.asarray(worst), None, jnp.full(rows, k), arrays,
                                    jnp.zeros(rows, jnp.int32))
    np.testing.assert_array_equal(emitted, 1)
    top3 = np.argsort(-target_logits[:, 0], axis=-1)[:, :3]
    assert np.all((np.asarray(tokens[:, :1]) == top3).any(-1))


def test_draft_sample_returns_the_distribution_it_sampled_from():
    rows, vocab = ROWS_SMALL, VOCAB_SMALL
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(rows, vocab)).astype(np.float32))
    arrays = toy_arrays(rows, 0.8, 7, 0.9)
    positions = jnp.arange(rows, dtype=jnp.int32)
    token, log_probs = draft(logits, arrays, positions, positions)
    np.testing.assert_array_equal(log_probs, processed(logits, arrays.temperature, arrays.top_k,
                                                                 arrays.top_p))
    assert np.all(np.take_along_axis(np.asarray(log_probs), np.asarray(token)[:, None], -1) > -np.inf)
    assert not np.array_equal(token, draft(logits, arrays, positions, positions + 1)[0])   # fresh per round
    np.testing.assert_array_equal(token, draft(logits, arrays, positions, positions)[0])


def test_bad_shapes_are_rejected():
    arrays = toy_arrays(2, 1.0, 0, 1.0)
    logits, drafts, zeros = jnp.zeros((2, 3, 8)), jnp.zeros((2, 2), jnp.int32), jnp.zeros(2, jnp.int32)
    with pytest.raises(SamplingError, match="draft_tokens"):
        verify_drafts(logits, drafts[:, :1], None, zeros, arrays, zeros)
    with pytest.raises(SamplingError, match="draft_log_probs"):
        verify_drafts(logits, drafts, jnp.zeros((2, 2, 7)), zeros, arrays, zeros)
    with pytest.raises(SamplingError, match="num_drafts"):
        verify_drafts(logits, drafts, None, jnp.zeros(3, jnp.int32), arrays, zeros)


def test_replayed_acceptance_follows_its_distribution_and_keeps_draft_prefixes():
    """Benchmark-only replay: accepted counts are drawn from the given distribution, capped by num_drafts."""
    k, rows = 4, 4096
    distribution = (0.1, 0.2, 0.1, 0.25, 0.35)
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(rows, k + 1, VOCAB)), jnp.float32)
    drafts = jnp.asarray(rng.integers(0, VOCAB, (rows, k)), jnp.int32)
    num_drafts = jnp.asarray(np.where(np.arange(rows) < rows // 2, k, 2), jnp.int32)
    arrays = toy_arrays(rows, 1.0, 0, 1.0)
    tokens, emitted = jax.jit(replay_acceptance, static_argnums=3)(
        logits, drafts, num_drafts, distribution, arrays, jnp.full(rows, 7, jnp.int32))
    tokens, accepted = np.asarray(tokens), np.asarray(emitted) - 1
    full = accepted[:rows // 2]
    counts = np.bincount(full, minlength=k + 1)
    assert stats.chisquare(counts, np.asarray(distribution) * len(full)).pvalue > 1e-3
    assert accepted[rows // 2:].max() == 2 and (accepted[rows // 2:] == 2).mean() > 0.6     # capped: P(>=2) = 0.7
    for r in range(0, rows, 97):
        np.testing.assert_array_equal(tokens[r, :accepted[r]], np.asarray(drafts)[r, :accepted[r]])
        assert (tokens[r, accepted[r] + 1:] == NO_TOKEN).all() and tokens[r, accepted[r]] != NO_TOKEN
