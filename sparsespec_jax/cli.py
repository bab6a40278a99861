"""`sparsespec` command line: generate (one prompt or a resumable JSONL batch), convert checkpoints, bench
(draft methods side by side) and plot-steps (tokens per step of profiled runs)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_REQUEST_ERRORS, EXIT_INVALID_JOB = 0, 1, 2
SAMPLING_FIELDS = {"temperature": (int, float), "top_p": (int, float), "top_k": int, "seed": int,
                   "max_tokens": int, "stop": list, "ignore_eos": bool}


class JobError(Exception):
    """The whole job is invalid (bad flag, unreadable file): nothing can run."""


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="registry name, .gguf file, HF or converted directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--kv-cache-tokens", type=int, default=16384)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--engine-seed", type=int, default=0, help="seeds requests that give no seed")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--prefill-chunk-size", type=int, default=128)
    parser.add_argument("--draft", default="pillar", choices=["pillar", "streaming", "ngram", "none"],
                        help="draft method (none = vanilla decoding)")
    parser.add_argument("--spec-k", type=int, default=8, help="drafts verified per round")
    parser.add_argument("--budget-ratio", type=float, default=0.05, help="PillarAttn budget, fraction of context")
    parser.add_argument("--min-budget", type=int, default=128, help="PillarAttn budget floor in tokens")
    parser.add_argument("--recent-tokens", type=int, default=0,
                        help="PillarAttn: always keep this many newest tokens in a draft set (0: the paper's sets)")
    parser.add_argument("--draft-min-context", type=int, default=0,
                        help="decode plainly until a request holds this many tokens of context, then draft "
                             "(speculation pays at long contexts; 0: always draft)")
    parser.add_argument("--scheduler", default="unified", choices=["unified", "phased"],
                        help="unified: staggered draft/verify rows in every step; phased: all verify together")
    parser.add_argument("--sync", action="store_true",
                        help="read every step's results before planning the next (no running ahead)")
    parser.add_argument("--host-kv-tokens", type=int, default=65536,
                        help="host memory pool for offloaded KV, in tokens (0: preempt and recompute instead)")
    parser.add_argument("--burst-steps", type=int, default=None,
                        help="decode steps per device call once every request is decoding (planned on the device: "
                             "less host time per step; pillar, streaming and none). Default: 8 on GPUs, 1 on other "
                             "platforms, with --sync, --scheduler phased and for n-gram")
    parser.add_argument("--profile", type=Path, default=None, help="write per-step metrics (JSONL) here")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel: devices each engine's heads split over")
    parser.add_argument("--unroll-layers", action="store_true",
                        help="trace every layer into the step instead of a loop over stacked weights (about 5x the "
                             "compile time per batch shape)")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsespec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate completions")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a single prompt; the completion is printed")
    source.add_argument("--input", type=Path, help="JSONL file, one {\"prompt\": ..., \"id\"?: ...} per line")
    gen.add_argument("--output", type=Path, help="JSONL results (required with --input; rerun to resume)")
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    multi = gen.add_argument_group("multi-process batch (data parallel over --input lines)")
    multi.add_argument("--distributed", action="store_true",
                       help="initialise jax.distributed; this process serves its share of the lines")
    multi.add_argument("--coordinator", help="host:port of process 0 (detected on Cloud TPU, SLURM, Open MPI)")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    add_engine_flags(gen)
    add_sampling_flags(gen)

    conv = commands.add_parser("convert", help="convert a checkpoint to the fast-loading orbax format")
    conv.add_argument("src", help="registry name, .gguf file or HF directory")
    conv.add_argument("dst", type=Path, help="output directory")

    bench = commands.add_parser("bench", help="throughput of vanilla, n-gram, streaming and pillar side by side",
                                description="Every draft method on the same engine configuration and requests, in "
                                            "one run; writes <out>/<name>.json, .md and PNG plots. Unset flags "
                                            "take the defaults of sparsespec_jax.benchmark.e2e.BenchConfig (or of "
                                            "the smoke run with --smoke).")
    add_bench_flags(bench)

    plot = commands.add_parser("plot-steps", help="plot tokens fed per step from --profile JSONL files (PNG)")
    plot.add_argument("profiles", nargs="+", type=Path, help="per-step metrics written by generate --profile")
    plot.add_argument("--labels", nargs="+", default=None, help="one per profile (default: the file names)")
    plot.add_argument("--first-steps", type=int, default=None, help="plot only each profile's first N steps")
    plot.add_argument("--title", default="Tokens fed per step")
    plot.add_argument("--out", type=Path, required=True, help="PNG to write")
    return parser


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of `sparsespec bench` (and bench/e2e.py); None = the BenchConfig default."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny random models, every method, both workloads: checks the harness (about a "
                             "minute on a 2-core CPU)")
    parser.add_argument("--workload", nargs="+", choices=["real", "shaped"], default=None, dest="workloads",
                        help="workloads to run, in this order")
    parser.add_argument("--methods", nargs="+", choices=["none", "ngram", "streaming", "pillar"], default=None)
    parser.add_argument("--k", "--spec-k", type=int, default=None, dest="k", help="drafts per verify")
    parser.add_argument("--budget-ratio", type=float, default=None)
    parser.add_argument("--min-budget", type=int, default=None)
    parser.add_argument("--recent-tokens", type=int, default=None, help="pillar: newest tokens always in a set")
    parser.add_argument("--draft-min-context", type=int, default=None,
                        help="draft methods decode plainly below this context (whole real generations)")
    parser.add_argument("--burst-steps", type=int, default=None,
                        help="decode steps per device call of the throughput engines (sync windows and n-gram: "
                             "1; default: the engine's, 8 on GPUs, else 1)")
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--unroll-layers", action="store_true", default=None,
                        help="trace every layer into the step instead of a loop (about 5x the compile time)")
    parser.add_argument("--min-batch-bucket", type=int, default=None,
                        help="fewest rows a compiled step group has: fewer compiled shapes, more padded rows")
    parser.add_argument("--row-buckets-per-doubling", type=int, default=None,
                        help="row bucket sizes per power of two in groups of over 64 tokens (default 1: powers "
                             "of two only; 4: less padding, about twice the compiled shapes)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    real = parser.add_argument_group("real workload (a checkpoint generating for real)")
    real.add_argument("--model", default=None, help="registry name, .gguf file, HF or converted directory")
    real.add_argument("--real-random-shape", default=None,
                      help="random weights of this shape (with the model's tokenizer) instead of the checkpoint's")
    real.add_argument("--prompts", default=None, help="JSONL file, one {\"prompt\": ...} per line")
    real.add_argument("--real-batch", nargs="+", type=int, default=None)
    real.add_argument("--new-tokens", type=int, default=None)
    real.add_argument("--real-dtype", choices=["float32", "bfloat16"], default=None)
    real.add_argument("--sync-tokens", type=int, default=None, help="tokens per request of the device-time window")
    real.add_argument("--real-contexts", nargs="+", type=int, default=None,
                      help="steady-state windows with each context prefilled to these lengths, instead of whole "
                           "generations (long outputs at large batches within one run)")
    real.add_argument("--real-context-source", choices=["prompts", "generated"], default=None,
                      help="what fills those contexts: prompts back to back (default), or the model's own "
                           "continuation of each prompt, generated once by vanilla decoding")
    shaped = parser.add_argument_group("shaped workload (random weights placed at a context, replayed acceptance)")
    shaped.add_argument("--shape", default=None,
                        help="qwen3-1.7b-shaped, qwen3-8b-shaped, smollm2-shaped or tiny-shaped")
    shaped.add_argument("--shaped-batch", nargs="+", type=int, default=None)
    shaped.add_argument("--contexts", nargs="+", type=int, default=None)
    shaped.add_argument("--warmup", type=int, default=None)
    shaped.add_argument("--steps", type=int, default=None, help="timed steps per point")
    shaped.add_argument("--sync-steps", type=int, default=None, help="steps of the device-time window")
    shaped.add_argument("--replay", nargs="+", default=None,
                        help="accepted-draft distribution p0,...,pk for every method, or method=p0,...,pk")
    shaped.add_argument("--replay-from", type=Path, default=None,
                        help="a real-workload report JSON: replay each draft method's acceptance measured there "
                             "(--replay still sets a method's distribution over it)")
    shaped.add_argument("--prompt-length", type=int, default=None, help="prompt of the length integration")
    shaped.add_argument("--output-lengths", nargs="+", type=int, default=None)
    parser.add_argument("--copy-mib", type=int, default=None, help="array size of the copy-bandwidth measurement")
    parser.add_argument("--attention-reps", type=int, default=None)
    parser.add_argument("--time-budget-s", type=float, default=None, help="start no new point after this")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="report directory")
    parser.add_argument("--name", default="e2e", help="report file stem")
    parser.add_argument("--resume", action="store_true",
                        help="continue <out>/<name>.json (same device and settings; workloads, methods and the "
                             "time budget may differ): its points stay, the missing, skipped and failed ones run")


def sampling_from_args(args, overrides: dict[str, Any] | None = None):
    from sparsespec_jax.sampling import SamplingParams

    fields = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                  max_tokens=args.max_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    fields.update(overrides or {})
    if isinstance(fields["stop"], list):
        fields["stop"] = tuple(fields["stop"])
    return SamplingParams(**fields)


def parse_request_line(line: str, number: int) -> tuple[str, str, dict[str, Any]]:
    """(id, prompt, sampling overrides) of one JSONL line; ValueError names the field at fault."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("field 'prompt' must be a non-empty string")
    request_id = record.get("id", number)
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise ValueError("field 'id' must be a string or an integer")
    overrides = {}
    for name, kind in SAMPLING_FIELDS.items():
        if name in record:
            value = record[name]
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise ValueError(f"field {name!r} has the wrong type ({type(value).__name__})")
            overrides[name] = value
    unknown = sorted(set(record) - set(SAMPLING_FIELDS) - {"prompt", "id"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    return str(request_id), prompt, overrides


def read_done_ids(output: Path) -> set[str]:
    """Ids already written to an earlier run's output; a torn last line (a crash mid-write) is dropped."""
    if not output.exists():
        return set()
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    done, kept = set(), []
    for line in lines:
        try:
            done.add(str(json.loads(line)["id"]))
            kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if len(kept) != len(lines) or (lines and not lines[-1].endswith("\n")):
        output.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept), encoding="utf-8")
    return done


def make_llm(args):
    from sparsespec_jax.llm import LLM
    from sparsespec_jax.loading import DEFAULT_MODEL
    from sparsespec_jax.spec.config import SpecConfig

    spec = SpecConfig(method=args.draft, k=args.spec_k, budget_ratio=args.budget_ratio, min_budget=args.min_budget,
                      recent_tokens=args.recent_tokens, draft_min_context=args.draft_min_context)
    return LLM(args.model or DEFAULT_MODEL, dtype=args.dtype, max_batch_size=args.max_batch_size,
               kv_cache_tokens=args.kv_cache_tokens, page_size=args.page_size, max_model_len=args.max_model_len,
               max_num_batched_tokens=args.max_num_batched_tokens, prefill_chunk_size=args.prefill_chunk_size,
               attention_backend=args.attention_backend, seed=args.engine_seed, tensor_parallel=args.tp, spec=spec,
               scheduler=args.scheduler, sync_host=args.sync, host_kv_tokens=args.host_kv_tokens,
               unroll_layers=args.unroll_layers, burst_steps=args.burst_steps)


def summarize(outputs, wall_s: float, llm, errors: int) -> dict[str, Any]:
    output_tokens = sum(len(o.token_ids) for o in outputs)
    drafted = sum(o.stats.drafted_tokens for o in outputs)
    accepted = sum(o.stats.accepted_tokens for o in outputs)
    verifies = sum(o.stats.verifies for o in outputs)
    decodes = sum(o.stats.decodes for o in outputs)
    return {
        "model": llm.model_name, "draft": llm.engine.spec.method, "requests": len(outputs), "errors": errors,
        "output_tokens": output_tokens, "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "wall_s": round(wall_s, 4), "tokens_per_s": round(output_tokens / wall_s, 2) if wall_s > 0 else None,
        "load_s": round(llm.load_seconds, 3), "steps": llm.engine.num_steps,
        "preemptions": llm.engine.scheduler.num_preemptions, "kv_offloads": llm.engine.scheduler.num_offloads,
        "kv_restores": llm.engine.num_restores, "peak_host_kv_tokens": llm.engine.host_kv.peak_tokens,
        "drafted_tokens": drafted, "accepted_tokens": accepted, "verifies": verifies, "decodes": decodes,
        "acceptance_mean": round(accepted / verifies, 4) if verifies else None,
        "tokens_per_step": round(output_tokens / llm.engine.num_steps, 3) if llm.engine.num_steps else None,
        "step_metrics": llm.engine.metrics.summary(),
    }


def write_profile(args, llm) -> None:
    if args.profile is not None:
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        llm.engine.metrics.write_jsonl(args.profile)


def format_summary(summary: dict[str, Any], finish_reason: str | None = None) -> str:
    parts = [f"{summary['requests']} request(s)", f"{summary['output_tokens']} tokens in {summary['wall_s']} s",
             f"{summary['tokens_per_s']} tok/s", f"draft={summary['draft']}"]
    if summary["acceptance_mean"] is not None:
        parts.append(f"acceptance_mean={summary['acceptance_mean']} over {summary['verifies']} verifies")
    parts.append(f"tokens/step={summary['tokens_per_step']}")
    steps = summary["step_metrics"]
    if steps:
        parts.append(f"host {steps['mean_host_ms']} ms/step (dispatch {steps['mean_dispatch_ms']}), waiting "
                     f"{steps['mean_wait_ms']} ms/step")
    if summary["preemptions"] or summary["kv_offloads"]:
        parts.append(f"kv_offloads={summary['kv_offloads']} preemptions={summary['preemptions']}")
    if finish_reason:
        parts.append(f"finish_reason={finish_reason}")
    if summary["errors"]:
        parts.append(f"{summary['errors']} error(s)")
    if summary.get("skipped_done"):
        parts.append(f"{summary['skipped_done']} already done")
    parts.append(f"load {summary['load_s']} s")
    return "[" + ", ".join(parts) + "]"


def run_single(args) -> int:
    llm = make_llm(args)
    params = sampling_from_args(args)
    started = time.perf_counter()
    [output] = llm.generate([args.prompt], params, chat=args.chat)
    summary = summarize([output], time.perf_counter() - started, llm, 0)
    write_profile(args, llm)
    if args.json:
        print(json.dumps({**summary, "text": output.text, "finish_reason": output.finish_reason}))
    else:
        print(output.text)
        print(format_summary(summary, output.finish_reason))
    return EXIT_OK


def run_batch(args) -> int:
    from sparsespec_jax.multihost import barrier, join_processes, merge_part_files

    if args.output is None:
        raise JobError("--output is required with --input")
    if not args.input.is_file():
        raise JobError(f"--input: {args.input} is not a readable file")
    lines = args.input.read_text(encoding="utf-8").splitlines()
    first_line = {}
    for number, line in enumerate(lines, start=1):
        if line.strip():
            first_line.setdefault(_best_id(line, number), number)
    share = None
    if args.distributed:
        try:
            share = join_processes(args.coordinator, args.num_processes, args.process_id)
        except ValueError as err:
            raise JobError(f"--distributed: {err} (outside Cloud TPU, SLURM and Open MPI give --coordinator, "
                           "--num-processes and --process-id)") from err
        if share.process_id == 0:
            read_done_ids(args.output)                       # drops a torn last line before anyone reads
            merge_part_files(args.output, first_line)        # what an interrupted run left behind
        barrier("sparsespec generate: output ready")
    done = read_done_ids(args.output)
    jobs, error_records, seen = [], [], set(done)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        owned = share is None or share.owns(number - 1)
        try:
            request_id, prompt, overrides = parse_request_line(line, number)
            if request_id in seen:
                if request_id in done:
                    continue
                raise ValueError(f"duplicate id {request_id!r}")
            seen.add(request_id)
            if owned:
                jobs.append((request_id, prompt, sampling_from_args(args, overrides), number))
        except ValueError as err:
            request_id = _best_id(line, number)
            if owned and request_id not in done:
                error_records.append({"id": request_id, "line": number, "error": f"{args.input}:{number}: {err}"})

    llm = make_llm(args)
    valid = []
    for request_id, prompt, params, number in jobs:
        try:
            llm.engine.validate(llm.encode_prompt(prompt, args.chat), params, request_id)
            valid.append((request_id, prompt, params))
        except ValueError as err:
            error_records.append({"id": request_id, "line": number, "error": f"{args.input}:{number}: {err}"})

    args.output.parent.mkdir(parents=True, exist_ok=True)
    results = args.output if share is None else share.part_file(args.output)
    with results.open("a", encoding="utf-8") as sink:
        for record in error_records:
            sink.write(json.dumps(record) + "\n")
        sink.flush()

        def write(output) -> None:
            record = {"id": output.request_id, "prompt": output.prompt, "text": output.text,
                      "finish_reason": output.finish_reason, "prompt_tokens": len(output.prompt_token_ids),
                      "output_tokens": len(output.token_ids), "stats": output.stats.as_dict()}
            sink.write(json.dumps(record) + "\n")
            sink.flush()

        started = time.perf_counter()
        outputs = llm.generate([p for _, p, _ in valid], [s for _, _, s in valid], chat=args.chat,
                               request_ids=[i for i, _, _ in valid], use_tqdm=True, on_output=write)
    summary = summarize(outputs, time.perf_counter() - started, llm, len(error_records))
    write_profile(args, llm)
    summary["skipped_done"] = len(done)
    if share is not None:
        barrier("sparsespec generate: parts written")
        if share.process_id == 0:
            merge_part_files(args.output, first_line)
        summary.update(process_id=share.process_id, num_processes=share.num_processes)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary), file=sys.stderr)
    return EXIT_REQUEST_ERRORS if error_records else EXIT_OK


def _best_id(line: str, number: int) -> str:
    try:
        value = json.loads(line).get("id", number)
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else str(number)
    except (json.JSONDecodeError, AttributeError):
        return str(number)


def run_convert(args) -> int:
    from sparsespec_jax.loading import convert_checkpoint

    started = time.perf_counter()
    path = convert_checkpoint(args.src, args.dst)
    print(f"converted {args.src} -> {path} in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


BENCH_FIELDS = ("workloads", "methods", "k", "budget_ratio", "min_budget", "recent_tokens", "draft_min_context",
                "burst_steps", "attention_backend",
                "unroll_layers", "min_batch_bucket", "row_buckets_per_doubling", "temperature", "seed",
                "model", "real_random_shape", "prompts", "real_batch", "new_tokens", "real_dtype", "sync_tokens",
                "real_contexts", "real_context_source",
                "shape", "shaped_batch", "contexts", "warmup", "steps", "sync_steps", "prompt_length",
                "output_lengths", "copy_mib", "attention_reps", "time_budget_s")


def run_bench(args) -> int:
    """Run the side-by-side benchmark, write its report, print the markdown last."""
    from sparsespec_jax.benchmark.e2e import (BenchConfig, parse_replay, read_report, replay_from_report,
                                              resume_result, run_benchmark, smoke_config)
    from sparsespec_jax.benchmark.report import write_report
    from sparsespec_jax.xla_flags import quick_compiles

    fields = {name: getattr(args, name) for name in BENCH_FIELDS if getattr(args, name) is not None}
    fields.update({name: tuple(value) for name, value in fields.items() if isinstance(value, list)})
    if args.replay is not None:
        fields["replay"] = parse_replay(args.replay)
    config = smoke_config(**fields) if args.smoke else BenchConfig(**fields)
    if args.replay_from is not None:
        measured, sources = replay_from_report(args.replay_from, config.methods, config.k)
        given = fields.get("replay", {})
        config = dataclasses.replace(config, replay={**measured, **given},
                                     replay_sources={m: s for m, s in sources.items() if m not in given})
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    flags = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}

    def save(result: dict, plots: bool = False) -> dict:
        return write_report({**result, "args": flags}, args.out, args.name, plots=plots)

    resume = None
    if args.resume:
        path = args.out / f"{args.name}.json"
        if path.is_file():
            resume = resume_result(read_report(path, "--resume"), config, command, str(path))
        else:
            print(f"--resume: no report at {path} yet, starting one", file=sys.stderr)

    # The smoke run's tiny models compile for longer than they run.
    with quick_compiles() if args.smoke else contextlib.nullcontext():
        result = run_benchmark(config, command=command, log=lambda line: print(line, file=sys.stderr, flush=True),
                               on_point=save, resume=resume)
    paths = save(result, plots=True)
    print(paths["markdown"].read_text())
    print(f"report: {', '.join(str(path) for path in paths.values())}")
    if result["failed"]:
        print(f"sparsespec bench: {len(result['failed'])} point(s) failed (listed in the report)", file=sys.stderr)
        return EXIT_REQUEST_ERRORS
    return EXIT_OK


def enable_compilation_cache() -> None:
    """Reuse compiled steps across runs (seconds per shape on small machines); JAX_COMPILATION_CACHE_DIR wins."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir",
                          str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsespec-jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def check_distributed_flags(args) -> None:
    given = [flag for flag, value in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                                      ("--process-id", args.process_id)) if value is not None]
    if given and not args.distributed:
        raise JobError(f"{', '.join(given)} need(s) --distributed")
    if args.distributed and args.input is None:
        raise JobError("--distributed splits a batch: give --input and --output")


def run_plot_steps(args) -> int:
    """Tokens fed per step of one or more profiled runs, one line each (unified vs phased, for instance)."""
    from sparsespec_jax.benchmark.step_plot import plot_tokens_per_step, read_profile, tokens_series

    labels = args.labels or [path.stem for path in args.profiles]
    if len(labels) != len(args.profiles):
        raise JobError(f"--labels: {len(labels)} given for {len(args.profiles)} profiles")
    if len(set(labels)) != len(labels):
        raise JobError(f"--labels: must be distinct, got {labels}")
    if args.first_steps is not None and args.first_steps < 1:
        raise JobError(f"--first-steps: must be >= 1, got {args.first_steps}")
    series = {label: tokens_series(read_profile(path))[:args.first_steps]
              for label, path in zip(labels, args.profiles)}
    print(plot_tokens_per_step(series, args.out, args.title))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    try:
        if args.command == "convert":
            return run_convert(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command == "plot-steps":
            return run_plot_steps(args)
        check_distributed_flags(args)
        return run_batch(args) if args.input is not None else run_single(args)
    except (JobError, ValueError, FileNotFoundError) as err:
        print(f"sparsespec: error: {err}", file=sys.stderr)
        return EXIT_INVALID_JOB


if __name__ == "__main__":
    sys.exit(main())
