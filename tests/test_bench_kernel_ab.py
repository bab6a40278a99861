"""The interleaved kernel A/B script: the baseline's kernels really come from the baseline's checkout (with their
own helpers), this checkout's modules are untouched afterwards, and a smoke run reports every kernel."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))

import kernel_ab  # noqa: E402
import pallas_kernels.paged_attention.triton_kernel as current_paged  # noqa: E402


@pytest.fixture
def baseline(tmp_path):
    shutil.copytree(REPO_ROOT / "pallas_kernels", tmp_path / "pallas_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_baseline_kernels_come_from_the_baseline_checkout(baseline):
    before = dict(sys.modules)
    kernels = kernel_ab.load_kernels(baseline)
    assert sorted(kernels) == sorted(kernel_ab.KERNELS)
    for kernel in kernels.values():
        assert Path(kernel.__globals__["__file__"]).is_relative_to(baseline)
    unified_helpers = kernels["unified_attention"].__globals__["split_range"].__globals__["__file__"]
    assert Path(unified_helpers).is_relative_to(baseline)              # its helpers are the baseline's too
    assert sys.modules["pallas_kernels.paged_attention.triton_kernel"] is current_paged
    assert {n: m for n, m in sys.modules.items() if n.startswith("pallas_kernels")} == \
        {n: m for n, m in before.items() if n.startswith("pallas_kernels")}
    with pytest.raises(FileNotFoundError, match="no pallas_kernels"):
        kernel_ab.load_kernels(baseline / "missing")


@pytest.mark.quick_compiles
def test_smoke_run_reports_every_kernel(baseline, tmp_path, capsys):
    out = tmp_path / "ab.md"
    assert kernel_ab.main(["--baseline", str(baseline), "--smoke", "--rounds", "2", "--reps", "1", "--sets", "1",
                           "--out", str(out)]) == 0
    table = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    rows = [line.split("|")[1:-1] for line in table]
    assert [r[0].strip() for r in rows[1:]] == list(kernel_ab.KERNELS)
    for row in rows[1:]:
        baseline_ms, current_ms, ratio = (float(x) for x in row[4:7])
        assert baseline_ms > 0 and current_ms > 0
        exact = current_ms / baseline_ms              # times shown to 4 places, the ratio to 3: compare within that
        rounding = exact * (0.00005 / current_ms + 0.00005 / baseline_ms) + 0.0005
        assert math.isclose(ratio, exact, abs_tol=rounding + 1e-9)
    with pytest.raises(SystemExit):
        kernel_ab.main(["--baseline", str(baseline)])                  # no GPU here: only --smoke runs
    assert "need a GPU" in capsys.readouterr().err
