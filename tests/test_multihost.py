"""Multi-process batch generation: processes split a JSONL batch by line and process 0 merges their parts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sparsespec_jax.cli import EXIT_INVALID_JOB, EXIT_OK, EXIT_REQUEST_ERRORS, main
from sparsespec_jax.multihost import ProcessShare, merge_part_files, part_files

REPO_ROOT = Path(__file__).resolve().parents[1]
# One new token per request: every process compiles a single step, and splitting lines is what is tested.
FAST = ["--max-batch-size", "4", "--kv-cache-tokens", "512", "--max-model-len", "256", "--max-tokens", "1",
        "--draft", "none", "--json"]
LINES = [
    {"id": "a", "prompt": "One, two, three,"},
    {"id": "b", "prompt": "The capital of France is"},
    "{not json",
    {"id": "d", "prompt": "Colors of the rainbow:", "temperature": 0.7, "seed": 3},
    {"prompt": "No id here, so the line number is the id:"},
    {"id": "f", "prompt": "Monday, Tuesday,"},
]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_line_belongs_to_exactly_one_process():
    shares = [ProcessShare(p, 3) for p in range(3)]
    assert [[s.owns(i) for s in shares].count(True) for i in range(10)] == [1] * 10
    assert [i for i in range(7) if shares[1].owns(i)] == [1, 4]
    assert shares[1].part_file(Path("/x/out.jsonl")) == Path("/x/out.jsonl.part-00001")
    with pytest.raises(ValueError, match="process_id 3"):
        ProcessShare(3, 3)


def test_merge_orders_by_input_line_keeps_one_record_per_request_and_drops_torn_lines(tmp_path):
    output = write_lines(tmp_path / "out.jsonl", [{"id": "c", "text": "kept"}])
    write_lines(tmp_path / "out.jsonl.part-00000", [{"id": "a", "text": "A"}, {"id": "c", "text": "again"},
                                                    {"id": "x", "line": 4, "error": "bad"}])
    (tmp_path / "out.jsonl.part-00001").write_text(json.dumps({"id": "b", "text": "B"}) + "\n" + '{"id": "e", "te')
    first_line = {"a": 1, "b": 2, "c": 3, "x": 4, "e": 5}
    assert merge_part_files(output, first_line) == 3
    assert [(r["id"], r.get("text")) for r in read_jsonl(output)] == [("a", "A"), ("b", "B"), ("c", "kept"),
                                                                       ("x", None)]
    assert part_files(output) == []
    assert merge_part_files(output, first_line) == 0                  # nothing left to fold in


def test_distributed_flags_need_distributed_and_a_batch(capsys):
    assert main(["generate", "--prompt", "hi", "--process-id", "1"]) == EXIT_INVALID_JOB
    assert "--process-id need(s) --distributed" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--distributed"]) == EXIT_INVALID_JOB
    assert "--input" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_resume_and_merge_what_one_process_writes(tmp_path, smollm2):
    prompts = write_lines(tmp_path / "prompts.jsonl", LINES)
    single = tmp_path / "single.jsonl"
    assert main(["generate", "--input", str(prompts), "--output", str(single), *FAST]) == EXIT_REQUEST_ERRORS
    expected = {r["id"]: r for r in read_jsonl(single)}

    # An interrupted earlier run: one request already in the output, one in a part file of a 3-process run.
    output = tmp_path / "merged.jsonl"
    write_lines(output, [{**expected["b"], "resumed": True}])
    write_lines(tmp_path / "merged.jsonl.part-00002", [{**expected["f"], "resumed": True}])

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "sparsespec_jax.cli", "generate", "--input", str(prompts), "--output",
               str(output), *FAST, "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    processes = [subprocess.Popen(command + ["--process-id", str(rank)], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        results = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    # Process 0 wrote the error record of the bad line, so it reports request errors.
    assert [p.returncode for p in processes] == [EXIT_REQUEST_ERRORS, EXIT_OK], [err[-3000:] for _, err in results]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]

    # Lines 1..6 by index modulo 2: process 0 owns a, the bad line 3 and 5; process 1 owns d (b, f resumed).
    assert [(s["process_id"], s["requests"], s["errors"]) for s in summaries] == [(0, 2, 1), (1, 1, 0)]
    merged = read_jsonl(output)
    assert [r["id"] for r in merged] == ["a", "b", "3", "d", "5", "f"]         # input order, each once
    assert [r["id"] for r in merged if r.get("resumed")] == ["b", "f"]        # not generated again
    for record in merged:
        assert {k: v for k, v in record.items() if k not in ("stats", "resumed")} == \
            {k: v for k, v in expected[record["id"]].items() if k != "stats"}
    assert part_files(output) == []
