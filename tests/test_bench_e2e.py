"""`sparsespec bench`: the smoke run writes a well-formed report and resumes one cut short; roofline and
length-integration arithmetic; a timed window refuses a batch that shrank."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import pytest

from sparsespec_jax.benchmark import e2e, report, roofline
from sparsespec_jax.benchmark.e2e import (METHODS, BenchConfig, context_prompts, integrate_over_output_length,
                                          parse_replay, read_prompts, read_report, replay_from_report,
                                          smoke_config)
from sparsespec_jax.cli import EXIT_INVALID_JOB, EXIT_OK, main
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.step_metrics import StepMetrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_run_writes_a_well_formed_report_and_resumes(tmp_path, capsys, monkeypatch):
    # One test, not several sharing a fixture: parallel workers would each run the smoke again. The first run
    # stops after the real workload's points, as a run whose device call ends would; --resume measures the
    # shaped points into the same report and leaves the real ones as they were.
    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt

    command = ["bench", "--smoke", "--out", str(tmp_path), "--name", "smoke"]
    with monkeypatch.context() as patch:
        patch.setattr(e2e, "run_shaped_point", cut_short)
        with pytest.raises(KeyboardInterrupt):
            main(command)
    first = json.loads((tmp_path / "smoke.json").read_text())
    assert [p["workload"] for p in first["points"]] == ["real"] * len(METHODS)
    capsys.readouterr()
    assert main([*command, "--resume", "--seed", "5"]) == EXIT_INVALID_JOB         # other settings: refused
    assert "seed (report 0, now 5)" in capsys.readouterr().err

    assert main([*command, "--resume"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert printed.index("## Targets") < printed.index("## Per point") < printed.index("report: ")
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["points"][:len(METHODS)] == first["points"] and result["copy_bandwidth"] == first["copy_bandwidth"]
    assert [run["points_kept"] for run in result["resumed"]] == [len(METHODS)]
    check_points(result)
    text = (tmp_path / "smoke.md").read_text()
    assert "Resumed into this report" in text
    check_summary(tmp_path, result, text)
    # A complete report resumes to itself.
    assert main([*command, "--resume"]) == EXIT_OK
    again = json.loads((tmp_path / "smoke.json").read_text())
    assert again["points"] == result["points"] and len(again["resumed"]) == 2


def check_points(result: dict) -> None:
    """Every method at every point, with the numbers that must be finite and positive."""
    assert result["failed"] == [] and result["skipped"] == []
    k = result["config"]["k"]
    for workload in ("real", "shaped"):
        points = [p for p in result["points"] if p["workload"] == workload]
        keys = {(p["batch"], p.get("context")) for p in points}
        assert len(points) == len(METHODS) * len(keys) and {p["method"] for p in points} == set(METHODS)
    assert {p["context"] for p in result["points"] if p["workload"] == "shaped"} == set(result["config"]["contexts"])
    for p in result["points"]:
        where = f"{p['workload']} {p['method']}"
        for field in ("tokens_per_s", "tokens_per_step", "host_ms", "step_ms", "attention_ms", "roofline_ms",
                      "roofline_fraction", "kv_tokens_used_mean"):
            assert positive(p[field]), f"{where}: {field} = {p[field]}"
        assert math.isfinite(p["device_ms"]) and p["device_ms"] >= 0, where
        assert p["gemm_other_ms"] == pytest.approx(p["device_ms"] - p["attention_ms"])
        assert p["bytes_per_step"]["total"] > p["bytes_per_step"]["weights"] > 0
        assert set(p["device_memory"]) == {"bytes_in_use", "peak_bytes_in_use"}
        histogram = p["acceptance_histogram"]
        assert len(histogram) == (k + 1 if p["method"] != "none" else 1) and sum(histogram) == p["verifies"]
        # n-gram's smoke proposals exist only where the tiny random model repeats a token (seeded: one verify
        # per workload); a changed smoke setup can leave it none, which this names rather than hides.
        assert (p["verifies"] > 0) == (p["method"] != "none"), f"{where}: {p['verifies']} verifies"
        assert 0 <= p["accepted_per_verify"] <= k
        assert p["attention"]["layers"] == 2 and p["attention"]["score_pass"] == (p["method"] == "pillar"
                                                                                 and p["attention"]["verify_rows"] > 0)
    real = [p for p in result["points"] if p["workload"] == "real"]
    for p in real:
        assert p["output_tokens"] == p["batch"] * result["config"]["new_tokens"]
        assert p["tokens_per_s"] >= p["tokens_per_s_e2e"] > 0
    shaped = result["workloads"]["shaped"]
    assert shaped["replayed"] and shaped["replay"]["pillar"]["distribution"] is not None
    assert not result["workloads"]["real"]["replayed"] and result["workloads"]["real"]["random_weights"]
    assert positive(result["copy_bandwidth"]["bytes_per_s"])


def check_summary(out, result: dict, text: str) -> None:
    """Integrated curves, targets, valid PNG plots and the markdown table."""
    curves = result["integrated"]
    assert {c["method"] for c in curves} == set(METHODS)
    for curve in curves:
        assert [at["output_length"] for at in curve["points"]] == list(result["config"]["output_lengths"])
        assert all(positive(at["tokens_per_s"]) for at in curve["points"])
    statuses = {t["target"].split(" (")[0]: t["status"] for t in result["targets"]}
    assert len(result["targets"]) == 5 and set(statuses.values()) <= {"PASS", "MISS", "N/A"}
    assert statuses["pillar >= 2.2x vanilla"] == "N/A"          # the smoke's tiny shape is not the target's
    assert statuses["pillar >= 1.5x vanilla"] == "N/A"          # random weights are not SmolLM2
    for name in result["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 100 and height > 100
    assert len(result["plots"]) == 4
    assert "| point | method | tok/s |" in text
    table = text.split("## Per point")[1]
    assert sum(line.startswith("| real ") or line.startswith("| shaped ") for line in table.splitlines()) == \
        len(result["points"])
    assert all(f"**{t['status']}** {t['target']}" in text for t in result["targets"])
    assert "REPLAYED" in text


def test_integration_over_output_length_by_hand():
    # f(L) = L / 1000 ms through (1000, 1) and (3000, 3), continued linearly: mean over [0, 4000] is 2.
    whole = integrate_over_output_length([3000, 1000], [3.0, 1.0], prompt_length=0, output_length=4000)
    assert whole["ms_per_token"] == pytest.approx(2.0) and whole["extrapolated"]
    assert whole["tokens_per_s"] == pytest.approx(500.0)
    # Flat 1 ms up to 1000, then rising to 3 ms at 2000: over [500, 2000] (500 * 1 + 1000 * 2) / 1500.
    kink = integrate_over_output_length([0, 1000, 2000], [1.0, 1.0, 3.0], prompt_length=500, output_length=1500)
    assert kink["ms_per_token"] == pytest.approx(2500 / 1500) and not kink["extrapolated"]
    assert integrate_over_output_length([4096], [2.5], 128, 8192)["ms_per_token"] == pytest.approx(2.5)
    # Continuing 1 ms at 1000 -> 11 ms at 2000 down to 0 would reach -9 ms: that side is held at 1 ms instead.
    steep = integrate_over_output_length([1000, 2000], [1.0, 11.0], prompt_length=0, output_length=2000)
    assert steep["ms_per_token"] == pytest.approx((1000 * 1 + 1000 * 6) / 2000) and steep["held_constant"] == ["below"]
    assert whole["held_constant"] == [] and kink["held_constant"] == []
    with pytest.raises(ValueError, match="as many"):
        integrate_over_output_length([1000, 2000], [1.0], 0, 100)
    with pytest.raises(ValueError, match="distinct"):
        integrate_over_output_length([1000, 1000], [1.0, 2.0], 0, 100)


TOY = ModelConfig(arch="llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=4, tie_word_embeddings=True, max_position_embeddings=4096)


def test_bytes_per_step_by_hand():
    # Layers: norms 2*8 twice, wq/wo 2*8*8, wk/wv 2*8*4, gate/up/down 2*8*16, + final norm 8 = 1192 params.
    assert roofline.weight_bytes(TOY, 2) == {"layers": 2384, "head": 512}
    assert roofline.kv_bytes_per_token(TOY, 2) == 32
    spec = SpecConfig(method="pillar", k=8, min_budget=16, budget_ratio=0.05)
    mixed = roofline.StepComposition(draft_rows=6, verify_rows=2, verify_tokens=9, decode_rows=0, context=1000)
    parts = roofline.bytes_per_step(TOY, 2, mixed, spec)
    # Drafts read max(16, 50) + 4.5 own slots; pillar verify rows read K once more; 6 + 2*9 tokens written.
    assert parts == {"weights": 2384 + 2 * 512, "kv_full": 2 * 1000 * 32, "kv_sparse": 6 * 54.5 * 32,
                     "kv_scores": 2 * 1000 * 16, "kv_write": 24 * 32, "total": 110640}
    vanilla = roofline.StepComposition(draft_rows=0, verify_rows=0, verify_tokens=0, decode_rows=4, context=1000)
    assert roofline.bytes_per_step(TOY, 2, vanilla, SpecConfig(method="none"))["total"] == 2896 + 128000 + 128
    assert roofline.roofline_ms(1e9, 1e12) == pytest.approx(1.0)
    assert roofline.achieved_fraction(1e9, 1e12, step_ms=4.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="bandwidth"):
        roofline.roofline_ms(1e9, 0.0)


def test_composition_of_steps_and_attention_timing():
    def step(draft, verify, decode, tokens):
        return StepMetrics(step=0, host_ms=1.0, dispatch_ms=0.5, wait_ms=1.0, step_ms=2.0, tokens=tokens,
                           prefill_rows=0, draft_rows=draft, verify_rows=verify, decode_rows=decode, emitted_tokens=1,
                           kv_tokens_used=0, kv_tokens_offloaded=0)

    composition = roofline.StepComposition.of_steps([step(7, 1, 0, 16), step(5, 3, 1, 33)], context=300)
    assert composition.as_dict() == {"draft_rows": 6.0, "verify_rows": 2.0, "verify_tokens": 9.0,
                                     "decode_rows": 0.5, "context": 300.0}
    timing = roofline.time_attention(TOY, "float32", "reference", composition,
                                     SpecConfig(method="pillar", k=8, min_budget=16), reps=1)
    assert positive(timing["ms"]) and timing["score_pass"] and timing["draft_tokens"] == 21
    assert (timing["draft_rows"], timing["verify_rows"], timing["verify_tokens"]) == (6, 2, 9)
    for only in (dict(draft_rows=3, verify_rows=0, decode_rows=0), dict(draft_rows=0, verify_rows=0, decode_rows=3)):
        alone = roofline.StepComposition(verify_tokens=0, context=200, **only)
        timing = roofline.time_attention(TOY, "bfloat16", "reference", alone, SpecConfig(method="none"), reps=1)
        assert positive(timing["ms"]) and not timing["score_pass"]


def test_targets_pass_and_miss_on_given_numbers():
    def point(workload, method, tok_s, host=0.2, fraction=0.8, **where):
        return {"workload": workload, "method": method, "tokens_per_s": tok_s, "host_ms": host,
                "roofline_fraction": fraction, "batch": 128, **where}

    result = {"workloads": {"shaped": {"shape": "qwen3-8b-shaped"},
                            "real": {"random_weights": False, "model": "smollm2-135m-instruct"}},
              "config": {"model": "smollm2-135m-instruct", "prompt_length": 128},
              "points": [point("shaped", "none", 100.0, context=4096), point("shaped", "pillar", 250.0, context=4096),
                         point("shaped", "ngram", 260.0, context=4096, host=0.7),
                         point("real", "none", 1000.0, new_tokens=256),
                         point("real", "pillar", 1400.0, new_tokens=256)],
              "integrated": [{"method": m, "batch": 128, "points": [
                  {"output_length": 8192, "tokens_per_s": v, "extrapolated": False}]}
                  for m, v in (("none", 100.0), ("pillar", 230.0))]}
    targets = {t["target"].split(" (")[0]: t for t in report.check_targets(result)}
    assert targets["pillar >= 2.2x vanilla"]["status"] == "PASS"
    assert targets["pillar >= 2.2x vanilla"]["value"] == pytest.approx(2.3)
    assert targets["pillar >= 1.5x vanilla"]["status"] == "MISS"
    above = targets["pillar above n-gram and streaming at every point"]
    assert above["status"] == "MISS" and "n-gram" in above["detail"]
    assert targets["host <= 0.5 ms/step"]["status"] == "MISS" and targets["host <= 0.5 ms/step"]["value"] == 0.7
    assert targets["vanilla >= 70% of the copy-bandwidth roofline"]["status"] == "PASS"


def test_each_method_replays_its_own_acceptance_from_a_real_report(tmp_path):
    """--replay-from pools each draft method's real-workload histograms; shaped points, vanilla and other
    methods' counts do not leak in, and a method the report lacks or a histogram of another k is named."""
    def point(workload, method, batch, histogram):
        return {"workload": workload, "method": method, "batch": batch, "context": 4096,
                "acceptance_histogram": histogram}

    path = tmp_path / "real.json"
    path.write_text(json.dumps({"points": [
        point("real", "pillar", 256, [1, 0, 3]), point("real", "pillar", 128, [0, 2, 2]),
        point("real", "streaming", 256, [2, 1, 1]), point("shaped", "pillar", 128, [50, 0, 0]),
        point("real", "none", 256, [0])]}))
    replay, sources = replay_from_report(path, ("pillar", "streaming", "none"), k=2)
    assert replay == {"pillar": (0.125, 0.25, 0.625), "streaming": (0.5, 0.25, 0.25)}
    assert "B256 L4096, B128 L4096, 8 verifies pooled, mean 1.50" in sources["pillar"]
    config = smoke_config(k=2, methods=("pillar", "streaming"), replay=replay, replay_sources=sources)
    assert config.spec("streaming", replayed=True).replay_acceptance == (0.5, 0.25, 0.25)
    assert config.replay_description("pillar")["source"].startswith("measured: real.json")
    with pytest.raises(ValueError, match="no real-workload verifies of ngram.*--replay ngram="):
        replay_from_report(path, ("pillar", "ngram"), k=2)
    with pytest.raises(ValueError, match="pillar at B256 L4096 has a histogram of 3 outcomes.*k \\+ 1 = 9"):
        replay_from_report(path, ("pillar",), k=8)
    with pytest.raises(ValueError, match="missing.json: cannot read"):
        replay_from_report(tmp_path / "missing.json", ("pillar",), k=2)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="--resume .*list.json: not a report"):
        read_report(tmp_path / "list.json", "--resume")
    with pytest.raises(ValueError, match="replay_sources: 'ngram'"):
        smoke_config(replay_sources={"ngram": "somewhere"})


def test_bench_cli_names_a_replay_report_it_cannot_use(tmp_path, capsys):
    path = tmp_path / "real.json"
    path.write_text(json.dumps({"points": [{"workload": "real", "method": "pillar", "batch": 4, "context": 96,
                                            "acceptance_histogram": [1] * 9}]}))
    assert main(["bench", "--smoke", "--replay-from", str(path), "--out", str(tmp_path)]) == EXIT_INVALID_JOB
    assert "no real-workload verifies of ngram" in capsys.readouterr().err


def test_bad_bench_configurations_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="replay.*k = 4"):
        BenchConfig(k=4)
    with pytest.raises(ValueError, match="warmup"):
        smoke_config(warmup=3)
    with pytest.raises(ValueError, match="shape"):
        smoke_config(shape="qwen9")
    with pytest.raises(ValueError, match="real_contexts.*distinct"):
        smoke_config(real_contexts=(64, 64))
    with pytest.raises(ValueError, match="draft_min_context"):
        smoke_config(draft_min_context=-1)
    assert smoke_config(draft_min_context=4096).spec("pillar", replayed=False).draft_min_context == 4096
    assert parse_replay(["0.5,0.5", "pillar=0.2,0.8"]) == {"ngram": (0.5, 0.5), "streaming": (0.5, 0.5),
                                                           "pillar": (0.2, 0.8)}
    assert main(["bench", "--smoke", "--k", "2", "--replay", "0.5,0.3"]) == EXIT_INVALID_JOB
    assert "replay_acceptance" in capsys.readouterr().err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Two plus two?"}\n\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:3: field 'prompt'"):
        read_prompts(prompts)
    prompts.write_text('{"prompt": "Two plus two?"}\n')
    assert read_prompts(prompts) == ["Two plus two?"]


def test_context_prompts_fill_each_request_with_real_text_back_to_back():
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    filled = context_prompts(prompts, 4, 6)
    assert filled == [[1, 2, 3, 4, 5, 6], [4, 5, 6, 7, 8, 9], [6, 7, 8, 9, 1, 2], [1, 2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="non-empty prompts"):
        context_prompts([[1], []], 2, 4)


def test_generated_contexts_are_the_models_own_continuation():
    """--real-context-source generated: each context is request i's prompt and the model's vanilla continuation,
    and an engine prefilled with a prefix of it samples the very tokens that followed (same seeds), so a window
    times a stretch of that generation."""
    config = smoke_config(real_context_source="generated")
    model = e2e.load_real_model(config)
    ids = e2e.chat_token_ids(model.tokenizer, ["Two plus two?", "Name a prime number above ten."], config.model)
    length = max(map(len, ids)) + 16
    contexts, generation = e2e.generated_contexts(model, ids, 3, length, config, log=lambda line: None)
    assert [len(c) for c in contexts] == [length] * 3 and generation["batch"] == 3
    for i, context in enumerate(contexts):
        assert context[:len(ids[i % 2])] == ids[i % 2]          # prompt i (reused in order), then generated text
    assert contexts[0] != contexts[2]                           # same prompt, another seed
    cut, follow = length - 6, 6
    engine, requests = e2e._real_requests(model, [c[:cut] for c in contexts], "none", config, sync=False,
                                          max_len=length, max_tokens=follow)
    e2e._generate(engine, requests, "continuation", 3 * follow, log=lambda line: None)
    assert [list(r.output_ids) for r in requests] == [c[cut:] for c in contexts]
    with pytest.raises(ValueError, match="must exceed the longest prompt"):
        e2e.generated_contexts(model, ids, 2, max(map(len, ids)), config)
    with pytest.raises(ValueError, match="real_context_source"):
        smoke_config(real_context_source="random")


@pytest.mark.slow
def test_real_context_windows_prefill_real_text_and_time_each_context(tmp_path, capsys):
    """--real-contexts: every method gets a steady-state window at every context, after a real prefill."""
    assert main(["bench", "--smoke", "--workload", "real", "--methods", "none", "pillar", "--real-contexts", "40",
                 "72", "--out", str(tmp_path), "--name", "windows"]) == EXIT_OK
    result = json.loads((tmp_path / "windows.json").read_text())
    assert result["failed"] == [] and result["workloads"]["real"]["contexts"] == [40, 72]
    points = {(p["method"], p["context"]): p for p in result["points"]}
    assert set(points) == {(m, c) for m in ("none", "pillar") for c in (40, 72)}
    for (method, context), p in points.items():
        assert p["workload"] == "real" and p["steps_timed"] > 0 and positive(p["tokens_per_s"])
        # The window starts after the prefill: its context lies between L and L plus the window's growth.
        assert context < p["throughput_composition"]["context"] < context + 2 * result["config"]["steps"] + 9
        assert p["device_window"]["steps"] > 0
    assert points[("pillar", 72)]["verifies"] > 0 and points[("none", 72)]["verifies"] == 0
    text = (tmp_path / "windows.md").read_text()
    assert "steady-state windows" in text and "| real B1 L40 |" in text and "| real B1 L72 |" in text


def test_a_window_whose_batch_shrinks_is_refused():
    """A timed window must measure the batch it names: requests that stop inside it fail the point."""
    config = smoke_config(warmup=10, steps=2)
    cfg = e2e.SHAPE_CHOICES[config.shape]
    engine = e2e._placed_engine(cfg, random_params(cfg, seed=0, dtype=jnp.bfloat16), 2, 96, "none", config,
                                sync=False)
    engine.scheduler.finish(engine.scheduler.running[0])      # one of the two stops before the window ends
    with pytest.raises(RuntimeError, match="1 requests stopped during the window"):
        e2e._window_point(engine, "shaped", "none", 2, 96, config)


def test_burst_windows_are_accounted_per_engine_step(tmp_path):
    """With decode bursts an iteration runs several engine steps: a window times whole steps, and its per-step
    figures agree with its throughput (tokens/s = tokens per step / step time) as they do without bursts."""
    assert main(["bench", "--smoke", "--workload", "shaped", "--methods", "none", "pillar", "--burst-steps", "4",
                 "--out", str(tmp_path), "--name", "bursts"]) == EXIT_OK
    result = json.loads((tmp_path / "bursts.json").read_text())
    assert result["failed"] == [] and result["config"]["burst_steps"] == 4
    for p in result["points"]:
        assert 0 < p["iterations_timed"] < p["steps_timed"]          # bursts ran (steps without compiles)
        assert p["tokens_per_s"] == pytest.approx(p["tokens_per_step"] / p["step_ms"] * 1e3, rel=1e-6)
        assert p["host_ms"] < p["step_ms"] and 0 < p["roofline_fraction"] < 10
    assert "4 decode steps per device call" in (tmp_path / "bursts.md").read_text()


def test_h200_script_drops_its_contexts_when_asked_for_whole_generations():
    spec = importlib.util.spec_from_file_location("bench_e2e_script", Path(__file__).parents[1] / "bench" / "e2e.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert "--real-contexts" in script.configuration(["--workload", "real"])
    whole = script.configuration(["--workload", "real", "--new-tokens=4096"])
    assert "--real-contexts" not in whole and "7680" not in whole
    assert whole[whole.index("--real-batch") + 4:whole.index("--real-batch") + 6] == ["--real-dtype", "bfloat16"]
    assert "--real-contexts" in script.configuration(["--new-tokens", "64", "--real-contexts", "512"])
    assert script.configuration(["--smoke"]) == script.OUTPUT
