"""Turn scheduled rows into the padded, bucketed device arrays of one step.

Shapes are padded to a few buckets (powers of two) so the jitted step compiles once per bucket and never in
steady state: rows R, flat tokens N, query tokens per row T and page-table width P. Small buckets are not
worth their compile time, so each has a floor (MIN_ROWS rows, min_pages pages, MIN_CHUNK query tokens for
prompt chunks). Padding rows have q_len = 0; padding tokens write into the reserved padding page.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sparsespec_jax.attention import AttentionMetadata
from sparsespec_jax.kv_cache import PADDING_PAGE
from sparsespec_jax.scheduler import ScheduledRow

MIN_ROWS = 8
MIN_CHUNK = 16


def bucket(n: int, cap: int, minimum: int = 1) -> int:
    """Smallest power of two >= n (at least `minimum`), never above `cap`."""
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(size, cap) if n <= cap else n


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepBatch:
    tokens: jax.Array            # int32 [N]
    positions: jax.Array         # int32 [N]
    meta: AttentionMetadata
    logit_tokens: jax.Array      # int32 [R]: the token whose logits each row samples from
    sample_positions: jax.Array  # int32 [R]: position the sampled token will take (keys the row's RNG)


@dataclasses.dataclass(frozen=True)
class BucketLimits:
    max_rows: int
    max_tokens: int
    max_q_len: int
    max_pages: int
    page_size: int
    min_pages: int = 1

    def rows(self, n: int) -> int:
        return bucket(n, self.max_rows, minimum=MIN_ROWS)

    def pages(self, n: int) -> int:
        return bucket(n, self.max_pages, minimum=self.min_pages)


def build_step_batch(rows: list[ScheduledRow], limits: BucketLimits) -> StepBatch:
    decode_only = all(row.num_tokens == 1 for row in rows)
    num_rows = limits.rows(len(rows))
    total = sum(row.num_tokens for row in rows)
    num_tokens = num_rows if decode_only else bucket(total, limits.max_tokens, minimum=MIN_CHUNK)
    max_q = 1 if decode_only else bucket(max(row.num_tokens for row in rows), limits.max_q_len, minimum=MIN_CHUNK)
    num_pages = limits.pages(max(len(row.request.pages) for row in rows))
    ps = limits.page_size

    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    write_slots = np.full(num_tokens, PADDING_PAGE * ps, np.int32)
    q_start = np.zeros(num_rows, np.int32)
    q_len = np.zeros(num_rows, np.int32)
    kv_len = np.zeros(num_rows, np.int32)
    page_tables = np.full((num_rows, num_pages), PADDING_PAGE, np.int32)
    logit_tokens = np.zeros(num_rows, np.int32)
    sample_positions = np.zeros(num_rows, np.int32)

    start = 0
    for r, row in enumerate(rows):
        req, n = row.request, row.num_tokens
        first = req.num_computed
        pos = np.arange(first, first + n, dtype=np.int32)
        pages = np.asarray(req.pages, np.int32)
        tokens[start:start + n] = req.all_ids[first:first + n]
        positions[start:start + n] = pos
        write_slots[start:start + n] = pages[pos // ps] * ps + pos % ps
        q_start[r], q_len[r], kv_len[r] = start, n, first + n
        page_tables[r, :len(pages)] = pages
        logit_tokens[r] = start + n - 1
        sample_positions[r] = first + n
        start += n
    meta = AttentionMetadata(q_start=q_start, q_len=q_len, kv_len=kv_len, page_tables=page_tables,
                             write_slots=write_slots, page_size=ps, max_q_len=max_q)
    return StepBatch(tokens=tokens, positions=positions, meta=meta, logit_tokens=logit_tokens,
                     sample_positions=sample_positions)
