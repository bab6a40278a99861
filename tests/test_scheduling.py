"""Scheduling behaviour on a tiny random model (fast): staggered vs phased batches, eviction bookkeeping and the
row buckets a step is padded to."""

from __future__ import annotations

import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import generate, run_requests, unaccounted_tokens
import sparsespec_jax.engine as engine_module
from sparsespec_jax.benchmark.shapes import placeholder_tokenizer
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig
from sparsespec_jax.step_batch import BucketLimits, bucket

TINY = ModelConfig(arch="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True, max_position_embeddings=512)
K = 4


@pytest.fixture(scope="module")
def tiny_params():
    return {name: np.asarray(value) * (1.0 if name.endswith("norm") else 3.0)
            for name, value in random_params(TINY, seed=5, dtype=jnp.float32).items()}


def make(tiny_params, tokenizer, method="pillar", draft_min_context=0, **fields) -> Engine:
    config = dict(max_batch_size=16, kv_cache_tokens=4096, max_model_len=256, page_size=8, prefill_chunk_size=32,
                  max_num_batched_tokens=16 * (K + 1), min_context_bucket=256, min_batch_bucket=16)
    return Engine(TINY, tiny_params, tokenizer, EngineConfig(**{**config, **fields}),
                  SpecConfig(method=method, k=K, min_budget=8, budget_ratio=0.1, draft_min_context=draft_min_context))


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, int(rng.integers(4, 30))).tolist() for _ in range(count)]


def steady_state_verify_counts(engine: Engine, num_requests: int) -> list[int]:
    generate(engine, prompts(num_requests), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    steps = [s for s in engine.metrics.steps if s.prefill_rows == 0]
    middle = steps[len(steps) // 4: 3 * len(steps) // 4]           # all requests decoding, none finished
    return [s.verify_rows + s.decode_rows for s in middle]


@pytest.mark.slow
def test_unified_batches_stay_flat_while_phased_ones_oscillate(tiny_params, smollm2):
    unified = steady_state_verify_counts(make(tiny_params, smollm2.tokenizer), 16)
    phased = steady_state_verify_counts(make(tiny_params, smollm2.tokenizer, scheduler="phased"), 16)
    # Phased: every request verifies on the same step and drafts on the others.
    assert max(phased) >= 12 and min(phased) == 0
    # Unified: about 1/(k+2) of the 16 requests verify at every step.
    assert max(unified) <= 6 and min(unified) >= 1, unified


@pytest.mark.parametrize("sync_host", [False, True])
def test_a_batch_admitted_at_once_verifies_evenly_in_every_phase(tiny_params, smollm2, sync_host):
    """16 requests start decoding on the same step. Running ahead a cycle is k drafts, the verify and a step
    sat out (k + 2 phases), and no first cycle with drafts can reach the phase k + 1 steps ahead: the
    requests that decode one plain token first must be counted there, or that phase stays empty."""
    engine = make(tiny_params, smollm2.tokenizer, sync_host=sync_host)
    place_at_context(engine, 16, 64, 100, seed=0)
    length = engine.scheduler.policy.cycle_length
    for _ in range(3 * length):
        engine.step()
    verifies = [s.verify_rows for s in engine.metrics.steps[length:]]
    assert min(verifies) >= 16 // length and max(verifies) <= -(-16 // length), verifies


def test_a_verify_read_early_still_sits_out_its_step(tiny_params, smollm2):
    """Running ahead, the step that evicts waits for the step in flight first, which reads that step's verifies
    a step early. Those requests must still sit out their stall step: starting their next cycle at once would
    move their verifies onto the next phase's, one step verifying two phases' requests and the next none."""
    engine = make(tiny_params, smollm2.tokenizer, kv_cache_tokens=16 * 76, host_kv_tokens=4096)
    place_at_context(engine, 16, 64, 100, seed=0, reserve=0)      # pages run short within three cycles
    length = engine.scheduler.policy.cycle_length
    for _ in range(8 * length):
        engine.step()
    assert engine.scheduler.num_offloads > 0
    verifies = [s.verify_rows for s in engine.metrics.steps[length:]]
    assert min(verifies) >= 16 // length - 1 and max(verifies) <= -(-16 // length), verifies


@pytest.mark.slow
@pytest.mark.extended
def test_finishing_offloading_and_restoring_in_one_step_loses_nothing(tiny_params, smollm2):
    ids = prompts(32, seed=1)
    rng = np.random.default_rng(2)
    params = [SamplingParams(temperature=0, max_tokens=int(rng.integers(2, 40)), ignore_eos=True) for _ in ids]
    expected = generate(make(tiny_params, smollm2.tokenizer, method="none"), ids, params)

    engine = make(tiny_params, smollm2.tokenizer, kv_cache_tokens=320, host_kv_tokens=1200)
    requests = [engine.add_request(i, p, str(n)) for n, (i, p) in enumerate(zip(ids, params))]
    finished = collections.Counter()
    mixed_steps = 0
    while engine.has_unfinished():
        moves = engine.scheduler.num_offloads + engine.num_restores
        done = engine.step()
        finished.update(r.request_id for r in done)
        mixed_steps += bool(done) and engine.scheduler.num_offloads + engine.num_restores > moves
    assert finished == collections.Counter(str(n) for n in range(len(ids)))
    assert [r.output_ids for r in requests] == expected
    assert engine.num_restores == engine.scheduler.num_offloads > 0
    assert mixed_steps > 0, "no step both finished requests and moved KV to or from host memory"
    assert engine.host_kv.used_tokens == 0 and engine.allocator.num_free == engine.allocator.num_pages - 1


@pytest.mark.slow
@pytest.mark.quick_compiles
def test_a_step_that_only_moves_requests_is_progress():
    """With the pool at its minimum the only ready request can be the newest one: it makes room by leaving
    (offloaded), an older offloaded request comes back into its pages, and no row is planned. The engine goes
    on at the next step instead of stopping with "no progress", and the tokens stay vanilla's. (A random
    workload that reaches this: 17 requests through 4 slots and 24 pages.)"""
    params = {name: np.asarray(value) * (1.0 if name.endswith("norm") else 3.0)
              for name, value in random_params(TINY, seed=3, dtype=jnp.float32).items()}
    rng = np.random.default_rng(115)
    count = int(rng.integers(6, 24))
    prompts = [rng.integers(3, 256, int(rng.integers(1, 40))).tolist() for _ in range(count)]
    rng.random()                 # a draw the random workloads spend on stop tokens (none here)
    sampling = [SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 90)), ignore_eos=True)
                for _ in range(count)]
    fields = dict(max_batch_size=4, max_model_len=160, page_size=8, min_context_bucket=160, burst_steps=1)
    vanilla = Engine(TINY, params, placeholder_tokenizer(), EngineConfig(kv_cache_tokens=2048, sync_host=True,
                                                                         **fields), SpecConfig(method="none"))
    expected = generate(vanilla, prompts, sampling)
    engine = Engine(TINY, params, placeholder_tokenizer(),
                    EngineConfig(kv_cache_tokens=192, host_kv_tokens=4096, prefill_chunk_size=16, **fields),
                    SpecConfig(method="streaming", k=K, min_budget=8, budget_ratio=0.1))
    schedule, moved_only = engine.scheduler.schedule, []

    def spied():
        before = (engine.scheduler.num_offloads, engine.num_restores)
        plan = schedule()
        if plan is None and engine._in_flight is None:
            moved_only.append((engine.scheduler.num_offloads, engine.num_restores) != before)
        return plan

    engine.scheduler.schedule = spied
    assert generate(engine, prompts, sampling) == expected
    assert any(moved_only), "the workload no longer reaches a step that only moves requests"


@pytest.mark.parametrize("sync_host", [pytest.param(True, marks=pytest.mark.extended), False])
def test_a_preempted_request_is_not_recomputed_over_and_over(tiny_params, sync_host):
    """Under steady pressure without a host pool, a preempted request waits until its whole prefix fits beside
    the running requests' next growth. Re-admitted as soon as a first chunk fitted, it was the newest request
    again, so the first evicted: one request here was preempted over 30 times, evicting itself while
    recomputing its prefix."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 256, 96).tolist() for _ in range(8)]
    sampling = [SamplingParams(temperature=0, max_tokens=int(rng.integers(20, 60)), ignore_eos=True) for _ in ids]
    fields = dict(max_batch_size=8, max_model_len=160, page_size=8, min_context_bucket=160 + K, burst_steps=1,
                  prefill_chunk_size=32, max_num_batched_tokens=8 * (K + 1))
    vanilla = Engine(TINY, tiny_params, placeholder_tokenizer(),
                     EngineConfig(kv_cache_tokens=8 * 160, sync_host=True, **fields), SpecConfig(method="none"))
    expected = generate(vanilla, ids, sampling)
    engine = Engine(TINY, tiny_params, placeholder_tokenizer(),      # room for the prompts and 8 tokens each
                    EngineConfig(kv_cache_tokens=8 * (96 + 8), host_kv_tokens=0, sync_host=sync_host, **fields),
                    SpecConfig(method="pillar", k=K, min_budget=8, budget_ratio=0.1))
    requests = run_requests(engine, ids, sampling)
    assert [r.output_ids for r in requests] == expected
    assert engine.scheduler.num_preemptions > 0, "the workload no longer preempts"
    assert max(r.stats.preemptions for r in requests) <= 2


def test_row_buckets_are_powers_of_two_below_64_tokens_and_finer_above():
    limits = BucketLimits(max_rows=256, max_tokens=4096, max_q_len=32, max_pages=64, page_size=8,
                          rows_per_doubling=4)
    assert [limits.rows(n) for n in (1, 9, 33, 64)] == [8, 16, 64, 64]           # at most 64 tokens
    assert [limits.rows(n) for n in (65, 81, 102, 129, 200, 256)] == [80, 96, 112, 160, 224, 256]
    assert [limits.rows(n, tokens_per_row=9) for n in (7, 9, 13, 16, 17)] == [8, 10, 14, 16, 20]
    coarse = dataclasses.replace(limits, rows_per_doubling=1)
    assert [coarse.rows(n, tokens_per_row=9) for n in (13, 102)] == [16, 128]
    for n in range(1, 300):
        size = bucket(n, 256, minimum=8, per_doubling=4)
        assert size >= n and (size <= 256 or size == n)


@pytest.mark.quick_compiles
@pytest.mark.extended
def test_finely_bucketed_verify_groups_change_no_outputs(tiny_params, smollm2, monkeypatch):
    """Once two of 16 requests finish, the other 14 verify together at k=4: 70 tokens, past 64, so their group
    is padded to 14 rows rather than 16; the token streams stay those of vanilla decoding."""
    ids = prompts(16, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=8 if i < 2 else 24, ignore_eos=True) for i in range(len(ids))]
    expected = generate(make(tiny_params, smollm2.tokenizer, method="none"), ids, params)
    engine = make(tiny_params, smollm2.tokenizer, scheduler="phased", min_batch_bucket=8, row_buckets_per_doubling=4)
    built = []
    original = engine_module.build_unified_batch
    monkeypatch.setattr(engine_module, "build_unified_batch", lambda *args: built.append(original(*args)) or built[-1])
    assert generate(engine, ids, params) == expected
    sizes = {b.meta.q_len.shape[0] for b in built}
    assert 14 in sizes, sizes


@pytest.mark.parametrize("method", ["pillar", "ngram"])
def test_requests_decode_plainly_until_the_draft_min_context(tiny_params, smollm2, method):
    threshold = 50
    sampling = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    vanilla = generate(make(tiny_params, smollm2.tokenizer, "none"), prompts(12), sampling)
    engine = make(tiny_params, smollm2.tokenizer, method, draft_min_context=threshold)
    requests = run_requests(engine, prompts(12), sampling)
    assert [r.output_ids for r in requests] == vanilla
    for request in requests:
        # One plain token per step until the context reaches the threshold (the first token comes from prefill).
        assert request.stats.decodes >= threshold - len(request.prompt_ids) - 1, request.stats
        assert unaccounted_tokens(request) == 0
    if method == "pillar":
        assert sum(r.stats.verifies for r in requests) > 0                # and drafts past it


def test_plain_decodes_below_the_draft_min_context_leave_token_sets_alone(tiny_params, smollm2):
    # A plain row is a verify without drafts; below the threshold it must not pay for a PillarAttn refresh.
    engine = make(tiny_params, smollm2.tokenizer, draft_min_context=200)
    step_fn, layouts = engine._step_fn, []
    engine._step_fn = lambda *args: layouts.append(args[4]) or step_fn(*args)
    for ids in prompts(6):
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    for _ in range(20):
        engine.step()
    assert engine.metrics.steps[-1].decode_rows == 6
    assert sum(s.verify_rows + s.draft_rows for s in engine.metrics.steps) == 0
    assert not engine.table.has_sets[engine.table.active].any()
    # Nor does the step run the score pass and top-K for nobody.
    last_batch = jax.tree_util.tree_unflatten(layouts[-1].treedef, [shape for shape, _ in layouts[-1].leaves])[0]
    assert last_batch.emits.any_refresh is False
    # And its rows carry one token each, not room for k drafts: the step costs what vanilla decoding's does.
    assert last_batch.emits.width == 1 and last_batch.tokens == last_batch.meta.q_len == (16,)


def _op_sequence(engine: Engine, steps: int) -> list[str]:
    """StableHLO op names, in order, of the program the engine's last step ran."""
    step_fn, calls = engine._step_fn, []
    engine._step_fn = lambda *args: calls.append(args) or step_fn(*args)
    for ids in prompts(6):
        engine.add_request(ids, SamplingParams(temperature=0.6, max_tokens=60, ignore_eos=True))
    for _ in range(steps):
        engine.step()
    return re.findall(r"stablehlo\.[a-z_]+", step_fn.lower(*calls[-1]).as_text())


def test_plain_steps_below_the_draft_min_context_run_the_vanilla_program(tiny_params, smollm2):
    # Below the threshold a pillar engine's step must do exactly what vanilla decoding's does (the state it
    # carries for later drafting passes through untouched): the same ops in the same order.
    vanilla = _op_sequence(make(tiny_params, smollm2.tokenizer, "none"), 12)
    plain = _op_sequence(make(tiny_params, smollm2.tokenizer, draft_min_context=200), 12)
    assert len(vanilla) > 100 and plain == vanilla
