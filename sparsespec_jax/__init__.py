"""sparsespec-jax: sparse self-speculative decoding (PillarAttn) for long chain-of-thought generation."""

from sparsespec_jax.xla_flags import add_default_xla_flags

add_default_xla_flags()  # before any backend starts: see xla_flags.py

from sparsespec_jax.engine import EngineConfig, RequestError  # noqa: E402
from sparsespec_jax.llm import LLM  # noqa: E402
from sparsespec_jax.request import RequestOutput  # noqa: E402
from sparsespec_jax.sampling import SamplingParams  # noqa: E402
from sparsespec_jax.spec.config import SpecConfig  # noqa: E402

__all__ = ["LLM", "SamplingParams", "SpecConfig", "RequestOutput", "EngineConfig", "RequestError"]
