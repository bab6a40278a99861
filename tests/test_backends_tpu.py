"""The engine gives identical greedy runs with the Pallas TPU kernels (TPU interpreter on CPU) and the references.

Interpreting the TPU kernels costs a Python callback per DMA and VMEM access and a large compile per kernel
shape, so the engine run is kept small and uses pillar drafting only, which drives every TPU kernel: prompt
chunks, dense cold-start drafts (decode-shaped rows) and verify rows through ragged paged attention, scores
and top-K at each verify, sparse drafts over the selected sets. Greedy outputs are the same whatever the
drafts, so the draft and acceptance counts are compared too: they depend on the scores, the top-K selection
and the sparse attention (a 12-token budget keeps some sparse drafts right and some wrong, so a kernel
error shifts the counts). Dense drafts ride in steps with dead sparse entries, so `unified_attention`
dispatches both row kinds too. Two prompts, pages of 16 (few page DMAs) and the phased scheduler (fewer
step shapes) keep the run small.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsespec_jax.attention import resolve_backend
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig
from test_backends import TINY, tiny_params  # noqa: F401  (module fixture: the sharpened tiny model)

pytestmark = pytest.mark.quick_compiles


def run(tiny_params, tokenizer, backend: str):
    """Each request's (output ids, drafted, accepted, verifies) with pillar drafting."""
    engine = Engine(TINY, tiny_params, tokenizer,
                    EngineConfig(max_batch_size=2, kv_cache_tokens=512, max_model_len=128, page_size=16,
                                 prefill_chunk_size=16, max_num_batched_tokens=32, attention_backend=backend,
                                 min_context_bucket=64, scheduler="phased"),
                    SpecConfig(method="pillar", k=3, min_budget=12, budget_ratio=0.1))
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    requests = [engine.add_request(rng.integers(3, 256, n).tolist(), params, str(n)) for n in (13, 6)]
    engine.run()
    return [(r.output_ids, r.stats.drafted_tokens, r.stats.accepted_tokens, r.stats.verifies) for r in requests]


@pytest.mark.slow
@pytest.mark.extended
def test_tpu_kernels_and_reference_backends_agree_on_pillar_drafting(tiny_params, smollm2):  # noqa: F811
    reference = run(tiny_params, smollm2.tokenizer, "reference")
    tpu = run(tiny_params, smollm2.tokenizer, "pallas-tpu")
    assert tpu == reference
    assert len({tuple(ids) for ids, *_ in reference}) == 2          # distinct continuations: a real comparison
    _, drafted, accepted, verifies = map(np.array, zip(*reference))
    assert (verifies >= 2).all() and 0 < accepted.sum() < drafted.sum()   # sparse drafts ran, some rejected


def test_pallas_tpu_is_a_backend_name():
    assert resolve_backend("pallas-tpu") == "pallas-tpu"
    with pytest.raises(ValueError, match="pallas-tpu"):
        resolve_backend("tpu")

