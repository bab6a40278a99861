"""`sparsespec plot-steps`: tokens fed per step of profiled runs as a PNG; bad profiles are named by file and line."""

from __future__ import annotations

import pytest

from sparsespec_jax.benchmark.step_plot import plot_tokens_per_step, read_profile, tokens_series
from sparsespec_jax.cli import EXIT_INVALID_JOB, EXIT_OK, main
from sparsespec_jax.step_metrics import StepLog, StepMetrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_profile(path, tokens: list[int]) -> None:
    """A profile as `generate --profile` writes it (StepLog.write_jsonl)."""
    log = StepLog()
    for step, fed in enumerate(tokens):
        log.add(StepMetrics(step=step, host_ms=1.0, dispatch_ms=0.5, wait_ms=2.0, step_ms=3.0, tokens=fed,
                            prefill_rows=0, draft_rows=fed, verify_rows=0, decode_rows=0, emitted_tokens=0,
                            kv_tokens_used=0, kv_tokens_offloaded=0))
    log.write_jsonl(path)


def test_profiles_are_read_back_in_step_order_and_plotted(tmp_path, capsys):
    phased, unified = [16, 16, 16, 144] * 5, [44, 46, 44, 46] * 5
    write_profile(tmp_path / "phased.jsonl", phased)
    write_profile(tmp_path / "unified.jsonl", unified)
    assert tokens_series(read_profile(tmp_path / "phased.jsonl")) == phased
    out = tmp_path / "plots" / "steps.png"
    assert main(["plot-steps", str(tmp_path / "phased.jsonl"), str(tmp_path / "unified.jsonl"),
                 "--first-steps", "12", "--out", str(out)]) == EXIT_OK
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_bad_profiles_and_flags_are_named(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    write_profile(good, [8, 8])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"step": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:3: step record without field 'tokens'"):
        read_profile(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: invalid JSON"):
        read_profile(bad)
    bad.write_text('{"step": 0, "tokens": -1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: field 'tokens' must be an integer >= 0"):
        read_profile(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="bad.jsonl: no step records"):
        read_profile(bad)
    with pytest.raises(ValueError, match="at least one non-empty series"):
        plot_tokens_per_step({"empty": []}, tmp_path / "x.png")
    out = str(tmp_path / "x.png")
    assert main(["plot-steps", str(good), "--labels", "a", "b", "--out", out]) == EXIT_INVALID_JOB
    assert "--labels: 2 given for 1 profiles" in capsys.readouterr().err
    assert main(["plot-steps", str(tmp_path / "missing.jsonl"), "--out", out]) == EXIT_INVALID_JOB
    assert "missing.jsonl" in capsys.readouterr().err
