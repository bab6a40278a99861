"""The engine: owns the weights, the KV cache and the jitted step; turns scheduled rows into tokens."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsespec_jax.attention import check_backend_name, paged_attention, resolve_backend
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.detokenizer import IncrementalDetokenizer
from sparsespec_jax.kv_cache import KVCache, PageAllocator
from sparsespec_jax.model import Transformer
from sparsespec_jax.request import Request
from sparsespec_jax.sampling import SamplingArrays, SamplingParams, sample_tokens
from sparsespec_jax.scheduler import ScheduledRow, Scheduler
from sparsespec_jax.sharding import create_on_mesh, make_mesh, place_params
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.spec.draft_sets import DraftSets
from sparsespec_jax.spec.ngram import propose_ngram
from sparsespec_jax.spec.round import RoundBatch, speculative_round
from sparsespec_jax.step_batch import BucketLimits, StepBatch, build_step_batch

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class RequestError(ValueError):
    """A single request cannot be served as given (its own fault; other requests are unaffected)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float32"
    max_batch_size: int = 16
    kv_cache_tokens: int = 16384
    page_size: int = 16
    max_model_len: int | None = None          # default: the model's context, capped by the KV pool
    max_num_batched_tokens: int = 256
    prefill_chunk_size: int = 128
    attention_backend: str = "auto"
    seed: int = 0
    min_context_bucket: int = 512             # narrowest page table compiled (tokens): fewer compiles vs work
    tensor_parallel: int = 1                  # devices one engine's heads are split over (sharding.py)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_size", "kv_cache_tokens", "page_size", "max_num_batched_tokens",
                     "prefill_chunk_size", "min_context_bucket", "tensor_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_batch_size ({self.max_batch_size}) so every running request can decode")
        check_backend_name(self.attention_backend)


@functools.partial(jax.jit, static_argnames=("graphdef", "backend"), donate_argnames=("kv",))
def decode_step(graphdef, state, kv: KVCache, batch: StepBatch, sampling: SamplingArrays, backend: str):
    """One plain step: prompt chunks and/or single decode tokens; samples each row's next token."""
    model = nnx.merge(graphdef, state)
    meta = batch.meta

    def attend(q, k_pool, v_pool, layer, _):
        out, _ = paged_attention(backend, q, k_pool, v_pool, layer, meta)
        return out, None

    hidden, kv, _ = model(batch.tokens, batch.positions, kv, meta.write_slots, attend)
    logits = model.logits(hidden[batch.logit_tokens])
    return sample_tokens(logits, sampling, batch.sample_positions), kv


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "backend"), donate_argnames=("kv", "sets"))
def round_step(graphdef, state, kv: KVCache, sets: DraftSets | None, batch: RoundBatch, sampling: SamplingArrays,
               spec: SpecConfig, backend: str):
    """One speculative round (k drafts + verify + acceptance + new draft sets) for the decoding rows."""
    return speculative_round(nnx.merge(graphdef, state), kv, sets, batch, sampling, spec, backend)


class Engine:
    def __init__(self, cfg: ModelConfig, params, tokenizer, config: EngineConfig = EngineConfig(),
                 spec: SpecConfig = SpecConfig(method="none")):
        self.model_config = cfg
        self.tokenizer = tokenizer
        self.config = config
        self.spec = spec
        self.backend = resolve_backend(config.attention_backend)
        dtype = DTYPES[config.dtype]
        num_pages = -(-config.kv_cache_tokens // config.page_size) + 1      # + the reserved padding page
        pool_tokens = (num_pages - 1) * config.page_size
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        lookahead = spec.k if spec.speculative else 0    # draft/verify writes past the newest token
        if self.max_model_len + lookahead > pool_tokens:
            raise ValueError(f"kv_cache_tokens ({config.kv_cache_tokens}) must hold at least one full-length "
                             f"request (max_model_len {self.max_model_len} + {lookahead} speculative slots); "
                             f"raise it or lower max_model_len")
        self.limits = BucketLimits(max_rows=config.max_batch_size, max_tokens=config.max_num_batched_tokens,
                                   max_q_len=config.prefill_chunk_size,
                                   max_pages=-(-(self.max_model_len + lookahead) // config.page_size),
                                   page_size=config.page_size,
                                   min_pages=-(-config.min_context_bucket // config.page_size))
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | frozenset(tokenizer.eos_token_ids)

        self.mesh = make_mesh(cfg, config.tensor_parallel)
        model = Transformer(cfg, place_params(cfg, params, self.mesh, dtype), dtype)
        self.graphdef, self.state = nnx.split(model)
        self.kv = create_on_mesh(lambda: KVCache.create(cfg, num_pages, config.page_size, dtype), self.mesh)
        self.allocator = PageAllocator(num_pages, config.page_size)
        self.scheduler = Scheduler(self.allocator, config.max_batch_size, config.max_num_batched_tokens,
                                   config.prefill_chunk_size, decode_lookahead=lookahead,
                                   on_release=self._release_draft_slot)
        if spec.speculative:
            # One spare slot past the batch absorbs padding rows' writes.
            self.draft_sets = create_on_mesh(
                lambda: DraftSets.create(config.max_batch_size + 1, cfg.num_layers, cfg.num_kv_heads,
                                         spec.max_budget(self.max_model_len) + spec.k), self.mesh)
            self._free_draft_slots = list(range(config.max_batch_size - 1, -1, -1))

        self._num_requests = 0
        self.num_steps = 0

    def _release_draft_slot(self, request: Request) -> None:
        if request.draft_slot is not None:
            self._free_draft_slots.append(request.draft_slot)
            request.draft_slot = None

    # -- requests --------------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None) -> None:
        """Raise RequestError naming the problem if this request cannot be served; changes nothing."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"request {request_id}: sampling params must be SamplingParams, got {type(params)}")
        if not prompt_ids:
            raise RequestError(f"request {request_id}: empty prompt")
        limit = self.max_model_len
        if len(prompt_ids) >= limit:
            raise RequestError(f"request {request_id}: prompt has {len(prompt_ids)} tokens, the context limit "
                               f"is {limit} (max_model_len) and at least one must be left to generate")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"request {request_id}: token id {bad[0]} outside the vocabulary [0, {vocab})")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str = "") -> Request:
        """Validate and queue one request; a bad one raises RequestError and leaves the others untouched."""
        self.validate(prompt_ids, params, request_id)
        index = self._num_requests
        self._num_requests += 1
        seed = params.seed if params.seed is not None else (self.config.seed * 1_000_003 + index) % (1 << 32)
        detok = IncrementalDetokenizer(self.tokenizer, stop=list(params.stop), skip_special_tokens=True)
        request = Request(request_id if request_id is not None else str(index), prompt, prompt_ids, params,
                          detok, seed)
        self.scheduler.add(request)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one iteration ---------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one engine iteration; return the requests that finished in it."""
        rows = self.scheduler.schedule()
        if not rows:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: the KV pool cannot hold the next request")
            return []
        if not self.spec.speculative:
            return self._run_step(rows)
        # Speculative decoding: prompt chunks run as a plain step, decoding rows as one speculative round.
        decoding = [row for row in rows if row.request.num_tokens - row.request.num_computed == 1]
        prefilling = [row for row in rows if row.request.num_tokens - row.request.num_computed > 1]
        finished = self._run_step(prefilling) if prefilling else []
        if decoding:
            finished += self._run_round(decoding)
        return finished

    def _run_step(self, rows: list[ScheduledRow]) -> list[Request]:
        batch = build_step_batch(rows, self.limits)
        sampling = self._sampling_arrays(rows, len(batch.logit_tokens))
        tokens, self.kv = decode_step(self.graphdef, self.state, self.kv, batch, sampling, self.backend)
        tokens = np.asarray(tokens)
        self.num_steps += 1
        return self._commit(rows, tokens)

    def _run_round(self, rows: list[ScheduledRow]) -> list[Request]:
        spec, ps = self.spec, self.config.page_size
        num_rows = self.limits.rows(len(rows))
        num_pages = self.limits.pages(max(len(row.request.pages) for row in rows))
        last_token = np.zeros(num_rows, np.int32)
        start = np.zeros(num_rows, np.int32)
        page_tables = np.zeros((num_rows, num_pages), np.int32)
        slot = np.full(num_rows, self.config.max_batch_size, np.int32)
        live = np.zeros(num_rows, bool)
        reset = np.zeros(num_rows, bool)
        num_drafts = np.zeros(num_rows, np.int32)
        proposals = np.zeros((num_rows, spec.k), np.int32)
        for r, row in enumerate(rows):
            request = row.request
            last_token[r], start[r], live[r] = request.all_ids[-1], request.num_computed, True
            page_tables[r, :len(request.pages)] = request.pages
            if request.draft_slot is None and spec.drafts_with_model:
                request.draft_slot = self._free_draft_slots.pop()
                reset[r] = True
            if request.draft_slot is not None:
                slot[r] = request.draft_slot
            # Never emit past max_tokens or the context: a round emits at most num_drafts + 1 tokens.
            room = min(request.params.max_tokens - len(request.output_ids), self.max_model_len - request.num_tokens)
            num_drafts[r] = max(0, min(spec.k, room - 1))
            if spec.method == "ngram":
                proposal = propose_ngram(request.all_ids, int(num_drafts[r]), spec.ngram_max, spec.ngram_min)
                proposals[r, :len(proposal)] = proposal
                num_drafts[r] = len(proposal)
        batch = RoundBatch(last_token=last_token, start=start, page_tables=page_tables, slot=slot, live=live,
                           reset=reset, num_drafts=num_drafts, proposals=proposals, page_size=ps)
        sampling = self._sampling_arrays(rows, num_rows)
        sets = self.draft_sets if spec.drafts_with_model else None
        tokens, num_emitted, self.kv, sets = round_step(self.graphdef, self.state, self.kv, sets, batch, sampling,
                                                        spec, self.backend)
        if spec.drafts_with_model:
            self.draft_sets = sets
        tokens, num_emitted = np.asarray(tokens), np.asarray(num_emitted)
        self.num_steps += 1
        finished = []
        now = time.perf_counter()
        for r, row in enumerate(rows):
            request, emitted = row.request, int(num_emitted[r])
            request.num_computed += emitted
            request.stats.steps += 1
            request.stats.verifies += 1
            request.stats.drafted_tokens += int(num_drafts[r])
            request.stats.accepted_tokens += emitted - 1
            for token in tokens[r, :emitted]:
                if self._append_token(request, int(token), now):
                    finished.append(request)
                    break
        return finished

    def _sampling_arrays(self, rows: list[ScheduledRow], num_rows: int) -> SamplingArrays:
        return SamplingArrays.from_rows([row.request.params for row in rows],
                                        [row.request.seed for row in rows], num_rows)

    def _commit(self, rows: list[ScheduledRow], tokens: np.ndarray) -> list[Request]:
        finished = []
        now = time.perf_counter()
        for r, row in enumerate(rows):
            request = row.request
            completes = row.completes
            request.num_computed += row.num_tokens
            request.stats.steps += 1
            if completes and self._append_token(request, int(tokens[r]), now):
                finished.append(request)
        return finished

    def _append_token(self, request: Request, token: int, now: float) -> bool:
        """Record a sampled token; finish the request if it hit a stop condition. Returns True if finished."""
        params = request.params
        request.output_ids.append(token)
        request.stats.output_tokens = len(request.output_ids)
        if request.stats.first_token_time is None:
            request.stats.first_token_time = now
        request.detokenizer.push([token])
        reason = None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif request.detokenizer.stopped:
            reason = "stop"
        elif len(request.output_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is None:
            return False
        request.detokenizer.finish()
        request.finish_reason = reason
        request.stats.finish_time = now
        self.scheduler.finish(request)
        return True

    def run(self, on_finish: Callable[[Request], None] | None = None) -> None:
        """Step until every queued request has finished."""
        while self.has_unfinished():
            for request in self.step():
                if on_finish is not None:
                    on_finish(request)
