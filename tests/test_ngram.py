"""Prompt-lookup drafts against a brute-force search, and the request's incrementally grown token array."""

from __future__ import annotations

import numpy as np

from sparsespec_jax.request import Request
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.ngram import propose_ngram


def brute_force_lookup(tokens: list[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Longest suffix first, most recent earlier start first: what the tokens after it were."""
    length = len(tokens)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        for start in range(length - 1 - n, -1, -1):
            if tokens[start:start + n] == tokens[length - n:]:
                return tokens[start + n:start + n + k]
    return []


def test_proposals_match_a_brute_force_search_on_random_histories():
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(2000):
        vocab = int(rng.choice([2, 3, 7, 50]))
        tokens = rng.integers(0, vocab, int(rng.integers(1, 40))).tolist()
        ngram_max = int(rng.integers(1, 6))
        ngram_min, k = int(rng.integers(1, ngram_max + 1)), int(rng.integers(1, 9))
        expected = brute_force_lookup(tokens, k, ngram_max, ngram_min)
        assert propose_ngram(np.asarray(tokens, np.int64), k, ngram_max, ngram_min) == expected, tokens
        found += bool(expected)
    assert found > 500                                      # most histories do have a match to continue


def test_longer_suffix_wins_over_a_more_recent_shorter_one():
    tokens = [5, 6, 7, 1, 9, 7, 2, 3, 6, 7]                 # "6 7" occurred at 1..2; "7" alone more recently at 5
    assert propose_ngram(np.asarray(tokens), 3, 2, 1) == [1, 9, 7]
    assert propose_ngram(np.asarray(tokens), 3, 1, 1) == [2, 3, 6]
    assert propose_ngram(np.asarray(tokens), 3, 3, 3) == []


def test_token_history_follows_appended_outputs():
    request = Request("r", "", [4, 8, 15], SamplingParams(), detokenizer=None, seed=0)
    np.testing.assert_array_equal(request.token_history(), [4, 8, 15])
    for step in range(1, 40):                               # grows past its capacity several times
        request.output_ids.extend(range(step, step + step % 3 + 1))
        np.testing.assert_array_equal(request.token_history(), request.prompt_ids + request.output_ids)
