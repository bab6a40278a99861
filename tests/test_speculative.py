"""Self-speculative decoding: acceptance statistics, sampling limits and configuration errors."""

from __future__ import annotations

import pytest

from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

RAW_PROMPTS = [
    "The history of the printing press begins in",
    "Step-by-step, compute 23 * 47. First,",
]
CHAT_QUESTIONS = [
    "A farmer has 17 sheep and buys 3 times as many goats. How many animals does he have? Explain step by step.",
    "Write a Python function that checks whether a string is a palindrome, then explain it.",
]
# Small budgets so the draft steps really attend to a sparse subset of these few-hundred-token contexts.
SPARSE = dict(spec_k=4, min_budget=24, budget_ratio=0.05)


def prompt_ids(tokenizer) -> list[list[int]]:
    chat = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]),
                             add_special_tokens=False) for q in CHAT_QUESTIONS]
    return [tokenizer.encode(p) for p in RAW_PROMPTS] + chat


def test_pillar_reports_acceptance_and_beats_one_token_per_step(make_engine, smollm2):
    engine = make_engine("pillar", max_batch_size=2, model=smollm2, **SPARSE)      # acceptance: the real model
    ids = prompt_ids(smollm2.tokenizer)[2]
    request = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=96, ignore_eos=True))
    engine.run()
    stats = request.stats
    assert stats.verifies > 0 and stats.drafted_tokens >= stats.accepted_tokens >= 0
    assert stats.acceptance_mean == stats.accepted_tokens / stats.verifies
    # Each verify emits accepted + 1 tokens, each row without drafts one, the prefill's last chunk the first.
    assert stats.accepted_tokens + stats.verifies + stats.decodes + 1 == len(request.output_ids)
    assert stats.acceptance_mean > 1.0, "sparse self-drafts of the same model should mostly be accepted"


@pytest.mark.extended
def test_sampled_speculation_runs_and_respects_max_tokens(make_engine, smollm2):
    engine = make_engine("pillar", max_batch_size=2, **SPARSE)
    ids = prompt_ids(smollm2.tokenizer)[0]
    hot = [engine.add_request(ids, SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=s, max_tokens=37,
                                                  ignore_eos=True)) for s in (1, 2)]
    engine.run()
    assert [len(r.output_ids) for r in hot] == [37, 37]
    assert hot[0].output_ids != hot[1].output_ids


@pytest.mark.parametrize("field, value, message", [
    ("k", 0, "k"), ("budget_ratio", 0.0, "budget_ratio"), ("budget_ratio", 1.5, "budget_ratio"),
    ("min_budget", 0, "min_budget"), ("method", "eagle", "draft method"), ("draft_min_context", -1, "draft_min")])
def test_spec_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        SpecConfig(**{field: value})
