"""Prompt-lookup drafts: continue the request's latest n-gram from its most recent earlier occurrence."""

from __future__ import annotations

import numpy as np


def propose_ngram(history: np.ndarray, k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest matching suffix
    (ngram_min..ngram_max tokens long) of `history`, the request's tokens oldest first.

    Occurrences are found by where they end: earlier positions holding the newest token, narrowed one token
    further back per suffix length. Each step compares only the surviving candidates, so a proposal costs one
    pass over the history, however long the context.
    """
    length = len(history)
    ends = np.flatnonzero(history[:-1] == history[-1])     # occurrences of the 1-token suffix, by last position
    best_end = -1
    for n in range(1, min(ngram_max, length - 1) + 1):
        if n > 1:
            ends = ends[ends >= n - 1]
            ends = ends[history[ends - (n - 1)] == history[length - n]]
        if not ends.size:
            break
        if n >= ngram_min:
            best_end = int(ends[-1])
    if best_end < 0:
        return []
    return history[best_end + 1:best_end + 1 + k].tolist()
