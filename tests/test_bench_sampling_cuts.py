"""bench/sampling_cuts.py runs and reports every cut at every size, each against the no-cut time."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import sampling_cuts  # noqa: E402


def test_every_cut_is_timed_at_every_vocabulary(tmp_path):
    out = tmp_path / "cuts.md"
    table = sampling_cuts.main(["--rows", "6", "--vocab", "300", "1000", "--reps", "3", "--out", str(out)])
    assert out.read_text() == table
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split(" | ")[0] for row in rows] == ["| 300", "| 1000"]
    for row in rows:
        *cells, equal = row.strip("| ").split(" | ")[1:]
        assert equal == "yes"
        none, *cuts = (float(cell.split()[0]) for cell in cells)
        assert none > 0 and len(cuts) == 3 and min(cuts) > 0           # top_p, top_k + top_p twice
        ratios = [float(re.search(r"\(([\d.]+)x\)", cell).group(1)) for cell in cells[1:]]
        for ratio, ms in zip(ratios, cuts):       # times shown to 3 places, ratios to 1: compare within that
            rounding = ms / none * (0.0005 / none + 0.0005 / ms) + 0.05
            assert ratio == pytest.approx(ms / none, abs=rounding + 1e-6)
