"""The tensor-parallel scaling script end to end on the CPU: its smoke run (tiny model, 4 forced host devices)
with the correctness check, one degree above the device count asking to be skipped.

Run as a subprocess so the script's own device-count flag takes effect before jax starts. Every engine compiles
its own steps (a few seconds each on a CPU), so one split degree (4, the finest) stands for all.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "bench" / "tensor_parallel.py"
RESULTS = REPO_ROOT / "bench" / "results"


@pytest.fixture
def result_name():
    name = f"test_tensor_parallel_{uuid.uuid4().hex[:8]}"
    yield name
    for suffix in (".json", ".md"):
        (RESULTS / f"{name}{suffix}").unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.extended
def test_smoke_run_reports_every_degree_and_method_and_passes_the_check(result_name):
    env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    process = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--check", "--tp", "1", "4", "8",
                              "--name", result_name], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert "note: skipping TP8: this host has 4 device(s)" in process.stdout
    assert "check TP4: PASS" in process.stdout

    result = json.loads((RESULTS / f"{result_name}.json").read_text())
    assert result["devices"] == 4 and result["skipped_degrees"] == [8]
    assert result["check"] == [{"tensor_parallel": 4, "passed": True, "vanilla_equal": 4, "pillar_equal": 4,
                                "requests": 4}]
    rows = {(row["tensor_parallel"], row["method"]): row for row in result["rows"]}
    assert sorted(rows) == [(1, "none"), (1, "pillar"), (4, "none"), (4, "pillar")]
    for row in rows.values():
        for field in ("tokens_per_s", "step_ms", "host_ms", "tokens_per_step", "scaling_efficiency"):
            assert math.isfinite(row[field]) and row[field] > 0, (row, field)
        assert row["steps_timed"] + row["steps_excluded"] == result["args"]["steps"]
        assert row["estimated_device_bytes"] > 0 and row["preemptions"] == 0     # the pool holds the window
        assert row["burst_steps"] == 1                  # unset: the engine's default, single steps on a CPU
    for method in ("none", "pillar"):
        assert rows[(1, method)]["scaling_efficiency"] == 1.0
        assert rows[(4, method)]["estimated_device_bytes"] < rows[(1, method)]["estimated_device_bytes"]
    # Pillar's verify outcomes are replayed (mean 5.75 of 8 drafts accepted); vanilla verifies nothing.
    assert rows[(1, "none")]["accepted_per_verify"] == rows[(4, "none")]["accepted_per_verify"] == 0.0
    assert 0 < rows[(1, "pillar")]["accepted_per_verify"] <= 8
    assert result["replay_acceptance"] == result["args"]["replay"] and len(result["replay_acceptance"]) == 9
    ratios = result["pillar_over_vanilla"]
    assert sorted(ratios) == ["1", "4"] and all(math.isfinite(r) and r > 0 for r in ratios.values())

    markdown = (RESULTS / f"{result_name}.md").read_text()
    assert "REPLAYED" in markdown and "TP4 PASS" in markdown
    assert process.stdout.rstrip().endswith(markdown.rstrip().splitlines()[-1])      # the table comes last
