"""sparsespec-jax: sparse self-speculative decoding (PillarAttn) for long chain-of-thought generation."""

from sparsespec_jax.engine import EngineConfig, RequestError
from sparsespec_jax.llm import LLM
from sparsespec_jax.request import RequestOutput
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.spec.config import SpecConfig

__all__ = ["LLM", "SamplingParams", "SpecConfig", "RequestOutput", "EngineConfig", "RequestError"]
