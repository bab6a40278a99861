"""The public Python API: `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import pytest

from conftest import FACTS_PROMPT
from sparsespec_jax import LLM, RequestError, SamplingParams, SpecConfig


@pytest.fixture(scope="module")
def llm():
    return LLM(max_batch_size=4, kv_cache_tokens=4096, max_model_len=512,
               spec=SpecConfig(method="pillar", k=4, min_budget=16))


def test_generate_returns_outputs_in_order_with_stats(llm):
    outputs = llm.generate([FACTS_PROMPT, "Name three colors."],
                           [SamplingParams(temperature=0, max_tokens=6),
                            SamplingParams(temperature=0.7, seed=1, max_tokens=12, ignore_eos=True)])
    first, second = outputs
    assert [o.request_id for o in outputs] == ["0", "1"]
    assert first.text.startswith(" Rome") and first.prompt == FACTS_PROMPT
    assert len(second.token_ids) == 12 and second.finish_reason == "length"
    assert second.stats.verifies > 0 and second.stats.output_tokens == 12
    record = second.as_dict()
    assert record["output_tokens"] == 12 and record["stats"]["acceptance_mean"] == second.stats.acceptance_mean


def test_chat_mode_uses_the_template(llm):
    [out] = llm.generate("What is the capital of France?", SamplingParams(temperature=0, max_tokens=24), chat=True)
    assert out.prompt_token_ids[0] == llm.tokenizer.token_to_id("<|im_start|>")
    assert "Paris" in out.text


def test_invalid_call_is_rejected_before_any_work(llm):
    with pytest.raises(RequestError, match="prompt 1"):
        llm.generate(["hi", "x " * 600], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()])
    assert not llm.engine.has_unfinished()
