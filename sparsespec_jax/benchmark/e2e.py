"""End-to-end throughput of the draft methods side by side in one run: the measurement behind the project's
speed claim (`sparsespec bench`, bench/e2e.py).

Every method (none = vanilla decoding, ngram, streaming, pillar) runs on the same engine configuration and the
same requests, one after the other in one process. Two workloads:

- real: a checkpoint (default the embedded SmolLM2) generates `new_tokens` per chat-templated prompt (a JSONL
  file of {"prompt": ...} lines, reused in order when the batch is larger than the file), at `temperature`
  with per-request seeds, EOS ignored. Output tokens/s over engine time (time spent inside Engine.step).
  Steps whose batch shape compiled (StepMetrics.compiled): their count and seconds are reported, the steady
  rate counts each of them at the median step time, the end-to-end rate as they were. With `real_contexts`,
  steady-state windows replace whole generations: each request's context is filled to L tokens by prefilling
  chat-templated prompts back to back (real text, prefilled for real), then `warmup` and `steps` steps are
  timed with real acceptance, as for the shaped workload. Long outputs at large batches then fit a device call.
  With `real_context_source="generated"` the contexts are the model's own continuations instead: one vanilla
  generation from request i's prompt (seed seed + i, EOS ignored) to the largest context, cut to each L, so
  a window continues the model's own reasoning as a whole generation does at that length.
- shaped: random bf16 weights of a paper-scale shape; the batch is placed at context L with random KV (no
  prefill), `warmup` steps run, then `steps` steps are timed (compile steps left out). Random weights accept
  nothing meaningful, so verify outcomes are REPLAYED from a distribution over 0..k accepted drafts
  (SpecConfig.replay_acceptance), capped by the drafts a row really has. Several contexts give tokens/s at
  each, and the per-token time is integrated over an output's length (integrate_over_output_length).

Per point, beside the throughput window: device ms/step from a short window of a second engine in sync mode
(the host blocks on each step right after dispatching it, so that wait is the step's device time), attention
ms/step from the attention dispatches alone at that window's composition (roofline.time_attention), GEMM/other
= device - attention, and the bytes of a step against the copy bandwidth measured at the start of the run.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsespec_jax.attention import resolve_backend
from sparsespec_jax.benchmark import roofline
from sparsespec_jax.benchmark.jsonl import read_jsonl
from sparsespec_jax.benchmark.shapes import SHAPES, placeholder_tokenizer
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.benchmark.timed_window import acceptance_summary, compile_split, per_step, time_window
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.decode_burst import auto_burst_steps
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.loading import DEFAULT_MODEL, load_model
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

METHODS = ("none", "ngram", "streaming", "pillar")
WORKLOADS = ("real", "shaped")
CONTEXT_SOURCES = ("prompts", "generated")   # real contexts: prompts back to back, or the model's own continuation
PAGE_SIZE = 16
PREFILL_CHUNK = 256           # real workload: longest prompt chunk (the committed reasoning prompts fit in one)
PREFILL_TOKENS = 2048         # real workload: token budget of a step, at least (prefill steps)
FILL_CHUNK = 2048              # real contexts: longest prompt chunk while filling
FILL_TOKENS = 16384           # real contexts: tokens prefilled per fill step (few steps keep the contexts even)
PROGRESS_S = 30.0             # real workload: seconds between progress lines of a running generation
# Probabilities of accepting 0..8 drafts: the distribution bench/systems_ablation.py replays, noted there as SmolLM2
# pillar, k = 8, T = 0.6. Its mean is 5.75 accepted drafts per verify; bench/results/acceptance_h200.json measured
# 5.04 for that setting (2048-token outputs), so replaying it flatters every draft method a little.
DEFAULT_REPLAY = (0.08, 0.05, 0.05, 0.05, 0.06, 0.07, 0.08, 0.10, 0.46)
DEFAULT_REPLAY_SOURCE = ("bench/systems_ablation.py DEFAULT_REPLAY, noted as SmolLM2-135M-Instruct pillar k=8 T=0.6; "
                         "mean 5.75 accepted (acceptance_h200.json measured 5.04)")
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "bench" / "data" / "reasoning_prompts.jsonl"
TINY = ModelConfig(arch="qwen3", vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True,
                   max_position_embeddings=8192)
SHAPE_CHOICES = {**SHAPES, "tiny-shaped": TINY}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run measures; defaults are a modest accelerator run (bench/e2e.py has the H200
    configuration, smoke_config() the CPU smoke run)."""

    workloads: tuple[str, ...] = WORKLOADS           # run in this order
    methods: tuple[str, ...] = METHODS
    k: int = 8
    budget_ratio: float = 0.05
    min_budget: int = 128
    recent_tokens: int = 0                           # SpecConfig.recent_tokens of pillar
    draft_min_context: int = 0                       # SpecConfig.draft_min_context of the draft methods
    burst_steps: int | None = None                   # EngineConfig.burst_steps of the throughput engines
    attention_backend: str = "auto"
    unroll_layers: bool = False                      # EngineConfig.unroll_layers of every engine
    min_batch_bucket: int = 8                        # EngineConfig.min_batch_bucket: fewer compiles vs padding
    row_buckets_per_doubling: int = 1                # EngineConfig.row_buckets_per_doubling: the same trade
    temperature: float = 0.6
    seed: int = 0
    # real workload
    model: str = DEFAULT_MODEL                       # registry name or checkpoint path
    real_random_shape: str | None = None             # random weights of this shape (the checkpoint's vocabulary)
    prompts: str = str(DEFAULT_PROMPTS)
    real_batch: tuple[int, ...] = (64,)
    new_tokens: int = 256
    real_dtype: str = "float32"
    sync_tokens: int = 32                            # tokens per request of the real workload's sync window
    real_contexts: tuple[int, ...] = ()              # steady-state windows at these contexts, not generations
    real_context_source: str = "prompts"             # CONTEXT_SOURCES: what fills those contexts
    # shaped workload
    shape: str = "qwen3-8b-shaped"
    shaped_batch: tuple[int, ...] = (128,)
    contexts: tuple[int, ...] = (2048, 4096)
    warmup: int = 20
    steps: int = 40
    sync_steps: int = 8
    replay: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)   # method -> distribution
    replay_sources: Mapping[str, str] = dataclasses.field(default_factory=dict)  # method -> where `replay` came from
    prompt_length: int = 128                         # length integration: the prompt the outputs start from
    output_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    # roofline and attention timing
    copy_mib: int = 1024
    attention_reps: int = 5
    time_budget_s: float | None = None               # no new point starts after this many seconds

    def __post_init__(self):
        _check_choices("workloads", self.workloads, WORKLOADS)
        _check_choices("methods", self.methods, METHODS)
        for name in ("k", "min_budget", "new_tokens", "sync_tokens", "steps", "sync_steps", "prompt_length",
                     "copy_mib", "attention_reps", "min_batch_bucket", "row_buckets_per_doubling"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"bench {name}: must be a positive integer, got {value!r}")
        for name in ("real_batch", "shaped_batch", "contexts", "output_lengths"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise ValueError(f"bench {name}: must be a non-empty list of positive integers, got {values!r}")
        if len(set(self.contexts)) != len(self.contexts):
            raise ValueError(f"bench contexts: must be distinct, got {self.contexts!r}")
        if (len(set(self.real_contexts)) != len(self.real_contexts)
                or any(not isinstance(v, int) or isinstance(v, bool) or v < 2 for v in self.real_contexts)):
            raise ValueError(f"bench real_contexts: must be distinct integers >= 2, got {self.real_contexts!r}")
        if self.warmup < self.k + 2:
            raise ValueError(f"bench warmup: must be >= k + 2 = {self.k + 2} steps so every request leaves its "
                             f"cold-start draft round before timing, got {self.warmup}")
        if self.real_context_source not in CONTEXT_SOURCES:
            raise ValueError(f"bench real_context_source: must be one of {CONTEXT_SOURCES}, "
                             f"got {self.real_context_source!r}")
        if self.shape not in SHAPE_CHOICES:
            raise ValueError(f"bench shape: must be one of {tuple(SHAPE_CHOICES)}, got {self.shape!r}")
        if self.real_random_shape is not None and self.real_random_shape not in SHAPE_CHOICES:
            raise ValueError(f"bench real_random_shape: must be one of {tuple(SHAPE_CHOICES)}, "
                             f"got {self.real_random_shape!r}")
        if self.real_dtype not in DTYPES:
            raise ValueError(f"bench real_dtype: must be one of {tuple(DTYPES)}, got {self.real_dtype!r}")
        if not self.temperature >= 0:
            raise ValueError(f"bench temperature: must be >= 0, got {self.temperature!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"bench time_budget_s: must be > 0, got {self.time_budget_s!r}")
        for method in self.replay:
            if method not in METHODS or method == "none":
                raise ValueError(f"bench replay: {method!r} is not a draft method ({METHODS[1:]})")
        for method in self.replay_sources:
            if method not in self.replay:
                raise ValueError(f"bench replay_sources: {method!r} has a source but no replayed distribution")
        for method in self.methods:
            self.spec(method, replayed="shaped" in self.workloads)     # every spec must be valid now, not mid-run

    def engine_burst_steps(self, method: str, sync: bool) -> int:
        """EngineConfig.burst_steps of an engine: 1 for sync-mode windows (device time per step) and n-gram
        (its drafts come from the host), burst_steps otherwise (unset: the engine's default on this device)."""
        if sync or method == "ngram":
            return 1
        return self.burst_steps or auto_burst_steps(jax.local_devices()[0].platform, method, False, "unified")

    def spec(self, method: str, replayed: bool) -> SpecConfig:
        """The method's SpecConfig; `replayed` (shaped workload) adds its acceptance distribution."""
        replay = None
        if replayed and method != "none":
            replay = self.replay.get(method)
            if replay is None:
                if self.k != len(DEFAULT_REPLAY) - 1:
                    raise ValueError(f"bench replay: the default distribution is for k = {len(DEFAULT_REPLAY) - 1}; "
                                     f"give one of k + 1 = {self.k + 1} probabilities for {method} (k = {self.k})")
                replay = DEFAULT_REPLAY
        return SpecConfig(method=method, k=self.k, budget_ratio=self.budget_ratio, min_budget=self.min_budget,
                          recent_tokens=self.recent_tokens, draft_min_context=self.draft_min_context,
                          replay_acceptance=replay)

    def replay_description(self, method: str) -> dict:
        if method == "none":
            return {"distribution": None, "source": "vanilla decoding verifies nothing"}
        if method in self.replay:
            return {"distribution": list(self.replay[method]),
                    "source": self.replay_sources.get(method, "given (--replay)")}
        return {"distribution": list(DEFAULT_REPLAY), "source": DEFAULT_REPLAY_SOURCE}

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["replay"] = {method: list(dist) for method, dist in self.replay.items()}
        out["replay_sources"] = dict(self.replay_sources)
        return out


def _check_choices(name: str, values: Sequence[str], choices: Sequence[str]) -> None:
    if not values or len(set(values)) != len(values) or any(v not in choices for v in values):
        raise ValueError(f"bench {name}: need distinct values from {tuple(choices)}, got {tuple(values)!r}")


def smoke_config(**overrides) -> BenchConfig:
    """Every method and both workloads at tiny sizes: a tiny random model for the shaped workload, tiny random
    weights with the embedded model's tokenizer and chat template for the real one. One context and one real
    request: on a CPU a point's time goes mostly to its two engines' compiled programs, and fewer row mixes
    mean fewer programs. The numbers check the harness, not the engine's speed."""
    fields = dict(workloads=WORKLOADS, methods=METHODS, k=8, min_budget=16, real_random_shape="tiny-shaped",
                  real_batch=(1,), new_tokens=24, sync_tokens=12, shape="tiny-shaped", shaped_batch=(4,),
                  contexts=(96,), warmup=10, steps=10, sync_steps=4, prompt_length=16,
                  output_lengths=(64, 128, 256), copy_mib=16, attention_reps=2)
    fields.update(overrides)
    return BenchConfig(**fields)


def parse_replay(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """--replay values: "p0,...,pk" for every draft method, or "method=p0,...,pk" for one (later ones win)."""
    out: dict[str, tuple[float, ...]] = {}
    for item in items:
        methods, _, numbers = item.rpartition("=")
        try:
            probs = tuple(float(p) for p in numbers.split(","))
        except ValueError:
            raise ValueError(f"--replay {item!r}: expected comma-separated probabilities") from None
        for method in ([methods] if methods else METHODS[1:]):
            out[method] = probs
    return out


def read_report(path: str | Path, flag: str) -> dict:
    """A bench report's JSON, for the flag that names it (--replay-from, --resume)."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {path}: cannot read a report JSON ({error})") from None
    if not isinstance(report, dict):
        raise ValueError(f"{flag} {path}: not a report (a JSON object)")
    return report


def replay_from_report(path: Path, methods: Sequence[str], k: int) -> tuple[dict, dict]:
    """Each draft method's accepted-draft distribution as measured by a real-workload report (the JSON a
    `sparsespec bench --workload real` run writes), pooled over that method's points in it, and a description
    of where each came from. Shaped runs can so replay every method's own real acceptance rather than one
    distribution for all, which would compare the methods' costs only."""
    report = read_report(path, "--replay-from")
    counts: dict[str, list[int]] = {}
    points: dict[str, list[str]] = {}
    for point in report.get("points", []):
        method, histogram = point.get("method"), point.get("acceptance_histogram")
        if point.get("workload") != "real" or method in (None, "none") or not histogram:
            continue
        if len(histogram) != k + 1:
            raise ValueError(f"--replay-from {path}: {method} at B{point.get('batch')} L{point.get('context')} "
                             f"has a histogram of {len(histogram)} outcomes; this run has k + 1 = {k + 1}")
        counts[method] = [a + b for a, b in zip(counts.get(method, [0] * (k + 1)), histogram)]
        points[method] = points.get(method, []) + [f"B{point.get('batch')} L{point.get('context')}"]
    replay, sources = {}, {}
    for method in methods:
        if method == "none":
            continue
        total = sum(counts.get(method, []))
        if not total:
            raise ValueError(f"--replay-from {path}: no real-workload verifies of {method} in it (measured there: "
                             f"{sorted(counts) or 'none'}); give its distribution with --replay {method}=p0,...,pk")
        replay[method] = tuple(c / total for c in counts[method])
        mean = sum(i * c for i, c in enumerate(counts[method])) / total
        sources[method] = (f"measured: {Path(path).name}, real {method} at {', '.join(points[method])}, "
                           f"{total} verifies pooled, mean {mean:.2f} accepted")
    return replay, sources


# -- measurement helpers -------------------------------------------------------------------------------------
def device_memory() -> dict[str, int | None]:
    """Device memory in use now and the process's peak so far (allocator statistics; None where the platform
    keeps none). Sampled at the end of a throughput window, while its engine still holds its pool."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:                                 # noqa: BLE001 - platforms without statistics raise
        stats = {}
    return {"bytes_in_use": stats.get("bytes_in_use"), "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def device_description() -> str:
    device = jax.devices()[0]
    return f"{getattr(device, 'device_kind', device.platform)} ({device.platform}, jax {jax.__version__}, " \
           f"{platform.machine()}, {jax.device_count()} device(s))"


def integrate_over_output_length(contexts: Sequence[float], ms_per_token: Sequence[float], prompt_length: float,
                                 output_length: float) -> dict:
    """Mean ms per output token of an output of T tokens generated after a prompt of P tokens.

    Token t of the output is produced at context P + t, so the mean is (1/T) * integral over L in [P, P + T] of
    the per-token time f(L). f is piecewise linear through the measured (context, ms/token) points and continues
    the first and last segments linearly beyond them (step time is affine in the context read), except that a
    side whose continuation would reach a negative time at P or P + T is held at its end point's value
    instead; with one point f is constant. The integral is exact for that f (trapezoids between breakpoints)."""
    if len(contexts) != len(ms_per_token) or not contexts:
        raise ValueError(f"need as many ms_per_token as contexts (>= 1), got {len(contexts)} and {len(ms_per_token)}")
    if not output_length > 0 or prompt_length < 0:
        raise ValueError(f"need output_length > 0 and prompt_length >= 0, got {output_length}, {prompt_length}")
    order = np.argsort(contexts)
    xs = np.asarray(contexts, np.float64)[order]
    ys = np.asarray(ms_per_token, np.float64)[order]
    if len(set(xs.tolist())) != len(xs):
        raise ValueError(f"contexts must be distinct, got {list(contexts)}")
    start, end = float(prompt_length), float(prompt_length + output_length)

    def linear(x: float) -> float:
        if len(xs) == 1:
            return float(ys[0])
        i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))       # the segment (or its extension)
        return float(ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i]))

    hold_low = start < xs[0] and linear(start) < 0
    hold_high = end > xs[-1] and linear(end) < 0

    def f(x: float) -> float:
        if hold_low and x < xs[0]:
            return float(ys[0])
        if hold_high and x > xs[-1]:
            return float(ys[-1])
        return linear(x)

    cuts = [start, *[float(x) for x in xs if start < x < end], end]
    integral = sum((b - a) * (f(a) + f(b)) / 2 for a, b in zip(cuts, cuts[1:]))
    mean = integral / output_length
    return {"prompt_length": prompt_length, "output_length": output_length, "ms_per_token": mean,
            "tokens_per_s": 1e3 / mean if mean > 0 else None,
            "extrapolated": bool(start < xs[0] or end > xs[-1]),
            "held_constant": [side for side, held in (("below", hold_low), ("above", hold_high)) if held]}


# -- real workload -------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a JSONL file, one {"prompt": ...} object per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bench prompts: {path} is not a readable file")
    prompts = []
    for number, record in read_jsonl(path):
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{number}: field 'prompt' must be a non-empty string")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def chat_token_ids(tokenizer, prompts: Sequence[str], source: str) -> list[list[int]]:
    if not tokenizer.chat_template:
        raise ValueError(f"bench model {source}: its tokenizer has no chat template (the real workload "
                         "chat-templates its prompts)")
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                           add_generation_prompt=True), add_special_tokens=False)
            for p in prompts]


@dataclasses.dataclass
class RealModel:
    name: str
    config: ModelConfig
    params: dict
    tokenizer: object
    random_weights: bool


def load_real_model(config: BenchConfig) -> RealModel:
    loaded = load_model(config.model)
    if config.real_random_shape is None:
        return RealModel(config.model, loaded.config, loaded.params, loaded.tokenizer, False)
    shape = dataclasses.replace(SHAPE_CHOICES[config.real_random_shape], vocab_size=loaded.config.vocab_size,
                                bos_token_id=loaded.config.bos_token_id, eos_token_ids=loaded.config.eos_token_ids)
    params = random_params(shape, seed=config.seed, dtype=DTYPES[config.real_dtype])
    return RealModel(f"{config.real_random_shape} random weights, {config.model} tokenizer", shape, params,
                     loaded.tokenizer, True)


def _real_requests(model: RealModel, prompt_ids, method: str, config: BenchConfig, sync: bool, max_len: int,
                   max_tokens: int, prefill_chunk: int = PREFILL_CHUNK,
                   prefill_tokens: int = PREFILL_TOKENS) -> tuple[Engine, list]:
    """A real-model engine holding one request per prompt (T = config.temperature, seed config.seed + i, EOS
    ignored, up to `max_tokens`); prompts are prefilled in chunks of up to `prefill_chunk`, at least
    `prefill_tokens` per step."""
    batch = len(prompt_ids)
    engine_config = EngineConfig(dtype=config.real_dtype, attention_backend=config.attention_backend,
                                 unroll_layers=config.unroll_layers, min_batch_bucket=config.min_batch_bucket,
                                 row_buckets_per_doubling=config.row_buckets_per_doubling,
                                 max_batch_size=batch, max_model_len=max_len,
                                 kv_cache_tokens=batch * (max_len + config.k + PAGE_SIZE),
                                 max_num_batched_tokens=max(batch * (config.k + 1), prefill_tokens),
                                 prefill_chunk_size=prefill_chunk, page_size=PAGE_SIZE, sync_host=sync,
                                 host_kv_tokens=0, seed=config.seed,
                                 burst_steps=config.engine_burst_steps(method, sync))
    engine = Engine(model.config, model.params, model.tokenizer, engine_config, config.spec(method, replayed=False))
    requests = [engine.add_request(ids, SamplingParams(temperature=config.temperature, seed=config.seed + i,
                                                       max_tokens=max_tokens, ignore_eos=True))
                for i, ids in enumerate(prompt_ids)]
    return engine, requests


def _real_engine(model: RealModel, prompt_ids, method: str, config: BenchConfig, sync: bool, max_tokens: int,
                 log: Callable[[str], None] = print):
    """An engine that ran `max_tokens` per prompt. Limits depend on config.new_tokens only, so the throughput
    and device windows compile the same shapes. Every PROGRESS_S a line says how far it got and how much of
    that was compiling."""
    batch = len(prompt_ids)
    max_len = max(map(len, prompt_ids)) + config.new_tokens + config.k + 1
    engine, requests = _real_requests(model, prompt_ids, method, config, sync, max_len, max_tokens)
    _generate(engine, requests, f"{method} B{batch}{' sync' if sync else ''}", batch * max_tokens, log)
    return engine, requests


def _generate(engine: Engine, requests: Sequence, label: str, total_tokens: int,
              log: Callable[[str], None]) -> None:
    """Step until every request has finished; every PROGRESS_S a line says how far it got and how much of that
    was compiling."""
    started = last_report = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        if time.perf_counter() - last_report > PROGRESS_S:
            last_report = time.perf_counter()
            summary = engine.metrics.summary()
            log(f"  {label}: {last_report - started:.0f} s, step {engine.num_steps}, "
                f"{sum(len(r.output_ids) for r in requests)} / {total_tokens} tokens, "
                f"{summary['compile_steps']} compiling steps took {summary['compile_steps_s']:.0f} s")
    engine.drain()


def generated_contexts(model: RealModel, prompt_ids: Sequence[list[int]], batch: int, length: int,
                       config: BenchConfig, log: Callable[[str], None] = print) -> tuple[list[list[int]], dict]:
    """Per request, `length` tokens of the model's own reasoning: request i's prompt (prompt i, reused in order)
    followed by what vanilla decoding samples after it (T = config.temperature, seed config.seed + i, EOS
    ignored), cut to `length`. A window's engine samples with the same seeds, and sampling keys depend on the
    request and the position only, so a window prefilled with a prefix of these contexts continues them as the
    generation did (token for token unless rounding parts a prefilled K/V from the decoded one): it times a
    stretch of this generation. Also returns how the generation went."""
    prompts = [list(prompt_ids[i % len(prompt_ids)]) for i in range(batch)]
    longest = max(map(len, prompts))
    if length <= longest:
        raise ValueError(f"bench real_contexts: the largest context ({length} tokens) must exceed the longest "
                         f"prompt ({longest} tokens) to hold generated text")
    new_tokens = length - min(map(len, prompts))
    engine, requests = _real_requests(model, prompts, "none", config, sync=False, max_len=longest + new_tokens,
                                      max_tokens=new_tokens)
    started = time.perf_counter()
    _generate(engine, requests, f"context generation B{batch}", batch * new_tokens, log)
    seconds = time.perf_counter() - started
    contexts = [(prompt + list(request.output_ids))[:length] for prompt, request in zip(prompts, requests)]
    summary = engine.metrics.summary()
    generation = {"method": "none", "batch": batch, "length": length, "seconds": seconds,
                  "output_tokens": sum(len(r.output_ids) for r in requests),
                  "compile_steps": summary["compile_steps"], "compile_s": summary["compile_steps_s"]}
    return contexts, generation


def run_real_point(model: RealModel, prompt_ids: list[list[int]], method: str, config: BenchConfig,
                   log: Callable[[str], None] = print) -> dict:
    """Real generation of config.new_tokens per prompt with `method`, then its sync-mode device window."""
    batch = len(prompt_ids)
    prompt_mean = float(np.mean([len(ids) for ids in prompt_ids]))
    engine, requests = _real_engine(model, prompt_ids, method, config, sync=False, max_tokens=config.new_tokens,
                                    log=log)
    steps = engine.metrics.steps
    steady, compiled, median = compile_split(steps)
    output_tokens = sum(len(r.output_ids) for r in requests)
    engine_s = sum(s.step_ms for s in steps) / 1e3
    steady_s = engine_s - sum(s.step_ms - median * max(1, s.decode_steps) for s in compiled) / 1e3
    decode = [s for s in steady if not s.prefill_rows]
    point = {
        "workload": "real", "method": method, "batch": batch, "new_tokens": config.new_tokens,
        "prompt_tokens_mean": prompt_mean, "output_tokens": output_tokens,
        "steps": sum(s.decode_steps for s in steps),
        "engine_s": engine_s, "compile_steps": len(compiled),
        "compile_s": sum(s.step_ms for s in compiled) / 1e3, "median_step_ms": median,
        "tokens_per_s": output_tokens / steady_s, "tokens_per_s_e2e": output_tokens / engine_s,
        "tokens_per_step": output_tokens / sum(s.decode_steps for s in steps),
        "step_ms": per_step(decode, "step_ms") if decode else median,
        "host_ms": per_step(steady, "host_ms"), "dispatch_ms": per_step(steady, "dispatch_ms"),
        "kv_tokens_used_mean": float(np.mean([s.kv_tokens_used for s in steps])),
        "kv_tokens_used_max": max(s.kv_tokens_used for s in steps),
        "preemptions": engine.scheduler.num_preemptions, "offloads": engine.scheduler.num_offloads,
        **acceptance_summary(engine.acceptance_counts),
        "throughput_composition": _composition(decode, prompt_mean + config.new_tokens / 2, "throughput window"),
        "device_memory": device_memory(),
    }
    del engine, requests, steps, steady, compiled, decode     # the sync-mode engine's pool takes its place
    sync_tokens = min(config.sync_tokens, config.new_tokens)
    engine, _ = _real_engine(model, prompt_ids, method, config, sync=True, max_tokens=sync_tokens, log=log)
    decode = [s for s in engine.metrics.steps if not s.prefill_rows]
    if len(decode) > 2 * (config.k + 2):
        decode = decode[config.k + 2:]                 # past the cold-start draft round
    point["device_window"] = _device_window(decode, prompt_mean + sync_tokens / 2)
    return point


# -- shaped workload -----------------------------------------------------------------------------------------
def shaped_headroom(method: str, config: BenchConfig) -> int:
    """Tokens each placed request may grow by over both windows without running out of pages: at most one per
    step (vanilla, and drafting methods whose k + 1-step rounds emit <= k + 1), k + 1 per verify for n-gram
    (every step in sync mode, every other one when its verify sits out a step)."""
    async_steps, sync_steps = config.warmup + config.steps, config.k + 2 + config.sync_steps
    if method == "ngram":
        return max(async_steps * math.ceil((config.k + 1) / 2), sync_steps * (config.k + 1)) + config.k + 1
    return max(async_steps, sync_steps) + config.k + 1


def _placed_engine(cfg: ModelConfig, params, batch: int, context: int, method: str, config: BenchConfig,
                   sync: bool) -> Engine:
    """An engine with `batch` requests placed at `context`; pool and length limits depend on the largest
    context only, so every context of a method compiles the same shapes."""
    headroom = shaped_headroom(method, config)
    max_len = max(config.contexts) + headroom
    engine_config = EngineConfig(dtype="bfloat16", attention_backend=config.attention_backend,
                                 unroll_layers=config.unroll_layers, min_batch_bucket=config.min_batch_bucket,
                                 row_buckets_per_doubling=config.row_buckets_per_doubling,
                                 max_batch_size=batch, max_model_len=max_len,
                                 kv_cache_tokens=batch * (max_len + PAGE_SIZE) + config.k,
                                 max_num_batched_tokens=batch * (config.k + 1), page_size=PAGE_SIZE,
                                 sync_host=sync, host_kv_tokens=0, seed=config.seed,
                                 burst_steps=config.engine_burst_steps(method, sync))
    engine = Engine(cfg, params, placeholder_tokenizer(), engine_config, config.spec(method, replayed=True))
    sampling = SamplingParams(temperature=config.temperature, max_tokens=1 << 30, ignore_eos=True)
    place_at_context(engine, batch, context, 1 << 30, seed=config.seed + 1, reserve=0, params=sampling)
    return engine


def run_shaped_point(cfg: ModelConfig, params, batch: int, context: int, method: str, config: BenchConfig) -> dict:
    """`warmup` then `steps` timed steps of `batch` requests placed at `context`, then the sync-mode window."""
    point = _window_point(_placed_engine(cfg, params, batch, context, method, config, sync=False),
                          "shaped", method, batch, context, config)
    point["device_window"] = _sync_window(_placed_engine(cfg, params, batch, context, method, config, sync=True),
                                          batch, context, config)
    return point


def context_prompts(prompt_ids: Sequence[list[int]], batch: int, context: int) -> list[list[int]]:
    """Per request, `context` tokens of real text: prompts back to back, request i starting at prompt i."""
    if not prompt_ids or not all(prompt_ids):
        raise ValueError("bench real_contexts: need non-empty prompts to fill the contexts with")
    filled = []
    for i in range(batch):
        tokens, j = [], i
        while len(tokens) < context:
            tokens += prompt_ids[j % len(prompt_ids)]
            j += 1
        filled.append(tokens[:context])
    return filled


def fill_steps(batch: int, context: int) -> int:
    """Steps a fill of `batch` contexts takes: FILL_TOKENS per step, plus the last chunks' tail."""
    return math.ceil(batch * context / FILL_TOKENS) + math.ceil(context / FILL_CHUNK)


def fill_growth(method: str, config: BenchConfig) -> int:
    """Tokens a request may decode while the rest of its batch is still prefilling (a request decodes from the
    step after its own prefill ends): the fill's steps at the largest batch and context, at the growth rate
    shaped_headroom allows per step ("none": one token, the least any method grows), plus one verify."""
    per_step = math.ceil((config.k + 1) / 2) if method == "ngram" else 1
    return fill_steps(max(config.real_batch), max(config.real_contexts)) * per_step + config.k + 1


def run_fill(engine: Engine, requests: Sequence) -> float:
    """Step until every request's prompt is prefilled (its first output token ends that), then clear the step
    log so a window starts after the fill; the requests' mean context then (the first done decoded since)."""
    while any(not r.output_ids for r in requests):
        engine.step()
    engine.metrics.steps.clear()
    return float(np.mean([r.num_tokens for r in requests]))


def _prefilled_engine(model: RealModel, prompts: list[list[int]], method: str, config: BenchConfig,
                      sync: bool) -> tuple[Engine, float]:
    """A real-model engine whose requests have prefilled `prompts` (all one length) for real, and their mean
    context when the fill ended (requests that finished prefilling first have decoded a little since). Limits
    depend on the largest batch and context only, so every point of a method compiles the same decode shapes."""
    largest, limit = max(config.real_contexts), model.config.max_position_embeddings
    least_growth = fill_growth("none", config)
    if largest + least_growth > limit:
        raise ValueError(f"bench real_contexts: {largest} tokens plus the growth while filling ({least_growth} "
                         f"even without drafts) exceed {model.name}'s context of {limit} tokens")
    # The worst case while filling and over the windows (n-gram: every draft accepted on every verify) may not
    # fit the model's context; real acceptance grows requests far less, and a window whose batch shrank by
    # then raises (_window_point).
    max_len = min(largest + fill_growth(method, config) + shaped_headroom(method, config), limit)
    engine, requests = _real_requests(model, prompts, method, config, sync, max_len, max_tokens=1 << 30,
                                      prefill_chunk=FILL_CHUNK, prefill_tokens=FILL_TOKENS)
    return engine, run_fill(engine, requests)


def run_real_context_point(model: RealModel, prompts: list[list[int]], context: int, method: str,
                           config: BenchConfig) -> dict:
    """Real text (`prompts`, one of `context` tokens per request) prefilled, then `warmup` and `steps` timed
    steps with real acceptance, then the sync-mode window of a second engine prefilled the same way."""
    point = run_real_window(model, prompts, context, method, config)
    engine, start = _prefilled_engine(model, prompts, method, config, sync=True)
    point["device_window"] = _sync_window(engine, len(prompts), start, config)
    return point


def run_real_window(model: RealModel, prompts: list[list[int]], context: int, method: str,
                    config: BenchConfig) -> dict:
    """The throughput window alone: `prompts` (`context` tokens each) prefilled, then `warmup` and `steps` timed
    steps with real acceptance."""
    engine, start = _prefilled_engine(model, prompts, method, config, sync=False)
    point = _window_point(engine, "real", method, len(prompts), context, config, start_context=start)
    point["context_mean_at_start"] = start
    return point


def _window_point(engine: Engine, workload: str, method: str, batch: int, context: int, config: BenchConfig,
                  start_context: float | None = None) -> dict:
    """The throughput window of an engine whose batch sits at `context` (or, where the requests differ, at a
    mean of `start_context`): `warmup`, then `steps` timed steps. Every request must still be running at the
    end: one that reached its length limit would shrink the batch the window claims to measure."""
    window = time_window(engine, config.warmup, config.steps)
    running = len(engine.scheduler.running)
    if running != batch:
        raise RuntimeError(f"bench {workload} B{batch} L{context} {method}: {batch - running} requests stopped "
                           f"during the window (length limit {engine.max_model_len}); the window would not "
                           f"measure batch {batch}")
    before_window = engine.metrics.steps[:len(engine.metrics.steps) - len(window.steps)]
    grown_before = sum(s.emitted_tokens for s in before_window) / batch
    timed, steady, compiled, median = window.steps, window.steady, window.compiled, window.median_ms
    seconds = window.seconds
    emitted = sum(s.emitted_tokens for s in steady)
    grown = grown_before + sum(s.emitted_tokens for s in timed) / batch / 2
    point = {
        "workload": workload, "method": method, "batch": batch, "context": context,
        "steps_timed": sum(s.decode_steps for s in steady), "iterations_timed": len(steady),
        "compile_steps": len(compiled), "compile_s": sum(s.step_ms for s in compiled) / 1e3,
        "median_step_ms": median, "step_ms": window.step_ms, "tokens_per_s": emitted / seconds,
        "tokens_per_step": window.mean("emitted_tokens"), "host_ms": window.mean("host_ms"),
        "dispatch_ms": window.mean("dispatch_ms"), "wait_ms": window.mean("wait_ms"),
        "kv_tokens_used_mean": float(np.mean([s.kv_tokens_used for s in timed])),
        "kv_tokens_used_max": max(s.kv_tokens_used for s in timed),
        "preemptions": engine.scheduler.num_preemptions, "offloads": engine.scheduler.num_offloads,
        **acceptance_summary(window.acceptance_counts),
        "throughput_composition": _composition(steady, (start_context or context) + grown, "throughput window"),
        "device_memory": device_memory(),
    }
    return point


def _sync_window(engine: Engine, batch: int, context: float, config: BenchConfig) -> dict:
    """Device ms/step of a sync-mode engine at `context`: `sync_steps` steps after a k+2-step warm-up."""
    for _ in range(config.k + 2 + config.sync_steps):
        engine.step()
    window = engine.metrics.steps[config.k + 2:]
    grown = sum(s.emitted_tokens for s in engine.metrics.steps[:config.k + 2]) / batch
    result = _device_window(window, context + grown + sum(s.emitted_tokens for s in window) / batch / 2)
    return result


def _composition(steps, context: float, window: str) -> dict:
    if not steps:
        raise ValueError(f"bench: the {window} has no decode steps to measure (raise new_tokens, sync_tokens or "
                         "the step counts)")
    return roofline.StepComposition.of_steps(steps, context).as_dict()


def _device_window(steps, context: float) -> dict:
    """Device ms/step of sync-mode decode steps (median wait after dispatch) and their composition."""
    steady, compiled, _ = compile_split(steps)
    return {"steps": len(steady), "compile_steps": len(compiled),
            "device_ms": float(np.median([s.wait_ms for s in steady])),
            "host_ms": float(np.mean([s.host_ms for s in steady])),
            "composition": _composition(steady, context, "sync-mode device window")}


# -- per-point analysis --------------------------------------------------------------------------------------
def add_breakdown(point: dict, cfg: ModelConfig, dtype, config: BenchConfig, bandwidth: float) -> None:
    """Attention ms at the device window's composition, GEMM/other, bytes per step and roofline fractions."""
    spec = config.spec(point["method"], replayed=False)
    itemsize = jnp.dtype(dtype).itemsize
    window = point["device_window"]
    point["device_ms"] = window["device_ms"]
    attention = roofline.time_attention(cfg, dtype, resolve_backend(config.attention_backend),
                                        roofline.StepComposition(**window["composition"]), spec,
                                        page_size=PAGE_SIZE, reps=config.attention_reps, seed=config.seed)
    point["attention"] = attention
    point["attention_ms"] = attention["ms"]
    point["gemm_other_ms"] = window["device_ms"] - attention["ms"]
    through = roofline.bytes_per_step(cfg, itemsize, roofline.StepComposition(**point["throughput_composition"]),
                                      spec)
    device = roofline.bytes_per_step(cfg, itemsize, roofline.StepComposition(**window["composition"]), spec)
    point["bytes_per_step"] = through
    point["roofline_ms"] = roofline.roofline_ms(through["total"], bandwidth)
    point["roofline_fraction"] = roofline.achieved_fraction(through["total"], bandwidth, point["step_ms"])
    point["roofline_fraction_device"] = (roofline.achieved_fraction(device["total"], bandwidth, window["device_ms"])
                                         if window["device_ms"] > 0 else None)


def length_curves(points: list[dict], config: BenchConfig) -> list[dict]:
    """Per (method, batch) of the shaped workload: tokens/s integrated over each output length."""
    curves = []
    for batch in config.shaped_batch:
        for method in config.methods:
            measured = sorted((p["context"], 1e3 / p["tokens_per_s"]) for p in points
                              if p["workload"] == "shaped" and p["method"] == method and p["batch"] == batch
                              and p["tokens_per_s"] > 0)
            if not measured:
                continue
            contexts, ms = zip(*measured)
            curves.append({"method": method, "batch": batch, "contexts": list(contexts),
                           "ms_per_token": list(ms),
                           "points": [integrate_over_output_length(contexts, ms, config.prompt_length, length)
                                      for length in config.output_lengths]})
    return curves


# -- the run -------------------------------------------------------------------------------------------------
RESUMABLE_FIELDS = ("workloads", "methods", "time_budget_s")   # a resumed run may differ from its report in these


def measure_label(workload: str, batch: int, context: int | None, method: str, config: BenchConfig) -> str:
    """A point's name in logs and in the skipped / failed lists; also how a resumed run finds it done."""
    if workload == "shaped":
        return f"shaped {config.shape} B{batch} L{context} {method}"
    return f"real B{batch} {method}" if context is None else f"real B{batch} L{context} {method}"


def planned_points(config: BenchConfig, workload: str) -> list[tuple[int, int | None, str]]:
    """(batch, context or None for a whole generation, method) of every point of a workload, in run order."""
    if workload == "shaped":
        return [(b, c, m) for b in config.shaped_batch for c in config.contexts for m in config.methods]
    return [(b, c, m) for b in config.real_batch for c in (config.real_contexts or (None,)) for m in config.methods]


def resume_result(report: dict, config: BenchConfig, command: str, source: str) -> dict:
    """The result a resumed run continues from a report it wrote: the points measured so far and the run's copy
    bandwidth stay, failed and skipped points are cleared (they run again). The report must come from this device
    and this configuration; only RESUMABLE_FIELDS may differ, and its workloads and methods become the union."""
    missing = [key for key in ("config", "device", "points", "copy_bandwidth", "elapsed_s") if key not in report]
    if missing:
        raise ValueError(f"--resume: {source} is not a bench report (no {', '.join(missing)})")
    device = device_description()
    if report["device"] != device:
        raise ValueError(f"--resume: {source} was measured on {report['device']}, this run is on {device}; "
                         "one report holds one device's numbers")
    now = json.loads(json.dumps(config.as_dict()))
    differing = [f"{name} (report {report['config'].get(name)!r}, now {value!r})" for name, value in now.items()
                 if name not in RESUMABLE_FIELDS and report["config"].get(name) != value]
    if differing:
        raise ValueError(f"--resume: {source} was measured with other settings: {'; '.join(differing)}")
    result = {key: report[key] for key in ("title", "device", "date", "command", "attention_backend",
                                           "burst_steps", "copy_bandwidth", "points", "workloads", "elapsed_s")}
    result["config"] = {**now, **{name: [v for v in choices if v in report["config"][name] or v in now[name]]
                                  for name, choices in (("workloads", WORKLOADS), ("methods", METHODS))}}
    result.update(skipped=[], failed=[], integrated=[],
                  resumed=[*report.get("resumed", []), {"date": datetime.date.today().isoformat(),
                                                       "command": command, "points_kept": len(report["points"])}])
    return result


def run_benchmark(config: BenchConfig, command: str = "", log: Callable[[str], None] = print,
                  on_point: Callable[[dict], None] | None = None, resume: dict | None = None) -> dict:
    """Run every requested (workload, batch[, context], method) point; returns the full result (JSON-ready).
    `on_point(result so far)` runs after every point, so a run cut short still leaves its report behind, and
    `resume` (a result from resume_result) continues it: points measured there are not run again."""
    started = time.perf_counter()
    if resume is None:
        result = {"title": "End-to-end throughput: vanilla vs n-gram vs streaming vs pillar",
                  "device": device_description(), "date": datetime.date.today().isoformat(), "command": command,
                  "config": config.as_dict(), "attention_backend": resolve_backend(config.attention_backend),
                  "burst_steps": config.engine_burst_steps("none", sync=False),
                  "points": [], "skipped": [], "failed": [], "workloads": {}, "integrated": [], "elapsed_s": 0.0}
        result["copy_bandwidth"] = roofline.copy_bandwidth(config.copy_mib << 20)
    else:
        result = resume
        log(f"resuming: {len(result['points'])} points measured on {result['date']} stay, with that run's copy "
            "bandwidth")
    bandwidth = result["copy_bandwidth"]["bytes_per_s"]
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s on {result['device']}")
    done = {measure_label(p["workload"], p["batch"], p.get("context"), p["method"], config) for p in result["points"]}
    earlier_s = result["elapsed_s"]
    every_method = dataclasses.replace(config, methods=tuple(result["config"]["methods"]))

    def out_of_time() -> bool:
        return config.time_budget_s is not None and time.perf_counter() - started > config.time_budget_s

    def update() -> None:
        result["integrated"] = length_curves(result["points"], every_method)
        result["elapsed_s"] = earlier_s + time.perf_counter() - started

    def measure(label: str, run: Callable[[], dict], cfg: ModelConfig, dtype) -> None:
        """One point; a failure (out of device memory, say) is recorded and the run goes on to the next."""
        if out_of_time():
            result["skipped"].append(label)
            log(f"skipped (time budget): {label}")
            return
        try:
            point = run()
            add_breakdown(point, cfg, dtype, config, bandwidth)
        except Exception as error:                 # noqa: BLE001 - one failed point must not lose the others
            result["failed"].append({"point": label, "error": f"{type(error).__name__}: {error}"[:2000]})
            log(f"FAILED {label}: {type(error).__name__}: {error}")
            point = None
        if point is None:
            # Outside the handler, whose exception keeps its traceback's frames (and an engine in them) reachable.
            gc.collect()
            return
        result["points"].append(point)
        if on_point is not None:
            update()
            on_point(result)
        log(f"{label}: {point['tokens_per_s']:.1f} tok/s, {point['tokens_per_step']:.2f} tok/step, "
            f"accepted/verify {point['accepted_per_verify']:.2f}, host {point['host_ms']:.2f} ms (dispatch "
            f"{point['dispatch_ms']:.2f}), device "
            f"{point['device_ms']:.2f} ms (attention {point['attention_ms']:.2f}), roofline "
            f"{point['roofline_fraction']:.0%}")

    for workload in config.workloads:
        todo = [(batch, context, method) for batch, context, method in planned_points(config, workload)
                if measure_label(workload, batch, context, method, config) not in done]
        if not todo:
            log(f"{workload} workload: every point was measured before")
            continue
        if workload == "real":
            try:
                model = load_real_model(config)
                prompts = read_prompts(config.prompts)
                ids = chat_token_ids(model.tokenizer, prompts, config.model)
                log(f"real workload: {model.name} and {len(prompts)} prompts ready after "
                    f"{time.perf_counter() - started:.0f} s")
            except Exception as error:             # noqa: BLE001 - the other workload's results still count
                result["failed"].append({"point": "real workload (model and prompts)",
                                         "error": f"{type(error).__name__}: {error}"[:2000]})
                log(f"FAILED real workload setup: {type(error).__name__}: {error}")
                continue
            result["workloads"]["real"] = real = {
                "model": model.name, "random_weights": model.random_weights, "dtype": config.real_dtype,
                "prompts": config.prompts, "distinct_prompts": len(prompts), "temperature": config.temperature,
                "new_tokens": None if config.real_contexts else config.new_tokens,
                "contexts": list(config.real_contexts), "context_source": config.real_context_source,
                "warmup": config.warmup, "steps": config.steps, "fill_tokens": FILL_TOKENS, "replayed": False}
            generated = None
            if config.real_contexts and config.real_context_source == "generated":
                try:
                    generated, real["context_generation"] = generated_contexts(
                        model, ids, max(config.real_batch), max(config.real_contexts), config, log)
                except Exception as error:         # noqa: BLE001 - the other workload's results still count
                    result["failed"].append({"point": "real workload (generated contexts)",
                                             "error": f"{type(error).__name__}: {error}"[:2000]})
                    log(f"FAILED real context generation: {type(error).__name__}: {error}")
                    continue
                log(f"contexts generated: {real['context_generation']['output_tokens']} tokens in "
                    f"{real['context_generation']['seconds']:.0f} s")
            for batch, context, method in todo:
                label = measure_label(workload, batch, context, method, config)
                if context is None:
                    batch_ids = [ids[i % len(ids)] for i in range(batch)]
                    measure(label, lambda: run_real_point(model, batch_ids, method, config, log),
                            model.config, DTYPES[config.real_dtype])
                    continue
                contexts = ([text[:context] for text in generated[:batch]] if generated is not None
                            else context_prompts(ids, batch, context))
                measure(label, lambda: run_real_context_point(model, contexts, context, method, config),
                        model.config, DTYPES[config.real_dtype])
            del model
        else:
            cfg = SHAPE_CHOICES[config.shape]
            params = random_params(cfg, seed=config.seed, dtype=jnp.bfloat16)
            result["workloads"]["shaped"] = {
                "shape": config.shape, "dtype": "bfloat16", "random_weights": True, "replayed": True,
                "replay": {m: config.replay_description(m) for m in every_method.methods},
                "contexts": list(config.contexts), "warmup": config.warmup, "steps": config.steps,
                "sync_steps": config.sync_steps}
            for batch, context, method in todo:
                measure(measure_label(workload, batch, context, method, config),
                        lambda: run_shaped_point(cfg, params, batch, context, method, config), cfg, jnp.bfloat16)
            del params
    update()
    return result
