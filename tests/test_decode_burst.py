"""Decode bursts (several steady-state steps per jitted call, planned on the device) never change what is
generated, and the host's copy of the cycle counters stays the device's.

The batch churns: 16 requests of mixed prompt and output lengths through 8 slots, so the engine enters and
leaves bursts many times (admissions, finishes, a small KV pool), and requests reach their length limits and
stop tokens inside bursts.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FACTS_PROMPT, generate, run_requests
from sparsespec_jax import engine as engine_module
from sparsespec_jax.benchmark.shapes import placeholder_tokenizer
from sparsespec_jax.benchmark.steady_state import place_at_context
from sparsespec_jax.config import ModelConfig
from sparsespec_jax.decode_burst import AUTO_BURST_STEPS, advance_cycles, auto_burst_steps, balance_phases
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

NUM_REQUESTS = 16
ENGINE = dict(max_batch_size=8, kv_cache_tokens=2048, max_model_len=160, page_size=8, min_context_bucket=128,
              prefill_chunk_size=64)
SPARSE = dict(spec_k=4, min_budget=24, budget_ratio=0.05)
# Pages run short: bursts offload and restore, and some cannot fit even after the offloads allowed.
OFFLOADING = dict(burst_steps=4, kv_cache_tokens=224, host_kv_tokens=4096)


def workload(tokenizer, stop_ids=()):
    words = (FACTS_PROMPT + " The river bends twice before it meets the sea, and the town on its bank is old.").split()
    rng = np.random.default_rng(11)
    prompts, params = [], []
    for _ in range(NUM_REQUESTS):
        start = int(rng.integers(0, len(words) - 12))
        prompts.append(tokenizer.encode(" ".join(words[start:start + int(rng.integers(3, 12))])))
        params.append(SamplingParams(temperature=0, max_tokens=int(rng.integers(8, 48)), ignore_eos=not stop_ids,
                                     stop_token_ids=list(stop_ids)))
    return prompts, params


@pytest.fixture(scope="module")
def vanilla(make_engine, smollm2):
    prompts, params = workload(smollm2.tokenizer)
    return prompts, params, generate(make_engine("none", sync_host=True, **ENGINE), prompts, params)


def bursts_run(engine) -> int:
    return sum(s.decode_steps > 1 for s in engine.metrics.steps)


@pytest.mark.slow
@pytest.mark.parametrize("method, mode", [
    ("none", dict(burst_steps=4)),
    ("pillar", OFFLOADING),
    # Other modes of the same bursts: make test-all.
    pytest.param("pillar", dict(burst_steps=3, sync_host=True), marks=pytest.mark.extended),
    pytest.param("streaming", dict(burst_steps=5), marks=pytest.mark.extended),
    pytest.param("pillar", dict(burst_steps=4, scheduler="phased"), marks=pytest.mark.extended),
], ids=["none", "pillar-offload", "pillar-sync", "streaming", "pillar-phased"])
def test_bursts_reproduce_vanilla(method, mode, vanilla, make_engine):
    prompts, params, expected = vanilla
    engine = make_engine(method, **SPARSE, **{**ENGINE, **mode})
    requests = run_requests(engine, prompts, params)
    assert [r.output_ids for r in requests] == expected
    assert bursts_run(engine) >= 5, "the workload should run in bursts for a good part"
    steps = engine.metrics.steps
    # Row counts of bursts are corrected to the rows that ran: verifies match the acceptance histogram.
    assert engine.acceptance_counts.sum() == sum(r.stats.verifies for r in requests) == \
        sum(s.verify_rows for s in steps)
    assert sum(r.stats.decodes for r in requests) == sum(s.decode_rows for s in steps)
    # Tokens emitted past a length limit inside a burst are dropped: stats may explain more tokens, never fewer.
    for request in requests:
        stats = request.stats
        explained = stats.accepted_tokens + stats.verifies + stats.decodes + 1
        assert 0 <= explained - len(request.output_ids) <= SPARSE["spec_k"]
    if "kv_cache_tokens" in mode:
        assert engine.scheduler.num_offloads > 0 and engine.num_restores > 0


@pytest.mark.slow
def test_bursts_stop_at_stop_tokens_like_vanilla(vanilla, make_engine, smollm2):
    """A stop token sampled inside a burst ends the request exactly where vanilla decoding ends it; what the
    burst sampled after it is dropped."""
    _, _, free_run = vanilla
    tokens = [t for out in free_run for t in out[5:]]
    stop = int(np.bincount(tokens).argmax())               # a token the outputs do produce, mid-stream
    prompts, params = workload(smollm2.tokenizer, stop_ids=[stop])
    expected = generate(make_engine("none", sync_host=True, **ENGINE), prompts, params)
    engine = make_engine("pillar", **SPARSE, **{**ENGINE, **OFFLOADING})     # the programs of the test above
    requests = run_requests(engine, prompts, params)
    assert [r.output_ids for r in requests] == expected
    stopped = [r for r in requests if r.finish_reason == "stop"]
    assert all(r.output_ids[-1] in engine.eos_token_ids | {stop} for r in stopped)
    assert sum(r.output_ids[-1] == stop for r in stopped) >= 3
    assert bursts_run(engine) > 0


@pytest.mark.slow
def test_host_counters_follow_the_device(make_engine, smollm2):
    """Mid-run, the host's copy of each request's cycle counters (advanced without reading the device) and of
    its committed position (learned from outputs) equal the device's counters."""
    prompts, params = workload(smollm2.tokenizer)
    engine = make_engine("pillar", **SPARSE, **{**ENGINE, **OFFLOADING})
    for ids, p in zip(prompts[:8], params[:8]):
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))
    checked = 0
    while engine.has_unfinished() and checked < 3:
        engine.step()
        if engine._in_burst and engine._in_flight is not None:
            engine._settle()                           # every burst read: the host's newest is exact
            slots = np.flatnonzero(engine.table.active)
            counters = engine.counters
            np.testing.assert_array_equal(np.asarray(counters.newest)[slots], engine._burst_newest[slots])
            np.testing.assert_array_equal(np.asarray(counters.draft_index)[slots],
                                          engine._burst_draft_index[slots])
            np.testing.assert_array_equal(np.asarray(counters.sit_out)[slots], engine._burst_sit_out[slots])
            checked += 1
    assert checked == 3


def test_advance_cycles_drafts_again_right_after_a_verify():
    verifies, drafts, draft_index, sit_out = advance_cycles(np.array([0, 3, 4, 0]), np.array([0, 0, 0, 1]), k=4,
                                                            steps=7)
    # request 0 drafts 4 steps, verifies, drafts on at once (no step sat out); request 2 verifies at once and 5
    # steps later; request 3 sits out first.
    assert verifies[:, 0].tolist() == [False, False, False, False, True, False, False]
    assert drafts[:, 0].tolist() == [True, True, True, True, False, True, True]
    assert verifies[:, 2].tolist() == [True, False, False, False, False, True, False]
    assert drafts[:, 3].tolist() == [False, True, True, True, True, False, True]
    assert draft_index.tolist() == [2, 0, 1, 1] and sit_out.tolist() == [0, 0, 0, 0]


def test_balance_phases_spreads_verifies_evenly():
    # Six requests verifying at the same step, cycle of 3: two per phase, the others a step or two later.
    assert balance_phases(np.full(6, 2), np.zeros(6, np.int64), k=2).tolist() == [0, 0, 1, 1, 2, 2]
    rng = np.random.default_rng(5)
    for count, k in [(128, 8), (37, 4), (5, 8), (64, 1)]:
        draft_index, sit_out = rng.integers(0, k + 1, count), rng.integers(0, 2, count)
        delays = balance_phases(draft_index, sit_out, k)
        assert (delays >= 0).all() and (delays < 2 * (k + 1)).all()
        verifies, *_ = advance_cycles(draft_index, sit_out + delays, k, steps=5 * (k + 1))
        settled = verifies[3 * (k + 1):]                        # every delay has passed
        assert settled.sum(1).max() <= -(-count // (k + 1))
        assert (settled.sum(0) == 2).all()                      # each request verifies once per k + 1 steps
    spread = np.arange(18) % 9
    assert not balance_phases(spread, np.zeros(18, np.int64), k=8).any()   # already even: nobody waits


def test_bursts_refuse_host_made_drafts(make_engine):
    with pytest.raises(ValueError, match="burst_steps"):
        make_engine("ngram", burst_steps=4, **SPARSE, **ENGINE)


def test_bursts_by_default_on_gpus_only(make_engine):
    unified = dict(sync_host=False, scheduler="unified")
    assert auto_burst_steps("gpu", "pillar", **unified) == auto_burst_steps("gpu", "none", **unified) \
        == AUTO_BURST_STEPS > 1
    assert auto_burst_steps("gpu", "ngram", **unified) == 1
    assert auto_burst_steps("cpu", "pillar", **unified) == auto_burst_steps("tpu", "pillar", **unified) == 1
    engine = make_engine("ngram", **SPARSE, **ENGINE)          # unset: no error for host-made drafts
    assert engine.burst_steps == 1 and engine._burst_fn is None


def test_unset_burst_steps_keep_the_ablation_baselines_single(make_engine, monkeypatch):
    """Where bursts are the default, the sync and phased baselines still run single steps unless asked."""
    monkeypatch.setattr(engine_module, "auto_burst_steps", lambda platform, *rest: auto_burst_steps("gpu", *rest))
    assert make_engine("pillar", **SPARSE, **ENGINE).burst_steps == AUTO_BURST_STEPS
    assert make_engine("pillar", sync_host=True, **SPARSE, **ENGINE).burst_steps == 1
    assert make_engine("pillar", scheduler="phased", **SPARSE, **ENGINE).burst_steps == 1
    assert make_engine("pillar", scheduler="phased", burst_steps=4, **SPARSE, **ENGINE).burst_steps == 4


TINY = ModelConfig(arch="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True, max_position_embeddings=2048)


@pytest.mark.slow
@pytest.mark.extended
def test_bursts_keep_running_under_kv_pressure():
    """A pool that leaves each request 32 tokens to grow, requests finishing all along (the systems ablation's
    offload row, small): bursts make room by offloading the newest requests, enter with cycles the host had
    shortened, and take an offloaded request back inside a burst once the next burst still fits with it (so
    it is not offloaded again at once). Past the first cycle every decode step runs inside a burst; every
    offloaded request comes back."""
    batch, context, headroom, window, k = 32, 256, 32, 100, 8
    config = EngineConfig(max_batch_size=batch, kv_cache_tokens=batch * (context + headroom),
                          max_model_len=context + window + 64, max_num_batched_tokens=batch * (k + 1),
                          min_batch_bucket=16, min_context_bucket=context, burst_steps=8, dtype="float32",
                          host_kv_tokens=batch * (context + window + k + 1))
    spec = SpecConfig(method="pillar", k=k, min_budget=32,
                      replay_acceptance=(0.08, 0.05, 0.05, 0.05, 0.06, 0.07, 0.08, 0.10, 0.46))
    engine = Engine(TINY, random_params(TINY, seed=3, dtype=jnp.float32), placeholder_tokenizer(), config, spec)
    lengths = np.random.default_rng(2).integers(window // 3, window, batch)
    requests = place_at_context(engine, batch, context, window, seed=1, reserve=0,
                                params=[SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True)
                                        for n in lengths])
    while engine.has_unfinished():
        engine.step()
    assert [len(r.output_ids) for r in requests] == lengths.tolist()
    assert engine.scheduler.num_offloads == engine.num_restores > 0
    assert max(r.stats.offloads for r in requests) == 1
    steps = [s.decode_steps for s in engine.metrics.steps[k + 2:] if s.decode_steps]   # past the first cycle
    assert all(n > 1 for n in steps)
