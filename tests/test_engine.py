"""The vanilla engine on the real SmolLM2 weights: correctness, batch invariance, sampling, stop rules."""

from __future__ import annotations

import gc
import weakref

import pytest

from conftest import FACTS_PROMPT, generate
from sparsespec_jax.engine import RequestError
from sparsespec_jax.sampling import SamplingError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

MIXED_PROMPTS = [
    FACTS_PROMPT,
    "Once upon a time",
    "def fibonacci(n):",
    "List three primary colors:",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Q: What is 17 times 3?\nA:",
    "In 1969, the first humans",
    "Photosynthesis is the process by which plants",
    "import numpy as np\nx = np.arange(10)\n",
    "The three laws of thermodynamics state that",
    "Water boils at",
    "A haiku about autumn:\n",
    "The history of the Roman Empire begins with the founding of the city of Rome, traditionally dated to 753 BC. "
    "Over the following centuries, the city grew from a small settlement into",
    "Dear hiring manager,",
    "1, 1, 2, 3, 5, 8,",
    "Translate to French: good morning ->",
]


def test_capital_of_italy_is_rome(make_engine, smollm2):
    engine = make_engine(model=smollm2)
    [out] = generate(engine, [smollm2.tokenizer.encode(FACTS_PROMPT)], SamplingParams(temperature=0, max_tokens=4))
    assert smollm2.tokenizer.decode(out).startswith(" Rome")


def test_steps_that_compile_are_marked(make_engine, smollm2):
    """StepMetrics.compiled is exactly the steps whose batch shape was new to the shared jitted step: a second
    engine of the same configuration running the same requests compiles nothing."""
    prompts = [smollm2.tokenizer.encode(p) for p in MIXED_PROMPTS[:3]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = make_engine(max_model_len=1000, min_batch_bucket=4)     # shapes no other test compiles
    shapes_before = first._step_fn._cache_size()
    generate(first, prompts, params)
    compiled = [s.step for s in first.metrics.steps if s.compiled]
    assert compiled and len(compiled) == first._step_fn._cache_size() - shapes_before
    assert first.metrics.summary()["compile_steps"] == len(compiled)
    second = make_engine(max_model_len=1000, min_batch_bucket=4)
    generate(second, prompts, params)
    assert not any(s.compiled for s in second.metrics.steps)
    assert second.metrics.summary()["compile_steps"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "pillar"])
def test_a_dropped_engine_is_freed_at_once(make_engine, method):
    """No reference cycle holds an engine (and its KV pool) until a full garbage collection: a process making
    engine after engine would otherwise run out of device memory first."""
    engine = make_engine(method, burst_steps=4, max_model_len=256, kv_cache_tokens=1024, host_kv_tokens=1024)
    dropped = weakref.ref(engine)
    gc.disable()
    try:
        del engine
        assert dropped() is None
    finally:
        gc.enable()


def test_batch_invariance_with_chunked_prefill(make_engine, smollm2):
    """Each prompt's greedy output is the same alone and inside a continuously batched, chunk-prefilled batch."""
    prompts = [smollm2.tokenizer.encode(p) for p in MIXED_PROMPTS]
    assert len(prompts) == 16 and max(map(len, prompts)) > 32
    # Small chunks and token budget force prompts to be split and mixed with other rows' decode tokens.
    batched_engine = make_engine(max_batch_size=16, prefill_chunk_size=16, max_num_batched_tokens=64)
    lengths = [28 - 3 * (i % 5) for i in range(16)]                 # requests leave at different steps
    batched = generate(batched_engine, prompts,
                       [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths])
    assert [len(out) for out in batched] == lengths
    # Every third request alone (all five output lengths among them) keeps the suite's time in check.
    alone_engine = make_engine(max_batch_size=1, prefill_chunk_size=16, max_num_batched_tokens=64)
    solo_runs = list(zip(prompts, lengths, batched))[::3]
    assert {n for _, n, _ in solo_runs} == set(lengths)
    for ids, n, out in solo_runs:
        [alone] = generate(alone_engine, [ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        assert out == alone


def test_preemption_recomputes_without_changing_outputs(make_engine, smollm2):
    """A KV pool too small for the batch preempts and recomputes; the outputs do not change."""
    prompts = [smollm2.tokenizer.encode(p) for p in MIXED_PROMPTS[:4]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = generate(make_engine(max_batch_size=4), prompts, params)
    tight_engine = make_engine(max_batch_size=4, kv_cache_tokens=96, max_model_len=96, page_size=8,
                               host_kv_tokens=0)
    tight = generate(tight_engine, prompts, params)
    assert tight_engine.scheduler.num_preemptions > 0
    assert tight == roomy


def test_same_seed_same_text_and_seeds_matter(make_engine, smollm2):
    ids = smollm2.tokenizer.encode("Write a short poem about the sea.")
    engine = make_engine(max_batch_size=4)
    runs = generate(engine, [ids] * 3, [SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True),
                                        SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True),
                                        SamplingParams(temperature=1.0, seed=8, max_tokens=24, ignore_eos=True)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    # The same request alone in a fresh engine draws the same tokens (keys depend on seed and position only).
    [alone] = generate(make_engine(max_batch_size=1), [ids],
                       SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True))
    assert alone == runs[0]


def test_top_k_and_top_p_restrict_support(make_engine, smollm2):
    """top_k=1 and a tiny top_p leave only the argmax: hot sampling must then equal greedy decoding."""
    ids = smollm2.tokenizer.encode("The most important invention of the twentieth century was")
    engine = make_engine(max_batch_size=4)
    greedy, top_k, top_p, free = generate(engine, [ids] * 4, [
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=1.5, top_k=1, seed=1, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=1.5, top_p=1e-6, seed=2, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=1.5, seed=3, max_tokens=32, ignore_eos=True)])
    assert top_k == greedy and top_p == greedy
    assert free != greedy


def test_stop_conditions(make_engine, smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode(FACTS_PROMPT)
    engine = make_engine(max_batch_size=4, model=smollm2)
    by_length = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    by_string = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=40, stop=("capital",)))
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hello."}]), add_special_tokens=False)
    by_eos = engine.add_request(chat, SamplingParams(temperature=0, max_tokens=200))
    engine.run()
    assert (by_length.finish_reason, len(by_length.output_ids)) == ("length", 5)
    assert by_string.finish_reason == "stop" and "capital" not in by_string.detokenizer.text
    assert by_string.detokenizer.text.startswith(" Rome")
    assert by_eos.finish_reason == "stop" and by_eos.output_ids[-1] in engine.eos_token_ids
    for request in (by_length, by_eos):             # no stop strings: the text is decoded at the end
        assert request.detokenizer.text == tok.decode(request.output_ids, skip_special_tokens=True)


def test_text_without_stop_strings_is_decoded_once_per_request(make_engine, smollm2):
    """Host time per step: without stop strings nothing reads the text before the request ends, so the
    engine decodes it once at the end instead of twice per token."""
    tok = smollm2.tokenizer
    windows = []

    class CountingTokenizer:
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, ids, **options):
            windows.append(len(ids))
            return tok.decode(ids, **options)

    engine = make_engine(max_batch_size=4)
    engine.tokenizer = CountingTokenizer()
    requests = [engine.add_request(tok.encode(prompt), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
                for prompt in MIXED_PROMPTS[:2]]
    engine.run()
    for request in requests:
        assert len(request.output_ids) == 12
        assert request.detokenizer.text == tok.decode(request.output_ids, skip_special_tokens=True)
    assert len(windows) <= 3 * len(requests), f"{len(windows)} decodes for {len(requests)} requests"


def test_bad_requests_raise_clear_errors(make_engine, smollm2):
    engine = make_engine(max_model_len=64)
    with pytest.raises(RequestError, match="context limit is 64"):
        engine.add_request(list(range(100, 180)), GREEDY, "long")
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([5, 10**6], GREEDY, "vocab")
    with pytest.raises(SamplingError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert not engine.has_unfinished()        # nothing half-queued by the failed calls
