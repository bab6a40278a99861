"""Host-side bookkeeping that keeps a step's planning and reading cheap: packed arguments, the slot table's
per-slot copies of request facts, and request statistics derived on read."""

import numpy as np
import pytest

from sparsespec_jax.kv_cache import PADDING_PAGE, PageAllocator
from sparsespec_jax.packed_args import pack, unpack
from sparsespec_jax.request import Request
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.slot_table import SlotTable


class _Detokenizer:
    text = ""

    def __init__(self, stop_strings: bool):
        self.matches_stop_strings = stop_strings


def _request(rng, stop_ids=frozenset(), stop_strings=False, prompt_len=5) -> Request:
    prompt = rng.integers(0, 100, prompt_len).tolist()
    return Request("r", "", prompt, SamplingParams(max_tokens=8), _Detokenizer(stop_strings), seed=3,
                   stop_ids=frozenset(stop_ids))


def test_pack_round_trips_mixed_leaves_bit_exact():
    rng = np.random.default_rng(0)
    tree = {"flags": rng.random(5) < 0.5, "scale": rng.standard_normal((2, 3)).astype(np.float32),
            "seed": rng.integers(0, 2 ** 32, 4, dtype=np.uint32), "ids": rng.integers(-50, 50, (3, 2)).astype(np.int32)}
    buffer, layout = pack(tree)
    assert buffer.dtype == np.int32 and buffer.shape == (5 + 6 + 4 + 6,)
    back = unpack(buffer, layout)
    for name, leaf in tree.items():
        restored = np.asarray(back[name])
        assert restored.dtype == leaf.dtype and restored.shape == leaf.shape
        np.testing.assert_array_equal(restored, leaf)


def test_pack_rejects_64_bit_leaves_naming_them():
    with pytest.raises(TypeError, match="int64"):
        pack({"bad": np.arange(3, dtype=np.int64)})


def test_output_tokens_follow_output_ids():
    request = _request(np.random.default_rng(1))
    assert request.stats.output_tokens == 0
    request.output_ids.extend([7, 9, 11])
    assert request.stats.output_tokens == 3
    assert request.to_output().stats.output_tokens == 3


def test_slot_table_keeps_each_requests_stop_ids_and_widens_for_more():
    rng = np.random.default_rng(2)
    table = SlotTable(4, 6, PageAllocator(32, 4))
    plain = _request(rng, stop_ids={5})
    many = _request(rng, stop_ids={9, 3, 40}, stop_strings=True, prompt_len=7)
    table.assign(0, plain, cap=13)
    table.assign(2, many, cap=15)
    assert table.stop_tokens.shape[1] == 3
    np.testing.assert_array_equal(table.stop_tokens[0], [5, -1, -1])
    np.testing.assert_array_equal(table.stop_tokens[2], [3, 9, 40])
    np.testing.assert_array_equal(table.recorded[[0, 2]], [5, 7])
    np.testing.assert_array_equal(table.stop_strings[[0, 2]], [False, True])
    assert table.before_first_token[0] and table.before_first_token[2]
    table.assign(2, _request(rng), cap=13)                       # a new occupant clears the old stop ids
    np.testing.assert_array_equal(table.stop_tokens[2], [-1, -1, -1])


def test_spare_row_of_page_table_stays_padding():
    table = SlotTable(3, 5, PageAllocator(40, 4))
    table.assign(1, _request(np.random.default_rng(3)), cap=20)
    table.grow(np.array([1]), np.array([17]))
    assert table.num_pages[1] == 5 and (table.page_table[1, :5] != PADDING_PAGE).all()
    assert (table.page_table[3] == PADDING_PAGE).all()           # the spare slot's row
    table.release_pages(1)
    assert (table.page_table[1] == PADDING_PAGE).all()
