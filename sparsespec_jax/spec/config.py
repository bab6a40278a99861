"""SpecConfig: which draft method the engine uses and its knobs."""

from __future__ import annotations

import dataclasses
import math

DRAFT_METHODS = ("pillar", "streaming", "ngram", "none")


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """method: pillar (PillarAttn sparse self-drafts, default), streaming (sink + recent window of the same
    budget), ngram (prompt lookup in the request's own tokens) or none (vanilla decoding).
    k drafts are verified per round; draft steps attend to max(min_budget, ceil(budget_ratio * L)) tokens.
    recent_tokens (pillar): the newest this many positions are always in a refreshed set, the top-K filling the
    rest of the budget. 0 keeps only the tokens the verify appended, as the paper does; a recent window helps
    where the text repeats itself within it (a small model's long generations), since top-K picks the older
    copies the verify queries attended to, not the positions the next drafts will need.
    draft_min_context: a request decodes plainly, one token per step, until it holds this many tokens of context,
    and drafts from then on. Speculation pays once a step's full KV reads dominate it; below that (on an H200,
    SmolLM2 at batch 128 below ~4k tokens, the Qwen3-8B shape below ~3.7k) plain decoding is faster. 0: draft
    from the first token (the paper's setting)."""

    method: str = "pillar"
    k: int = 8
    budget_ratio: float = 0.05
    min_budget: int = 128
    sink_tokens: int = 4
    recent_tokens: int = 0
    ngram_max: int = 3
    ngram_min: int = 1
    draft_min_context: int = 0
    # Benchmarks of random-weight models only: accept 0..k drafts with these probabilities instead of verifying
    # (the output is then not the model's distribution). None = real verification, always the default.
    replay_acceptance: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.method not in DRAFT_METHODS:
            raise ValueError(f"draft method: must be one of {DRAFT_METHODS}, got {self.method!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"spec k: must be an integer >= 1, got {self.k!r}")
        if not isinstance(self.budget_ratio, (int, float)) or not 0 < self.budget_ratio <= 1:
            raise ValueError(f"budget_ratio: must be in (0, 1], got {self.budget_ratio!r}")
        if not isinstance(self.min_budget, int) or self.min_budget < 1:
            raise ValueError(f"min_budget: must be an integer >= 1, got {self.min_budget!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens: must be an integer >= 0, got {self.sink_tokens!r}")
        if self.sink_tokens >= self.min_budget:
            raise ValueError(f"sink_tokens ({self.sink_tokens}) must be below min_budget ({self.min_budget})")
        if not isinstance(self.recent_tokens, int) or isinstance(self.recent_tokens, bool) \
                or not 0 <= self.recent_tokens <= self.min_budget:
            raise ValueError(f"recent_tokens: must be an integer in [0, min_budget = {self.min_budget}], "
                             f"got {self.recent_tokens!r}")
        if self.replay_acceptance is not None:
            probs = tuple(float(p) for p in self.replay_acceptance)
            if len(probs) != self.k + 1 or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-3):
                raise ValueError(f"replay_acceptance: need k + 1 = {self.k + 1} probabilities >= 0 summing to 1, "
                                 f"got {self.replay_acceptance!r}")
            object.__setattr__(self, "replay_acceptance", probs)
        if not isinstance(self.draft_min_context, int) or isinstance(self.draft_min_context, bool) \
                or self.draft_min_context < 0:
            raise ValueError(f"draft_min_context: must be an integer >= 0, got {self.draft_min_context!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram sizes: need 1 <= ngram_min ({self.ngram_min}) <= ngram_max ({self.ngram_max})")

    @property
    def speculative(self) -> bool:
        return self.method != "none"

    @property
    def drafts_with_model(self) -> bool:
        return self.method in ("pillar", "streaming")

    def max_budget(self, max_model_len: int) -> int:
        """Largest token set a draft step can be given before its own appended slots."""
        return min(max_model_len, max(self.min_budget, math.ceil(self.budget_ratio * max_model_len)))
