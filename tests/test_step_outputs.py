"""What keeps a GPU step cheap to launch, checked on its programs. It returns nothing but its donated state:
every output aliases an input buffer (a fresh output buffer sits at a new address on every call, XLA may place
the step's temporaries in it, and a CUDA graph of the step would then be re-recorded on every call; see
slot_state.py). It never branches on device data: a conditional makes the GPU runtime read the predicate
before the call returns, so the host would wait for the step (measured on an H200: a call with a `lax.cond`
inside returned after 96-98% of the device time, one without after a quarter to a third)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsespec_jax.benchmark.e2e import TINY
from sparsespec_jax.benchmark.shapes import placeholder_tokenizer
from sparsespec_jax.engine import Engine, EngineConfig
from sparsespec_jax.model import random_params
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

pytestmark = pytest.mark.quick_compiles

MODEL = dataclasses.replace(TINY, num_layers=2)


def aliased_outputs(hlo_text: str) -> set[int]:
    """Output indices that the compiled module's input_output_alias maps onto a parameter."""
    header = hlo_text.splitlines()[0]
    match = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", header)
    return {int(index) for index in re.findall(r"\{(\d+)\}: \(\d+", match.group(1))} if match else set()


def step_programs(method: str, params: list[SamplingParams]) -> tuple[Engine, object, dict]:
    """Run three requests (params[i] for the i-th); return the engine, its jitted step and one argument tuple
    per compiled program."""
    config = EngineConfig(max_batch_size=4, kv_cache_tokens=2048, max_model_len=256)
    engine = Engine(MODEL, random_params(MODEL, seed=3, dtype=jnp.float32), placeholder_tokenizer(), config,
                    SpecConfig(method=method, k=4, min_budget=16))
    step_fn, calls = engine._step_fn, []
    engine._step_fn = lambda *args: calls.append(args) or step_fn(*args)
    rng = np.random.default_rng(0)
    for length, request_params in zip((5, 40, 17), params, strict=True):
        engine.add_request(rng.integers(0, MODEL.vocab_size, length).tolist(), request_params)
    engine.run()
    return engine, step_fn, {args[-1]: args for args in calls}           # one call per compiled program


@pytest.mark.parametrize("method", ["none", "pillar"])
def test_every_step_output_aliases_a_donated_input(method):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine, step_fn, layouts = step_programs(method, [greedy] * 3)
    num_outputs = len(jax.tree.leaves((engine.kv, engine.slot_state)))
    for args in layouts.values():
        hlo = step_fn.lower(*args).compile().as_text()
        assert aliased_outputs(hlo) == set(range(num_outputs)), hlo.splitlines()[0][:400]


@pytest.mark.parametrize("method", ["none", "pillar"])
def test_no_step_branches_on_device_data(method):
    """Rows with top-p alone (whose cut once needed a branch), with top-k and top-p, and greedy, in one batch."""
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, ignore_eos=True, seed=1),
              SamplingParams(temperature=0.6, top_p=0.95, top_k=7, max_tokens=8, ignore_eos=True, seed=2),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    _, step_fn, layouts = step_programs(method, params)
    for args in layouts.values():
        program = step_fn.lower(*args).as_text()
        assert "stablehlo.case" not in program and "stablehlo.if" not in program
