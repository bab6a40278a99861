"""The engine: owns the weights, the KV cache and the slot state; turns scheduled rows into tokens.

Each iteration plans one step, dispatches the jitted unified step and, when running ahead (the default), reads
the previous step's results while this one runs on the device: the host never sits on the critical path in
steady state. With `sync_host` it reads each step's results before planning the next (the ablation baseline).
With `burst_steps` > 1 (the default on GPUs) an iteration in which every request is decoding runs that many
steps in one call (decode_burst.py); the slot table hands its requests' cycles to the device counters and takes
them back when the batch needs single steps again (an admission, a prompt chunk, a restore of a request without
a draft set, or pages short by more than offloading a few of the newest requests frees).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import weakref
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsespec_jax.attention import check_backend_name, resolve_backend
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.decode_burst import (BurstCounters, BurstInputs, BurstPlan, advance_cycles, auto_burst_steps,
                                         balance_phases, make_burst_fn, seed_counters)
from sparsespec_jax.detokenizer import IncrementalDetokenizer
from sparsespec_jax.kv_cache import KVCache, PageAllocator
from sparsespec_jax.kv_offload import HostKVPool, offload_chunks, restore_chunks
from sparsespec_jax.model import Transformer
from sparsespec_jax.packed_args import pack
from sparsespec_jax.request import Request
from sparsespec_jax.sampling import SamplingArrays, SamplingParams, truncation_cut
from sparsespec_jax.scheduler import SCHEDULER_MODES, CyclePolicy, RowKind, Scheduler, StepPlan
from sparsespec_jax.sharding import create_on_mesh, make_mesh, place_params
from sparsespec_jax.slot_state import SlotState
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.spec.draft_sets import DraftSets
from sparsespec_jax.spec.ngram import propose_ngram
from sparsespec_jax.step_batch import BucketLimits, build_unified_batch, rows_array
from sparsespec_jax.step_metrics import StepLog, StepMetrics
from sparsespec_jax.unified_step import make_step_fn

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# A burst that does not fit the KV pool may offload up to this share of the running requests (the newest) to
# fit rather than fall back to single steps, which cost the host 4-6x more per step on a GPU.
BURST_EVICTION_SHARE = 8


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
    min_batch_bucket: int = 8                 # fewest rows a compiled step group has: fewer compiles vs work
    row_buckets_per_doubling: int = 1         # row bucket sizes per power of two in large groups (step_batch)
    scheduler: str = "unified"                # "phased": every request verifies on the same step
    sync_host: bool = False                   # read each step's results before planning the next
    host_kv_tokens: int = 65536               # host memory pool for offloaded KV (0: preempt and recompute)
    tensor_parallel: int = 1                  # devices one engine's heads are split over (sharding.py)
    unroll_layers: bool = False               # trace every layer into the step (see Transformer)
    burst_steps: int | None = None            # decode steps per jitted call in steady state (decode_burst.py);
                                              # None: auto_burst_steps (8 on GPUs, else 1)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_size", "kv_cache_tokens", "page_size", "max_num_batched_tokens",
                     "prefill_chunk_size", "min_context_bucket", "min_batch_bucket", "row_buckets_per_doubling",
                     "tensor_parallel", "burst_steps"):
            value = getattr(self, name)
            if name == "burst_steps" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not isinstance(self.host_kv_tokens, int) or self.host_kv_tokens < 0:
            raise ValueError(f"host_kv_tokens: must be an integer >= 0, got {self.host_kv_tokens!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_batch_size ({self.max_batch_size}) so every running request can decode")
        if self.scheduler not in SCHEDULER_MODES:
            raise ValueError(f"scheduler: must be one of {SCHEDULER_MODES}, got {self.scheduler!r}")
        check_backend_name(self.attention_backend)


@jax.jit
def _read_set(sets: DraftSets, slot):
    """One slot's draft set (positions, count), as one program rather than an eager op per field."""
    return sets.positions[slot], sets.count[slot]


@functools.partial(jax.jit, donate_argnames=("sets",))
def _write_set(sets: DraftSets, slot, positions, count) -> DraftSets:
    return DraftSets(positions=sets.positions.at[slot].set(positions), count=sets.count.at[slot].set(count))


@functools.partial(jax.jit, donate_argnames=("window",))
def _write_newest(window, slot, token):
    return window.at[slot, 0].set(token)


def _weak_callback(method: Callable) -> Callable:
    """An engine method for the scheduler to call that does not keep the engine alive: a reference cycle would
    hold the engine's KV pool until Python's next full garbage collection, so a process making engine after
    engine (benchmarks, tests, RL loops) could run out of device memory first."""
    method = weakref.WeakMethod(method)
    return lambda *args: method()(*args)


@jax.jit
def _copy_out(outputs):
    """A call's outputs (SlotState.emitted, BurstCounters.outputs), copied out of the donated state that the
    next call will overwrite."""
    return jnp.copy(outputs)


@dataclasses.dataclass
class _InFlight:
    """A dispatched step whose emitted tokens the host has not read yet."""

    plan: StepPlan
    emitted: jax.Array       # SlotState.emitted after the step


@dataclasses.dataclass
class _BurstInFlight:
    """A dispatched burst whose outputs the host has not read yet."""

    plan: BurstPlan
    outputs: jax.Array       # BurstCounters.outputs after the burst
    metrics: StepMetrics     # its iteration's, corrected on read to the rows that ran


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
        k = spec.k if spec.speculative else 0
        if self.max_model_len + k > pool_tokens:
            raise ValueError(f"kv_cache_tokens ({config.kv_cache_tokens}) must hold at least one full-length "
                             f"request (max_model_len {self.max_model_len} + {k} speculative slots); "
                             f"raise it or lower max_model_len")
        if config.max_num_batched_tokens < k + 1:
            raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must fit one verify "
                             f"row of k + 1 = {k + 1} tokens")
        self.limits = BucketLimits(max_rows=config.max_batch_size, max_tokens=config.max_num_batched_tokens,
                                   max_q_len=config.prefill_chunk_size,
                                   max_pages=-(-(self.max_model_len + k) // config.page_size),
                                   page_size=config.page_size,
                                   min_pages=-(-config.min_context_bucket // config.page_size),
                                   min_rows=config.min_batch_bucket,
                                   rows_per_doubling=config.row_buckets_per_doubling)
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | frozenset(tokenizer.eos_token_ids)

        self.mesh = make_mesh(cfg, config.tensor_parallel)
        model = Transformer(cfg, place_params(cfg, params, self.mesh, dtype), dtype,
                            unroll_layers=config.unroll_layers)
        self.graphdef, self.state = nnx.split(model)
        self._step_fn = make_step_fn(self.graphdef, spec, self.backend)
        if config.burst_steps is not None and config.burst_steps > 1 and spec.method == "ngram":
            raise ValueError("burst_steps: n-gram drafts are proposed by the host at every step; decode bursts "
                             "need drafts made on the device (pillar, streaming) or none (method none)")
        self.burst_steps = config.burst_steps or auto_burst_steps(
            self.mesh.devices.flat[0].platform, spec.method, config.sync_host, config.scheduler)
        self._burst_fn = make_burst_fn(self.graphdef, spec, self.backend) if self.burst_steps > 1 else None
        # Every jitted program an iteration may run. Offloading and restoring compile theirs on first use, inside
        # an iteration like a new step shape does, so an iteration is flagged as compiling if any of them grew.
        self._programs = (self._step_fn, _copy_out, offload_chunks, restore_chunks, _read_set, _write_set,
                          _write_newest) + ((self._burst_fn, seed_counters) if self._burst_fn else ())
        self.kv = create_on_mesh(lambda: KVCache.create(cfg, num_pages, config.page_size, dtype), self.mesh)
        self.allocator = PageAllocator(num_pages, config.page_size)
        self.width = k + 1
        capacity = spec.max_budget(self.max_model_len) + spec.k

        def slot_state() -> SlotState:
            sets = None
            if spec.drafts_with_model:
                sets = DraftSets.create(config.max_batch_size + 1, cfg.num_layers, cfg.num_kv_heads, capacity)
            return SlotState.create(config.max_batch_size + 1, k, cfg.vocab_size, sets)

        self.slot_state = create_on_mesh(slot_state, self.mesh)
        num_slots = config.max_batch_size + 1
        if self._burst_fn is not None:
            self.counters = create_on_mesh(lambda: BurstCounters.create(num_slots, k, self.burst_steps), self.mesh)
        # The host's copy of the burst counters (decode_burst.py): newest as of the last burst read, the others
        # as of the last one dispatched; verifies dispatched but not read bound each request's growth.
        self._burst_newest = np.zeros(num_slots, np.int64)
        self._burst_draft_index = np.zeros(num_slots, np.int64)
        self._burst_sit_out = np.zeros(num_slots, np.int64)
        self._burst_unread = np.zeros(num_slots, np.int64)
        self._in_burst = False               # the device counters, not the slot table, hold the running cycles
        self._next_burst_try = 0             # step index before which entering bursts is not tried again
        self.host_kv = HostKVPool(config.host_kv_tokens, config.page_size)
        policy = CyclePolicy(k=k, drafts_with_model=spec.drafts_with_model, mode=config.scheduler,
                             stall_steps=0 if config.sync_host else 1, draft_min_context=spec.draft_min_context,
                             propose=functools.partial(propose_ngram, ngram_max=spec.ngram_max,
                                                       ngram_min=spec.ngram_min))
        self.scheduler = Scheduler(self.allocator, config.max_batch_size, config.max_num_batched_tokens,
                                   config.prefill_chunk_size, self.max_model_len, self.limits.max_pages, policy,
                                   evict=_weak_callback(self._offload), restore=_weak_callback(self._restore),
                                   restore_reserve=_weak_callback(self._restore_reserve) if self._burst_fn else None)
        self.table = self.scheduler.table
        self.metrics = StepLog()
        self.num_restores = 0
        self.acceptance_counts = np.zeros(k + 1, np.int64)   # verifies (rows with drafts) by drafts accepted
        self._in_flight: _InFlight | None = None
        # Per iteration: seconds blocked on results, tokens read, seconds inside the jitted call.
        self._waited, self._taken, self._dispatch_s = 0.0, 0, 0.0
        self._num_requests = 0
        self.num_steps = 0

    # -- KV offload ------------------------------------------------------------------------------------
    def _offload(self, request: Request) -> bool:
        """Move a request's committed KV (and draft set) to host memory if the host pool has room."""
        slot = request.slot
        num_pages = math.ceil(int(self.table.computed[slot]) / self.config.page_size)
        if not self.host_kv.fits(num_pages):
            return False
        sets = _read_set(self.slot_state.sets, slot) if self.table.has_sets[slot] else None
        request.offloaded_kv = self.host_kv.offload(self.kv, self.table.pages(slot)[:num_pages].tolist(), sets)
        request.stats.offloads += 1
        return True

    def _restore(self, request: Request) -> None:
        record, request.offloaded_kv = request.offloaded_kv, None
        self.kv, saved_set = self.host_kv.restore(self.kv, record, self.table.pages(request.slot).tolist())
        state = self.slot_state
        sets = state.sets if saved_set is None else _write_set(state.sets, request.slot, *saved_set)
        window = _write_newest(state.window, request.slot, request.token_slice(request.num_tokens - 1,
                                                                                request.num_tokens)[0])
        self.slot_state = dataclasses.replace(state, window=window, sets=sets)
        self.table.window_ready[request.slot] = True
        self.num_restores += 1

    def admit_prefilled(self, prompt_ids: list[int], params: SamplingParams, reserve_tokens: int) -> Request:
        """Admit a request whose prompt K/V already sit in its pages (all but the newest token, which the next
        step feeds), with pages for `reserve_tokens` more. Steady-state benchmarks fill the pool themselves
        instead of prefilling; the request then decodes like any other."""
        request = self.add_request(prompt_ids, params)
        self.scheduler.waiting.remove(request)
        request.num_computed = len(prompt_ids) - 1
        self.scheduler.admit(request)
        self.table.grow(np.array([request.slot]), np.array([len(prompt_ids) + reserve_tokens]))
        state = self.slot_state
        self.slot_state = dataclasses.replace(state, window=_write_newest(state.window, request.slot,
                                                                          prompt_ids[-1]))
        self.table.window_ready[request.slot] = True
        return request

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
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        request = Request(request_id if request_id is not None else str(index), prompt, prompt_ids, params,
                          detok, seed, stop_ids)
        self.scheduler.add(request)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one iteration ---------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one engine iteration; return the requests whose completion the host learned of in it."""
        started, compilations = time.perf_counter(), self._compilations()
        self._waited, self._taken, self._dispatch_s = 0.0, 0, 0.0
        finished: list[Request] = []
        if self._burst_fn is not None and (self._in_burst or self._burst_candidate()):
            if not self._in_burst and self._in_flight is not None and self._entry_fits():
                finished += self._settle()              # entering needs every request's counters on the host
            burst = None
            if self._in_burst or self._in_flight is None:
                burst, settled = self._plan_burst()
                finished += settled
            if burst is not None:
                metrics = self._burst_metrics(burst)
                finished += self._run_burst(burst, metrics)
                self._record_burst(started, metrics, compilations)
                return finished
            # Blocked by an admission or a restore: retry as soon as every request decodes steadily again;
            # otherwise (pages short, or the batch not steady) after a cycle of single steps.
            if not self._burst_blocked():
                self._next_burst_try = self.scheduler.step_index + self.scheduler.policy.cycle_length
            if self._in_burst:
                finished += self._leave_bursts()
        if self._in_flight is not None and self.scheduler.pages_short():
            finished += self._settle()                  # evicting needs every request's state on the host
        moves = self._moves()
        plan = self.scheduler.schedule()
        if plan is None:
            if self._in_flight is not None:
                finished += self._settle()              # everyone waits for the step in flight
            elif self.scheduler.has_unfinished() and self._moves() == moves:
                raise RuntimeError("scheduler made no progress: the KV pool cannot hold the next request")
            # A step that only evicted and restored requests (the only ready request was the newest and made
            # room by leaving) plans rows at the next one.
            self._record(started, plan, compilations)
            return finished
        batch = build_unified_batch(plan, self.table, self.limits, self.width, self.config.max_batch_size)
        buffer, layout = pack((batch,
                               self._sampling_arrays(plan.slot[plan.kind == RowKind.DRAFT], batch.drafts.slot.shape[0]),
                               self._sampling_arrays(plan.slot[plan.emits], batch.emits.slot.shape[0])))
        dispatched = time.perf_counter()
        self.kv, self.slot_state = self._step_fn(self.state, self.kv, self.slot_state, buffer, layout)
        emitted = _copy_out(self.slot_state.emitted)
        self._dispatch_s = time.perf_counter() - dispatched
        emitted.copy_to_host_async()
        self.scheduler.apply(plan)
        self.num_steps += 1
        previous, self._in_flight = self._in_flight, _InFlight(plan, emitted)
        if previous is not None:
            finished += self._read(previous)            # step t-1 while step t runs
        if self.config.sync_host:
            finished += self._settle()
        self._record(started, plan, compilations)
        return finished

    # -- decode bursts (decode_burst.py) ---------------------------------------------------------------
    def _burst_blocked(self) -> bool:
        """Whether the scheduler has work a burst cannot do: restoring a request that fits now, or admitting
        one (offloaded requests come first). An offloaded request that does not fit yet waits either way."""
        scheduler = self.scheduler
        return scheduler.can_restore() or bool(scheduler.waiting and scheduler.free_slots and not scheduler.offloaded)

    def _burst_candidate(self) -> bool:
        """Whether every running request is decoding in the steady state a burst continues: past its prompt,
        with a draft set and a phase (model drafts) and drafting from here on. A cycle the host shortened (a
        first cycle reaching its phase, a last one reaching the length limit) goes on to k drafts on the
        device: the tokens are the same, the verify comes later. Checked on the table as planned (before a
        settle)."""
        table, k = self.table, self.width - 1
        slots = np.flatnonzero(table.active)
        if not len(slots) or self.scheduler.step_index < self._next_burst_try or self._burst_blocked():
            return False
        steady = ~table.prefilling(slots)
        if k:
            steady &= table.has_sets[slots] & (table.phase[slots] >= 0)
            steady &= table.computed[slots] >= self.scheduler.policy.draft_min_context
        return bool(steady.all())

    def _entry_counters(self, slots: np.ndarray):
        """The cycle counters a burst entered now starts from, read from the slot table (exact once settled),
        with the phases balanced for the burst's shorter cycle (phased scheduling keeps its verifies aligned):
        (newest, draft_index, sit_out)."""
        table, k = self.table, self.width - 1
        draft_index = np.maximum(table.draft_index[slots], 0) if k else np.zeros(len(slots), np.int64)
        sit_out = np.maximum(table.resume_step[slots] - self.scheduler.step_index, 0)
        if self.config.scheduler == "unified":
            sit_out = sit_out + balance_phases(draft_index, sit_out, k)
        return table.computed[slots], draft_index, sit_out

    def _burst_tokens(self, slots, newest, draft_index, sit_out, unread):
        """The burst's cycles from these counters and the tokens each request can reach by its end, every draft
        accepted (`unread`: its verifies in bursts not read yet): (advance_cycles' four results, tokens)."""
        k = self.width - 1
        cycles = advance_cycles(draft_index, sit_out, k, self.burst_steps)
        return cycles, newest + (k + 1) * (unread + cycles[0].sum(0) + 1)   # and the cycle after

    def _pages_short(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Pages each slot still needs for a burst reaching `tokens` (its length limit caps what it keeps)."""
        return self.table.pages_short_of(slots, np.minimum(tokens, self.table.cap[slots]))

    def _burst_victims(self, slots: np.ndarray, newest: np.ndarray, tokens: np.ndarray) -> int | None:
        """How many of the newest requests (`slots` oldest first, committed up to `newest`) to offload so that
        a burst reaching `tokens` fits the pool: 0 when it fits; None when that takes more than
        1 / BURST_EVICTION_SHARE of the batch or more than the host pool holds (recomputing a preempted request
        to keep bursting would cost more than single steps do)."""
        short = self._pages_short(slots, tokens)
        need, free = int(short.sum()), self.allocator.num_free
        host_pages = 0
        for count in range(max(1, len(slots) // BURST_EVICTION_SHARE) + 1):
            if need <= free:
                return count
            if count == len(slots) - 1:
                return None
            victim = len(slots) - 1 - count
            need -= int(short[victim])
            free += int(self.table.num_pages[slots[victim]])
            host_pages += -(-int(newest[victim]) // self.config.page_size)
            if not self.host_kv.fits(host_pages):
                return None
        return None

    def _offload_for_burst(self, slots: np.ndarray, victims: int) -> None:
        """Offload the `victims` newest of the running requests (all read) to make room for a burst. Inside
        bursts the slot table learns their committed positions first, as on leaving bursts."""
        if self._in_burst:
            self._commit_burst_positions(slots[len(slots) - victims:])
        for _ in range(victims):
            self.scheduler.evict_newest()

    def _restore_into_burst(self) -> None:
        """Restore offloaded requests that fit without leaving bursts: each starts a cycle on the device from
        its newest token, sitting out until the least loaded verify phase. Only requests whose prompt is done
        and that have a draft set (model drafts) can; the others wait for single steps."""
        scheduler, k = self.scheduler, self.width - 1
        while scheduler.can_restore():
            request = scheduler.offloaded[0]
            if request.num_computed != request.num_tokens - 1 or (k and not (
                    request.has_sets and request.num_computed >= scheduler.policy.draft_min_context)):
                return
            slots = np.flatnonzero(self.table.active)
            phases = (self._burst_sit_out[slots] + k - self._burst_draft_index[slots]) % (k + 1)
            sit_out = (int(np.argmin(np.bincount(phases, minlength=k + 1))) - k) % (k + 1)
            slot = scheduler.restore_oldest().slot
            self._burst_newest[slot], self._burst_unread[slot] = request.num_computed, 0
            self._burst_draft_index[slot], self._burst_sit_out[slot] = 0, sit_out
            self.counters = seed_counters(self.counters, *(np.array([value], np.int32) for value in
                                                           (slot, request.num_computed, 0, sit_out)))

    def _moves(self) -> tuple[int, int, int]:
        """Requests moved out of or back into slots so far (offloads, preemptions, restores)."""
        return self.scheduler.num_offloads, self.scheduler.num_preemptions, self.num_restores

    def _restore_reserve(self, request: Request) -> int:
        """Pages a restore must leave free while bursts are on: the next burst's growth of the running requests
        and of the restored one beyond its first cycle, every draft accepted. A restore into less would make
        the next burst offload again, and the restored request first, since it is the newest."""
        k = self.width - 1
        growth = (k + 1) * (-(-self.burst_steps // (k + 1)) + 1)
        reserve = (self.allocator.pages_needed(request.num_computed + growth, 0)
                   - self.allocator.pages_needed(request.num_computed + k + 1, 0))
        slots = np.flatnonzero(self.table.active)
        if not len(slots):
            return reserve
        if self._in_burst:
            counters = (self._burst_newest[slots], self._burst_draft_index[slots], self._burst_sit_out[slots],
                        self._burst_unread[slots])
        else:
            counters = (*self._entry_counters(slots), 0)
        return reserve + int(self._pages_short(slots, self._burst_tokens(slots, *counters)[1]).sum())

    def _entry_fits(self) -> bool:
        """Whether the pool could hold a burst entered now, after the offloads _burst_victims allows, judged
        before settling the step in flight (its outcomes can only raise the need; pages its finished requests
        free count at the next try): entering settles the pipeline, which is wasted if pages are short."""
        slots = np.flatnonzero(self.table.active)
        slots = slots[np.argsort(self.table.admitted[slots])]
        newest, draft_index, sit_out = self._entry_counters(slots)
        tokens = self._burst_tokens(slots, newest, draft_index, sit_out, 0)[1]
        return self._burst_victims(slots, newest, tokens) is not None

    def _plan_burst(self) -> tuple[BurstPlan | None, list[Request]]:
        """Plan the next burst and grant its pages: (plan, requests finished meanwhile). The plan is None when
        the batch is not in steady decoding, or when the pool cannot hold every request's worst case over the
        burst even after the offloads _burst_victims allows (single steps then evict as they need). Inside
        bursts, a burst that does not fit reads the one in flight first (its outcomes may shrink the need,
        and offloading needs them read)."""
        table, finished = self.table, []
        if self._in_burst:
            self._restore_into_burst()
        if self._burst_blocked():
            return None, finished
        while True:
            slots = np.flatnonzero(table.active)
            if not len(slots):
                return None, finished
            slots = slots[np.argsort(table.admitted[slots])]
            if not self._in_burst:
                if not self._burst_candidate() or table.awaiting[slots].any() or table.pending[slots].any():
                    return None, finished
                newest, draft_index, sit_out = self._entry_counters(slots)
                unread = np.zeros(len(slots), np.int64)
            else:
                newest, draft_index, sit_out, unread = (self._burst_newest[slots], self._burst_draft_index[slots],
                                                        self._burst_sit_out[slots], self._burst_unread[slots])
            cycles, tokens = self._burst_tokens(slots, newest, draft_index, sit_out, unread)
            victims = self._burst_victims(slots, newest, tokens) if self._in_flight is None else \
                int(self._pages_short(slots, tokens).sum() > self.allocator.num_free)
            if victims is None:
                return None, finished
            if not victims:
                break
            if self._in_flight is not None:
                finished += self._settle()
            else:
                self._offload_for_burst(slots, victims)
        verifies, drafts, next_draft_index, next_sit_out = cycles
        table.grow(slots, np.minimum(tokens, table.cap[slots]))
        if not self._in_burst:      # padded to a row bucket (the spare slot takes the padding): few compiles
            entries, spare = self.limits.rows(len(slots)), self.config.max_batch_size
            self.counters = seed_counters(self.counters, rows_array(slots, spare, entries),
                                          rows_array(newest, 0, entries), rows_array(draft_index, 0, entries),
                                          rows_array(sit_out, 0, entries))
            self._burst_newest[slots] = newest
            self._burst_unread[slots] = 0
            self._in_burst = True
        self._burst_unread[slots] += verifies.sum(0)
        self._burst_draft_index[slots], self._burst_sit_out[slots] = next_draft_index, next_sit_out
        return BurstPlan(slot=slots, generation=table.generation[slots], verifies=verifies, drafts=drafts,
                         tokens_bound=tokens), finished

    def _run_burst(self, plan: BurstPlan, metrics: StepMetrics) -> list[Request]:
        """Dispatch a planned burst, then read the one before it while this one runs."""
        table, limits, k = self.table, self.limits, self.width - 1
        spare = self.config.max_batch_size
        entries = limits.rows(len(plan.slot))
        slot = rows_array(plan.slot, spare, entries)
        num_pages = limits.pages(min(-(-int(plan.tokens_bound.max()) // limits.page_size), limits.max_pages))
        inputs = BurstInputs(slot=slot, cap=rows_array(table.cap[plan.slot], 0, entries),
                             page_tables=table.page_table[slot, :num_pages],
                             sampling=self._sampling_arrays(plan.slot, entries),
                             verify_rows=limits.rows(int(plan.verifies.sum(1).max()), tokens_per_row=k + 1))
        buffer, layout = pack(inputs)
        dispatched = time.perf_counter()
        self.kv, self.slot_state, self.counters = self._burst_fn(
            self.state, self.kv, self.slot_state, self.counters, buffer, layout, plan.steps)
        outputs = _copy_out(self.counters.outputs)
        self._dispatch_s = time.perf_counter() - dispatched
        outputs.copy_to_host_async()
        table.steps[plan.slot] += plan.steps
        self.scheduler.step_index += plan.steps
        self.num_steps += plan.steps
        previous, self._in_flight = self._in_flight, _BurstInFlight(plan, outputs, metrics)
        finished = self._read_burst(previous) if previous is not None else []
        if self.config.sync_host:
            finished += self._settle()
        return finished

    def _read_burst(self, in_flight: _BurstInFlight) -> list[Request]:
        """Consume a burst's outputs: each request's tokens over its sub-steps, in order."""
        waited = time.perf_counter()
        outputs = np.asarray(in_flight.outputs)
        self._waited += time.perf_counter() - waited
        plan, table = in_flight.plan, self.table
        valid = plan.generation == table.generation[plan.slot]    # else finished since: stale
        slots = plan.slot[valid]
        counts = outputs[:, slots, 0].T.astype(np.int64)           # [A, steps]
        emitted = counts.sum(1)
        self._count_burst_rows(in_flight, valid, counts)
        self._burst_newest[slots] += emitted
        self._burst_unread[slots] -= plan.verifies[:, valid].sum(0)
        if self.width > 1:
            verified = counts > 0
            self.acceptance_counts += np.bincount(counts[verified] - 1, minlength=len(self.acceptance_counts))
            verifies = verified.sum(1)
            table.verifies[slots] += verifies
            table.drafted[slots] += verifies * (self.width - 1)
            table.accepted[slots] += emitted - verifies
        else:
            table.decodes[slots] += emitted
        if not len(slots):
            return []
        read = (np.arange(self.width) < counts[:, :, None]).reshape(len(slots), -1)   # [A, steps * (k + 1)]
        tokens = outputs[:, slots, 1:].transpose(1, 0, 2).reshape(read.shape)
        return self._take_tokens(slots, emitted, tokens[read])

    def _count_burst_rows(self, in_flight: _BurstInFlight, valid: np.ndarray, counts: np.ndarray) -> None:
        """Replace the planned row counts of a burst's metrics by the rows that ran: a request stops taking
        rows once its newest token reaches its limit, which the host learns only from the outputs."""
        plan, metrics = in_flight.plan, in_flight.metrics
        slots = plan.slot[valid]
        newest = self._burst_newest[slots][:, None] + np.cumsum(counts, axis=1) - counts   # before each sub-step
        live = (newest + 1 < self.table.cap[slots][:, None]).T                              # [steps, A]
        self._set_burst_rows(metrics, plan.verifies[:, valid] & live, plan.drafts[:, valid] & live)

    def _set_burst_rows(self, metrics: StepMetrics, verifies: np.ndarray, drafts: np.ndarray) -> None:
        """A burst's row counts from its [steps, A] verify and draft masks (verify rows are plain decodes
        without drafts)."""
        num_verifies, num_drafts, k = int(verifies.sum()), int(drafts.sum()), self.width - 1
        metrics.tokens = num_verifies * (k + 1) + num_drafts
        metrics.draft_rows = num_drafts
        metrics.verify_rows, metrics.decode_rows = (num_verifies, 0) if k else (0, num_verifies)

    def _commit_burst_positions(self, slots: np.ndarray) -> None:
        """Tell the slot table where the slots' requests stand after the bursts read so far: committed up to
        their newest token, nothing in flight."""
        table, newest = self.table, self._burst_newest[slots]
        table.computed[slots], table.total[slots] = newest, newest + 1
        table.pending[slots], table.awaiting[slots] = 0, False

    def _leave_bursts(self) -> list[Request]:
        """Read every burst in flight and hand the running cycles back to the slot table."""
        finished = self._settle() if self._in_flight is not None else []
        self._in_burst = False
        table, k = self.table, self.width - 1
        slots = np.flatnonzero(table.active)
        newest, draft_index = self._burst_newest[slots], self._burst_draft_index[slots]
        self._commit_burst_positions(slots)
        table.cycle_start[slots] = newest
        table.draft_index[slots] = np.where(draft_index > 0, draft_index, -1)
        table.cycle_drafts[slots] = np.where(draft_index > 0, k, 0)
        table.resume_step[slots] = self.scheduler.step_index + self._burst_sit_out[slots]
        # The host's cycles are longer (they sit out after each verify): a request in mid-cycle keeps the phase
        # its verify lands on; one between cycles picks a phase again, as a new request does.
        verify_step = table.resume_step[slots] + k - draft_index
        table.phase[slots] = np.where(draft_index > 0, verify_step % self.scheduler.policy.cycle_length, -1)
        return finished

    def _burst_metrics(self, plan: BurstPlan) -> StepMetrics:
        """A burst's iteration metrics with its planned rows (corrected on read); timing filled at its end."""
        metrics = StepMetrics(step=self.num_steps, host_ms=0.0, dispatch_ms=0.0, wait_ms=0.0, step_ms=0.0,
                              tokens=0, prefill_rows=0, draft_rows=0, verify_rows=0, decode_rows=0, emitted_tokens=0,
                              kv_tokens_used=0, kv_tokens_offloaded=0, decode_steps=plan.steps)
        self._set_burst_rows(metrics, plan.verifies, plan.drafts)
        return metrics

    def _record_burst(self, started: float, metrics: StepMetrics, compilations: int) -> None:
        elapsed = (time.perf_counter() - started) * 1e3
        metrics.host_ms, metrics.dispatch_ms = elapsed - self._waited * 1e3, self._dispatch_s * 1e3
        metrics.wait_ms, metrics.step_ms, metrics.emitted_tokens = self._waited * 1e3, elapsed, self._taken
        metrics.kv_tokens_used = (self.allocator.num_pages - 1 - self.allocator.num_free) * self.config.page_size
        metrics.kv_tokens_offloaded = self.host_kv.used_tokens
        metrics.compiled = self._compilations() > compilations
        self.metrics.add(metrics)

    def _compilations(self) -> int:
        """Programs compiled so far by the jitted functions an iteration may call."""
        return sum(program._cache_size() for program in self._programs)

    def _record(self, started: float, plan: StepPlan | None, compilations: int) -> None:
        """Log the iteration; `compilations`: _compilations() when it started."""
        elapsed = (time.perf_counter() - started) * 1e3
        compiled = self._compilations() > compilations
        counts = np.bincount(plan.kind, minlength=len(RowKind)) if plan is not None else np.zeros(len(RowKind))
        verifies = int(np.count_nonzero(plan.verifies)) if plan is not None else 0
        self.metrics.add(StepMetrics(
            step=self.num_steps, host_ms=elapsed - self._waited * 1e3, dispatch_ms=self._dispatch_s * 1e3,
            wait_ms=self._waited * 1e3,
            step_ms=elapsed, tokens=int(plan.num_tokens.sum()) if plan is not None else 0,
            prefill_rows=int(counts[RowKind.PREFILL]), draft_rows=int(counts[RowKind.DRAFT]),
            verify_rows=verifies, decode_rows=int(counts[RowKind.VERIFY]) - verifies, emitted_tokens=self._taken,
            kv_tokens_used=(self.allocator.num_pages - 1 - self.allocator.num_free) * self.config.page_size,
            kv_tokens_offloaded=self.host_kv.used_tokens, compiled=compiled, decode_steps=int(plan is not None)))

    def _settle(self) -> list[Request]:
        """Read the step in flight (blocking) so every request's state is known to the host."""
        in_flight, self._in_flight = self._in_flight, None
        if isinstance(in_flight, _BurstInFlight):
            return self._read_burst(in_flight)
        return self._read(in_flight)

    def _read(self, in_flight: _InFlight) -> list[Request]:
        """Consume a dispatched step's emitted tokens; returns the requests that finished."""
        waited = time.perf_counter()
        outputs = np.asarray(in_flight.emitted)
        self._waited += time.perf_counter() - waited
        plan, table = in_flight.plan, self.table
        rows = np.flatnonzero(plan.emits)                 # emitting rows, in the order the batch lists them
        slots = plan.slot[rows]
        outputs = outputs[slots]
        emitted = outputs[:, 0].astype(np.int64)
        tokens = outputs[:, 1:]
        valid = plan.generation[rows] == table.generation[slots]   # else finished or evicted since: stale
        stalls = plan.stalls[rows]
        stalled, flowing = valid & stalls, valid & ~stalls
        table.awaiting[slots[stalled]] = False
        table.computed[slots[stalled]] = plan.cycle_start[rows[stalled]] + emitted[stalled]
        table.total[slots[stalled]] += emitted[stalled]
        table.pending[slots[flowing]] -= 1
        # A VERIFY row without drafts verified nothing: it is a plain decode and must not dilute acceptance.
        verify_or_decode = valid & (plan.kind[rows] == RowKind.VERIFY)
        verifying = plan.verifies[rows]
        verified = np.flatnonzero(valid & verifying)
        self.acceptance_counts += np.bincount(emitted[verified] - 1, minlength=len(self.acceptance_counts))
        table.verifies[slots[verified]] += 1                         # slots differ: one row each
        table.drafted[slots[verified]] += plan.num_drafts[rows[verified]]
        table.accepted[slots[verified]] += emitted[verified] - 1
        table.decodes[slots[verify_or_decode & ~verifying]] += 1
        emitted, tokens = emitted[valid], tokens[valid]
        return self._take_tokens(slots[valid], emitted, tokens[np.arange(tokens.shape[1]) < emitted[:, None]])

    def _take_tokens(self, slots: np.ndarray, emitted: np.ndarray, tokens: np.ndarray) -> list[Request]:
        """Append to the request in each slots[i] its emitted[i] tokens, which follow each other in `tokens`
        (slot after slot); returns the requests that finished.

        Which requests may finish now (a stop token among their tokens, the length limit reached, stop strings
        to match) is found for all at once; only those take _append_tokens, the others just extend their
        outputs."""
        table, requests, now = self.table, self.table.requests, time.perf_counter()
        self._taken += int(emitted.sum())
        owner = np.repeat(np.arange(len(slots)), emitted)            # each token's index into slots
        stop_hit = (tokens[:, None] == table.stop_tokens[slots[owner]]).any(1)
        may_finish = (np.bincount(owner[stop_hit], minlength=len(slots)) > 0) | table.stop_strings[slots] | \
            (emitted >= table.cap[slots] - table.recorded[slots])
        table.recorded[slots] += emitted
        first = slots[table.before_first_token[slots] & (emitted > 0)]
        for slot in first.tolist():
            requests[slot].stats.first_token_time = now
        table.before_first_token[first] = False
        ends = np.cumsum(emitted)
        finished, tokens = [], tokens.tolist()
        for slot, start, end, finishing in zip(slots.tolist(), (ends - emitted).tolist(), ends.tolist(),
                                               may_finish.tolist()):
            request = requests[slot]
            if not finishing:
                request.output_ids.extend(tokens[start:end])
            elif self._append_tokens(request, tokens[start:end], now):
                finished.append(request)
        return finished

    def _sampling_arrays(self, slots: np.ndarray, num_rows: int) -> SamplingArrays:
        table = self.table
        temperature = rows_array(table.temperature[slots], 0, num_rows, np.float32)
        top_p = rows_array(table.top_p[slots], 1, num_rows, np.float32)
        top_k = rows_array(table.top_k[slots], 0, num_rows, np.int32)
        return SamplingArrays(temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=rows_array(table.seed[slots], 0, num_rows, np.uint32),
                              cut=truncation_cut(temperature, top_k, top_p))

    def _append_tokens(self, request: Request, tokens: list[int], now: float) -> bool:
        """Record sampled tokens up to the first stop condition (stop token, stop string, length); finish the
        request if one was met. Returns True if finished."""
        room = min(request.params.max_tokens - len(request.output_ids), self.max_model_len - request.num_tokens)
        keep = min(len(tokens), room)
        reason = "length" if keep == room else None
        for i in range(keep):
            if tokens[i] in request.stop_ids:
                keep, reason = i + 1, "stop"
                break
        detokenizer = request.detokenizer
        before = len(request.output_ids)
        if detokenizer.matches_stop_strings:           # else the text is decoded once, when the request ends
            detokenizer.push(tokens[:keep])
            if detokenizer.stopped:
                keep, reason = detokenizer.num_tokens_to_keep - before, "stop"
        request.output_ids.extend(tokens[:keep])
        if reason is None:
            return False
        if not detokenizer.matches_stop_strings:
            detokenizer.push(request.output_ids)
        detokenizer.finish()
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
        self.drain()

    def drain(self) -> None:
        """Read what is still in flight once every request has finished. A burst dispatched before the host
        learned that its requests had finished leaves outputs nobody takes; reading them corrects its metrics."""
        if self._in_flight is not None and not self.has_unfinished():
            self._settle()
