"""Turn one step's scheduled rows into the padded, bucketed device arrays of the unified step.

Flat token layout: first the sparse DRAFT rows (one token each, attending to their token sets), then the
full-attention rows (emitting rows first: verify rows, plain decode rows and prompt chunks that reach the
newest token; then dense draft rows and the other prompt chunks). Prompt chunks and host-made drafts travel
in `tokens`; draft and verify rows read their tokens on device from the slot window (the cycle's newest token
and its drafts), through `window_index`, so the host never needs the previous step's results to build a batch.
Everything is built with array operations over the plan's rows.

Shapes are padded to powers of two so the jitted step compiles once per bucket: rows of each group, full-group
tokens, the page-table width and the longest query run. Small buckets are not worth their compile time, so each
has a floor (min_rows rows, min_pages pages, a whole chunk for prompt chunks). An empty group has size 0.
With rows_per_doubling > 1, a group of more than FINE_ROWS_ABOVE_TOKENS tokens pads its rows more finely, to
one of that many evenly spaced sizes up to the next power of two (a flat pillar batch of 128 requests: 102 draft
rows padded to 112, not 128): at that size the step's weight GEMMs stop being bound by reading the weights, so
padded tokens cost compute. It is off by default: a batch's first steps pass through about twice as many shapes
(11 against 5 over the first 200 steps of a placed pillar batch of 128), each compiled once, for the 1.5-2.5%
per step it saved at the Qwen3-8B shape; it pays in long runs.
Padding rows have no tokens and write into the spare slot; padding tokens write into the reserved page.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sparsespec_jax.attention import AttentionMetadata
from sparsespec_jax.kv_cache import PADDING_PAGE
from sparsespec_jax.scheduler import RowKind, StepPlan
from sparsespec_jax.slot_table import SlotTable, ragged_offsets

MIN_ROWS = 8
FINE_ROWS_ABOVE_TOKENS = 64


def bucket(n: int, cap: int, minimum: int = 1, per_doubling: int = 1) -> int:
    """Smallest power of two >= n (at least `minimum`), never above `cap`; 0 stays 0. With per_doubling > 1,
    the smallest of `per_doubling` evenly spaced sizes between half that power and it, where those sizes are
    whole numbers above `minimum`."""
    if n == 0:
        return 0
    if n > cap:
        return n
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    half = size // 2
    if per_doubling > 1 and half >= minimum and half % per_doubling == 0:
        step = half // per_doubling
        size = half + -(-(n - half) // step) * step
    return min(size, cap)


@dataclasses.dataclass(frozen=True)
class BucketLimits:
    max_rows: int
    max_tokens: int
    max_q_len: int
    max_pages: int
    page_size: int
    min_pages: int = 1
    min_rows: int = MIN_ROWS
    rows_per_doubling: int = 1

    def rows(self, n: int, tokens_per_row: int = 1) -> int:
        fine = self.rows_per_doubling if n * tokens_per_row > FINE_ROWS_ABOVE_TOKENS else 1
        return bucket(n, self.max_rows, minimum=self.min_rows, per_doubling=fine)

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
    # Whether any row refreshes (static): a step of plain decodes only skips the score pass and top-K.
    any_refresh: bool = dataclasses.field(metadata=dict(static=True))
    # Tokens whose logits each row needs (static): k + 1, or 1 when no emitting row has drafts.
    width: int = dataclasses.field(metadata=dict(static=True))


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


def rows_array(values, spare: int, size: int, dtype=np.int32) -> np.ndarray:
    """`values` padded to `size` entries with `spare`."""
    out = np.full(size, spare, dtype)
    out[:len(values)] = values
    return out


def build_unified_batch(plan: StepPlan, table: SlotTable, limits: BucketLimits, width: int,
                        spare_slot: int) -> UnifiedBatch:
    """width = k + 1 (1 without speculation): the window row length. spare_slot: the slot padding rows name,
    the table's last page-table row (all padding).

    Buckets are tied to keep the number of compiled shapes small: every draft row has an entry in the sparse
    group (dense ones as dead entries, their real token in the full group), the emitting rows are padded to
    the full group's row count, and without prompt chunks the full group holds exactly width tokens per row,
    or one when no row feeds more (a step of plain decodes pays for no drafts).
    """
    if spare_slot != len(table.page_table) - 1:
        raise ValueError(f"spare_slot {spare_slot}: must be the slot table's padding row "
                         f"{len(table.page_table) - 1}")
    kind, slot, start = plan.kind, plan.slot, plan.start
    is_draft = kind == RowKind.DRAFT
    draft_rows = np.flatnonzero(is_draft)
    sparse_draft = plan.sparse[draft_rows]
    full_rows = np.concatenate([np.flatnonzero(plan.emits), np.flatnonzero(~plan.emits & ~(is_draft & plan.sparse))])
    has_chunks = bool((kind[full_rows] == RowKind.PREFILL).any())

    q_len = plan.num_tokens[full_rows]
    full_tokens = int(q_len.sum())
    # Full rows of one token each (plain decodes, dense drafts) need no room for a verify's drafts.
    row_width = width if has_chunks or (q_len > 1).any() else 1
    num_sparse = limits.rows(len(draft_rows))
    num_full = limits.rows(len(full_rows), tokens_per_row=row_width)
    # With prompt chunks, the query run is the chunk size and the token count at least one chunk.
    num_full_tokens = (bucket(full_tokens, limits.max_tokens, minimum=max(limits.max_q_len, num_full * width))
                       if has_chunks else num_full * row_width)
    max_q = max(limits.max_q_len, width) if has_chunks else row_width
    num_pages = limits.pages(max(int(table.num_pages[slot].max()), 1))
    page_table = table.page_table
    ps = limits.page_size
    n = num_sparse + num_full_tokens

    # Token-level view of the rows that feed tokens: live sparse draft entries, then the full rows.
    live_sparse = draft_rows[sparse_draft]
    fed_rows = np.concatenate([live_sparse, full_rows])
    run, offset = ragged_offsets(plan.num_tokens[fed_rows])
    q_start = np.cumsum(q_len) - q_len
    flat = np.concatenate([np.flatnonzero(sparse_draft), num_sparse + q_start])[run] + offset
    row = fed_rows[run]
    position = start[row] + offset
    row_slot = slot[row]
    window_offset = position - plan.cycle_start[row]
    decode = kind[row] != RowKind.PREFILL

    tokens = np.zeros(n, np.int32)
    window_index = np.full(n, -1, np.int32)
    positions = np.zeros(n, np.int32)
    write_slots = np.full(n, PADDING_PAGE * ps, np.int32)
    positions[flat] = position
    write_slots[flat] = page_table[row_slot, position // ps] * ps + position % ps
    window_index[flat[decode]] = (row_slot * width + window_offset)[decode]
    if plan.proposals is not None:                       # host-made drafts travel as host tokens
        host = decode & (window_offset >= 1)
        tokens[flat[host]] = plan.proposals[row[host], window_offset[host] - 1]
        window_index[flat[host]] = -1
    token_of = np.full(len(slot), -1, np.int64)
    token_of[live_sparse] = np.flatnonzero(sparse_draft)
    token_of[full_rows] = num_sparse + q_start
    for r in full_rows[kind[full_rows] == RowKind.PREFILL]:
        at = token_of[r]
        tokens[at:at + plan.num_tokens[r]] = plan.prompt_tokens[int(slot[r])]

    # Page tables are gathered in one go: entries without a live row read the spare slot's row, all padding.
    sparse_slot = rows_array(np.where(sparse_draft, slot[draft_rows], spare_slot), spare_slot, num_sparse)
    sparse = SparseRows(slot=sparse_slot,
                        cycle_start=rows_array(plan.cycle_start[draft_rows], 0, num_sparse),
                        draft_index=rows_array(plan.draft_index[draft_rows], 0, num_sparse),
                        page_tables=page_table[sparse_slot, :num_pages],
                        live=rows_array(sparse_draft, False, num_sparse, bool))

    page_tables = page_table[rows_array(slot[full_rows], spare_slot, num_full), :num_pages]
    meta = AttentionMetadata(q_start=rows_array(q_start, 0, num_full), q_len=rows_array(q_len, 0, num_full),
                             kv_len=rows_array(start[full_rows] + q_len, 0, num_full), page_tables=page_tables,
                             write_slots=write_slots, page_size=ps, max_q_len=max_q)

    drafts = DraftRows(token=rows_array(token_of[draft_rows], 0, num_sparse),
                       slot=rows_array(slot[draft_rows], spare_slot, num_sparse),
                       draft_index=rows_array(plan.draft_index[draft_rows], 0, num_sparse),
                       position=rows_array(start[draft_rows] + 1, 0, num_sparse),
                       cycle_start=rows_array(plan.cycle_start[draft_rows], 0, num_sparse))

    emit_rows = np.flatnonzero(plan.emits)
    first = plan.num_tokens[emit_rows] - 1 - plan.num_drafts[emit_rows]   # the newest committed token predicts
    emits = EmitRows(first_token=rows_array(token_of[emit_rows] + first, 0, num_full),
                     slot=rows_array(slot[emit_rows], spare_slot, num_full),
                     num_drafts=rows_array(plan.num_drafts[emit_rows], 0, num_full),
                     position=rows_array(start[emit_rows] + first + 1, 0, num_full),
                     refresh=rows_array(plan.refresh[emit_rows], False, num_full, bool),
                     any_refresh=bool(plan.refresh[emit_rows].any()),
                     width=width if (plan.num_drafts[emit_rows] > 0).any() else 1)
    return UnifiedBatch(tokens=tokens, window_index=window_index, positions=positions, write_slots=write_slots,
                        sparse=sparse, meta=meta, drafts=drafts, emits=emits)
