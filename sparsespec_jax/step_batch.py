"""Turn one step's scheduled rows into the padded, bucketed device arrays of the unified step.

Flat token layout: first the sparse DRAFT rows (one token each, attending to their token sets), then the
full-attention rows (emitting rows first: verify rows, plain decode rows and prompt chunks that reach the
newest token; then dense draft rows and the other prompt chunks). Tokens the host already knows travel in
`tokens`; the others (drafts, and tokens sampled by a step whose results the host has not read yet) are read
on device from the slot window, through `window_index`.

Shapes are padded to powers of two so the jitted step compiles once per bucket: rows of each group, full-group
tokens, the page-table width and the longest query run. Small buckets are not worth their compile time, so each
has a floor (min_rows rows, min_pages pages, a whole chunk for prompt chunks). An empty group has size 0.
Padding rows have no tokens and write into the spare slot; padding tokens write into the reserved page.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sparsespec_jax.attention import AttentionMetadata
from sparsespec_jax.kv_cache import PADDING_PAGE
from sparsespec_jax.scheduler import RowKind, ScheduledRow

MIN_ROWS = 8


def bucket(n: int, cap: int, minimum: int = 1) -> int:
    """Smallest power of two >= n (at least `minimum`), never above `cap`; 0 stays 0."""
    if n == 0:
        return 0
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(size, cap) if n <= cap else n


@dataclasses.dataclass(frozen=True)
class BucketLimits:
    max_rows: int
    max_tokens: int
    max_q_len: int
    max_pages: int
    page_size: int
    min_pages: int = 1
    min_rows: int = MIN_ROWS

    def rows(self, n: int) -> int:
        return bucket(n, self.max_rows, minimum=self.min_rows)

    def pages(self, n: int) -> int:
        return bucket(n, self.max_pages, minimum=self.min_pages)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SparseRows:
    """Draft rows attending to their token sets: one query token each, the first len(slot) tokens of the step."""

    slot: jax.Array           # int32 [Ds]: one entry per draft row (dense ones dead, live False)
    cycle_start: jax.Array    # int32 [Ds]: position of the cycle's newest committed token
    draft_index: jax.Array    # int32 [Ds]: this step feeds position cycle_start + draft_index
    page_tables: jax.Array    # int32 [Ds, P]
    live: jax.Array           # bool  [Ds]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftRows:
    """Every draft row (sparse or dense): where its logits come from and where its sample goes."""

    token: jax.Array          # int32 [Rd]: flat token index
    slot: jax.Array           # int32 [Rd]
    draft_index: jax.Array    # int32 [Rd]: the sample becomes window[slot, draft_index + 1]
    position: jax.Array       # int32 [Rd]: position of the sampled draft
    cycle_start: jax.Array    # int32 [Rd]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EmitRows:
    """Rows whose samples become output: the leading rows of the full-attention group (padded to its size)."""

    first_token: jax.Array    # int32 [Re]: flat index of the token predicting the first new position
    slot: jax.Array           # int32 [Re]
    num_drafts: jax.Array     # int32 [Re]: drafts following first_token (0: plain sample)
    position: jax.Array       # int32 [Re]: first new position
    refresh: jax.Array        # bool  [Re]: a verify that renews the request's token set


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class UnifiedBatch:
    tokens: jax.Array         # int32 [N]: host-known input tokens
    window_index: jax.Array   # int32 [N]: flat window index to read the token from, -1 = use `tokens`
    positions: jax.Array      # int32 [N]
    write_slots: jax.Array    # int32 [N]
    sparse: SparseRows
    meta: AttentionMetadata   # full-attention rows; q_start counts from the first token after the sparse rows
    drafts: DraftRows
    emits: EmitRows


def _input_tokens(row: ScheduledRow, width: int) -> tuple[list[int], list[int]]:
    """Host tokens and window indices (-1: host) of the row's fed positions."""
    request = row.request
    known = request.num_tokens
    tokens, window = [], []
    for position in range(row.start, row.start + row.num_tokens):
        offset = position - row.cycle_start
        if position < known:
            tokens.append(request.token_at(position)); window.append(-1)
        elif row.proposal and 1 <= offset <= len(row.proposal):
            tokens.append(row.proposal[offset - 1]); window.append(-1)
        else:
            tokens.append(0); window.append(request.slot * width + offset)
    return tokens, window


def build_unified_batch(rows: list[ScheduledRow], limits: BucketLimits, width: int, spare_slot: int) -> UnifiedBatch:
    """width = k + 1 (1 without speculation): the window row length.

    Buckets are tied to keep the number of compiled shapes small: every draft row has an entry in the sparse
    group (dense ones as dead entries, their real token in the full group), the emitting rows are padded to
    the full group's row count, and without prompt chunks the full group holds exactly width tokens per row.
    """
    draft_rows = [row for row in rows if row.kind is RowKind.DRAFT]
    emit_rows = [row for row in rows if row.emits]
    other_full = [row for row in rows if not row.emits and not (row.kind is RowKind.DRAFT and row.sparse)]
    full_rows = emit_rows + other_full
    has_chunks = any(row.kind is RowKind.PREFILL for row in full_rows)

    num_sparse = limits.rows(len(draft_rows))
    num_full = limits.rows(len(full_rows))
    full_tokens = sum(row.num_tokens for row in full_rows)
    # With prompt chunks, the query run is the chunk size and the token count at least one chunk.
    num_full_tokens = (bucket(full_tokens, limits.max_tokens, minimum=max(limits.max_q_len, num_full * width))
                       if has_chunks else num_full * width)
    max_q = max(limits.max_q_len, width) if has_chunks else width
    num_pages = limits.pages(max((len(row.request.pages) for row in rows), default=1))
    ps = limits.page_size
    n = num_sparse + num_full_tokens

    tokens = np.zeros(n, np.int32)
    window_index = np.full(n, -1, np.int32)
    positions = np.zeros(n, np.int32)
    write_slots = np.full(n, PADDING_PAGE * ps, np.int32)
    token_of: dict[int, int] = {}

    def place(row: ScheduledRow, at: int) -> None:
        pages = row.request.pages
        end = at + row.num_tokens
        tokens[at:end], window_index[at:end] = _input_tokens(row, width)
        pos = range(row.start, row.start + row.num_tokens)
        positions[at:end] = pos
        write_slots[at:end] = [pages[p // ps] * ps + p % ps for p in pos]
        token_of[id(row)] = at

    def page_table(row: ScheduledRow, out: np.ndarray) -> None:
        out[:len(row.request.pages)] = row.request.pages

    sparse = dict(slot=np.full(num_sparse, spare_slot, np.int32), cycle_start=np.zeros(num_sparse, np.int32),
                  draft_index=np.zeros(num_sparse, np.int32), live=np.zeros(num_sparse, bool),
                  page_tables=np.full((num_sparse, num_pages), PADDING_PAGE, np.int32))
    for r, row in enumerate(draft_rows):
        if not row.sparse:
            continue                                     # dense: attends in the full group
        place(row, r)
        sparse["slot"][r], sparse["cycle_start"][r] = row.request.slot, row.cycle_start
        sparse["draft_index"][r], sparse["live"][r] = row.draft_index, True
        page_table(row, sparse["page_tables"][r])

    q_start = np.zeros(num_full, np.int32)
    q_len = np.zeros(num_full, np.int32)
    kv_len = np.zeros(num_full, np.int32)
    page_tables = np.full((num_full, num_pages), PADDING_PAGE, np.int32)
    at = 0
    for r, row in enumerate(full_rows):
        place(row, num_sparse + at)
        q_start[r], q_len[r], kv_len[r] = at, row.num_tokens, row.start + row.num_tokens
        page_table(row, page_tables[r])
        at += row.num_tokens
    meta = AttentionMetadata(q_start=q_start, q_len=q_len, kv_len=kv_len, page_tables=page_tables,
                             write_slots=write_slots, page_size=ps, max_q_len=max_q)

    drafts = DraftRows(token=np.zeros(num_sparse, np.int32), slot=np.full(num_sparse, spare_slot, np.int32),
                       draft_index=np.zeros(num_sparse, np.int32), position=np.zeros(num_sparse, np.int32),
                       cycle_start=np.zeros(num_sparse, np.int32))
    for r, row in enumerate(draft_rows):
        drafts.token[r], drafts.slot[r], drafts.draft_index[r] = token_of[id(row)], row.request.slot, row.draft_index
        drafts.position[r], drafts.cycle_start[r] = row.start + 1, row.cycle_start

    num_emit = num_full
    emits = EmitRows(first_token=np.zeros(num_emit, np.int32), slot=np.full(num_emit, spare_slot, np.int32),
                     num_drafts=np.zeros(num_emit, np.int32), position=np.zeros(num_emit, np.int32),
                     refresh=np.zeros(num_emit, bool))
    for r, row in enumerate(emit_rows):
        first = row.num_tokens - 1 - row.num_drafts        # the newest committed token predicts the first new one
        emits.first_token[r] = token_of[id(row)] + first
        emits.slot[r], emits.num_drafts[r] = row.request.slot, row.num_drafts
        emits.position[r], emits.refresh[r] = row.start + first + 1, row.refresh
    return UnifiedBatch(tokens=tokens, window_index=window_index, positions=positions, write_slots=write_slots,
                        sparse=SparseRows(**sparse), meta=meta, drafts=drafts, emits=emits)
