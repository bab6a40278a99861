"""Prompt-lookup drafts: continue the request's latest n-gram from its most recent earlier occurrence."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def propose_ngram(tokens: Sequence[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest matching suffix."""
    history = np.asarray(tokens, dtype=np.int64)
    length = len(history)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        # Windows starting at 0 .. length-1-n: every earlier occurrence, never the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
        matches = np.flatnonzero((windows == history[length - n:]).all(axis=1))
        if matches.size:
            start = int(matches[-1]) + n
            return history[start:start + k].tolist()
    return []
