"""The `sparsespec` CLI: single prompts, resumable JSONL batches, and clear failures."""

from __future__ import annotations

import json

import pytest

from sparsespec_jax.cli import EXIT_INVALID_JOB, EXIT_OK, EXIT_REQUEST_ERRORS, main

FAST = ["--max-batch-size", "4", "--kv-cache-tokens", "4096", "--max-model-len", "512", "--max-tokens", "8"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_single_prompt_prints_completion_and_acceptance(capsys):
    code = main(["generate", "--prompt", "The capital of France is Paris. The capital of Italy is", "--draft",
                 "pillar", "--spec-k", "4", "--min-budget", "16", *FAST])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    text, stats = out.rsplit("\n[", 1)
    assert "Rome" in text
    assert "acceptance_mean=" in stats and "draft=pillar" in stats


def test_batch_isolates_bad_lines_and_resumes(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"id": "a", "prompt": "One, two, three,"}),
        "{not json",
        json.dumps({"id": "c", "prompt": "Colors of the rainbow:", "temperature": 0.7, "seed": 3}),
        json.dumps({"id": "d", "prompt": "x " * 600}),                       # longer than --max-model-len
        json.dumps({"id": "e", "prompt": "Hello", "top_p": 2.0}),            # out of range
        json.dumps({"id": "f", "prompt": 42}),
        json.dumps({"prompt": "No id here, so the line number is the id:"}),
    ]) + "\n")
    output = tmp_path / "out.jsonl"
    code = main(["generate", "--input", str(prompts), "--output", str(output), "--json", "--draft", "none", *FAST])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == EXIT_REQUEST_ERRORS
    records = {r["id"]: r for r in read_jsonl(output)}
    assert set(records) == {"a", "2", "c", "d", "e", "f", "7"}
    for good in ("a", "c", "7"):
        assert records[good]["output_tokens"] == 8 and records[good]["finish_reason"] == "length"
        assert "error" not in records[good]
    assert "prompts.jsonl:2" in records["2"]["error"] and "invalid JSON" in records["2"]["error"]
    assert "prompts.jsonl:4" in records["d"]["error"] and "context limit" in records["d"]["error"]
    assert "top_p" in records["e"]["error"]
    assert "'prompt'" in records["f"]["error"]
    assert summary["requests"] == 3 and summary["errors"] == 4 and summary["output_tokens"] == 24
    assert summary["tokens_per_s"] > 0
    # Vanilla verifies nothing: every token after each prefill's first is a plain decode.
    assert summary["verifies"] == 0 and summary["acceptance_mean"] is None and summary["decodes"] == 24 - 3

    # A crash mid-write leaves a torn line; the rerun drops it and redoes only what is missing.
    lines = output.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["id"] != "c"]
    output.write_text("".join(kept) + '{"id": "c", "te')
    code = main(["generate", "--input", str(prompts), "--output", str(output), "--json", "--draft", "none", *FAST])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == EXIT_OK
    assert summary["requests"] == 1 and summary["skipped_done"] == 6
    rerun = read_jsonl(output)
    assert sorted(r["id"] for r in rerun) == sorted(records)
    assert next(r for r in rerun if r["id"] == "c")["text"] == records["c"]["text"]   # same seed, same text


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["--model", "no-such-registry-name"], "no-such-registry-name"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--spec-k", "0"], "k"),
])
def test_invalid_jobs_exit_with_a_clear_message(argv, message, capsys):
    code = main(["generate", "--prompt", "hi", *FAST, *argv])
    err = capsys.readouterr().err
    assert code == EXIT_INVALID_JOB
    assert "error" in err and message in err


def test_missing_input_file(tmp_path, capsys):
    code = main(["generate", "--input", str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "o.jsonl")])
    assert code == EXIT_INVALID_JOB and "absent.jsonl" in capsys.readouterr().err
