"""Shared fixtures: the embedded SmolLM2 model, loaded once per test session."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

# Compiled programs go through one persistent cache for the whole run: the test workers share it (most tests
# compile the same tiny-model step shapes), and a rerun reuses it. A run on a fresh checkout starts it empty.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Four host CPU devices, so tensor-parallel tests can build meshes; XLA reads this when jax first starts, so it
# must be set before anything imports jax. Single-device code still runs on device 0 alone.
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count=4"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HOST_DEVICES_FLAG}".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sparsespec_jax.engine import Engine, EngineConfig  # noqa: E402
from sparsespec_jax.request import Request  # noqa: E402
from sparsespec_jax.spec.config import SpecConfig  # noqa: E402
from sparsespec_jax.xla_flags import quick_compiles  # noqa: E402

FACTS_PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


@pytest.fixture(scope="session")
def smollm2():
    from sparsespec_jax.loading import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_thinned(smollm2):
    """SmolLM2 with every third decoder layer (10 of 30): real weights at a third of the layers' compute, for
    tests that compare token streams between methods rather than judge the text. Its text is not English, but
    greedy streams are as far from ties as the full model's (smallest top-1 / top-2 logit gap over the systems
    and burst workloads: 6.7e-3, the full model's 2.7e-4) and pillar's accepted drafts spread over 0..k at
    least as widely, so rejections at every draft position stay exercised."""
    kept = np.arange(0, smollm2.config.num_layers, 3)
    config = dataclasses.replace(smollm2.config, num_layers=len(kept))
    params = {name: value[kept] if name.startswith("layers.") else value for name, value in smollm2.params.items()}
    return dataclasses.replace(smollm2, config=config, params=params)


@pytest.fixture(scope="session")
def make_engine(smollm2_thinned):
    """Build an engine: make_engine(method="none", **engine_config_fields), on the thinned SmolLM2 unless
    model= names another LoadedModel (the full `smollm2` for tests that read the text)."""

    def build(method: str = "none", spec_k: int = 8, min_budget: int = 128, budget_ratio: float = 0.05,
              recent_tokens: int = 0, model=smollm2_thinned, **fields) -> Engine:
        fields.setdefault("kv_cache_tokens", 8192)
        fields.setdefault("max_model_len", 2048)
        spec = SpecConfig(method=method, k=spec_k, min_budget=min_budget, budget_ratio=budget_ratio,
                          recent_tokens=recent_tokens)
        return Engine(model.config, model.params, model.tokenizer, EngineConfig(**fields), spec)

    return build


@pytest.fixture(autouse=True)
def quick_compiles_where_marked(request):
    """Tests marked quick_compiles compile with most XLA optimizations off (see xla_flags.quick_compiles)."""
    if request.node.get_closest_marker("quick_compiles") is None:
        yield
        return
    with quick_compiles():
        yield


def run_requests(engine: Engine, prompts_ids, params) -> list[Request]:
    """Run prompts (token id lists) through an engine; return the finished requests in order."""
    params = params if isinstance(params, list) else [params] * len(prompts_ids)
    requests = [engine.add_request(ids, p, str(i)) for i, (ids, p) in enumerate(zip(prompts_ids, params))]
    engine.run()
    return requests


def generate(engine: Engine, prompts_ids, params) -> list[list[int]]:
    """Run prompts (token id lists) through an engine; return each request's output token ids in order."""
    return [request.output_ids for request in run_requests(engine, prompts_ids, params)]


def unaccounted_tokens(request: Request) -> int:
    """Output tokens its stats leave unexplained: each verify emits its accepted drafts + 1, each plain decode
    one and the prefill's last chunk the first. 0 unless it was recomputed after its first token (that
    recompute's prefill emits one more) or a stop cut a verify's tokens short."""
    stats = request.stats
    return len(request.output_ids) - (stats.accepted_tokens + stats.verifies + stats.decodes + 1)


def pytest_collection_modifyitems(items):
    """Modules with slow tests run first, each module's tests still together (module fixtures are built once):
    the two workers then end on short tests instead of one waiting while the other runs a long one."""
    has_slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in has_slow)      # stable: keeps each module's order
