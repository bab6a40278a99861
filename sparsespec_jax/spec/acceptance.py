"""Speculative sampling (Leviathan et al.): verified output is distributed exactly as target sampling.

Draft token x (drawn from q) is accepted with probability min(1, p(x)/q(x)); at the first rejection the
emitted token is drawn from norm(max(0, p - q)); if every draft is accepted a bonus token is drawn from p.
p and q are the *processed* distributions (temperature, top-k, top-p of the request), so the guarantee holds
for every sampling setting, and greedy rows (point masses) reduce to exact match with the target argmax.

Positions: a verify row checks drafts at absolute positions positions[r] + i (i < num_drafts[r]); target_logits
[:, i] is the target's prediction for position positions[r] + i, i.e. the verify input at index i is the token
before it. Each draw keys on (seed, position, stream) so results do not depend on the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsespec_jax.sampling import (SamplingArrays, SamplingError, Stream, processed_log_probs,
                                     sample_from_log_probs, token_key)

NO_TOKEN = -1


def draft_sample(draft_logits: jax.Array, arrays: SamplingArrays, positions: jax.Array, round_start: jax.Array):
    """Sample a draft token for position positions[r]; return it and the processed q it was drawn from.

    round_start[r] is the position of the round's first draft (the `positions` of the verify that will check
    it). It keeps draft randomness fresh when a later round re-drafts the same position: the later draft's q
    depends (through the sparse token set) on the earlier round's discarded drafts, and reusing their noise
    would bias x away from q. Returns (int32[R], f32[R, V]).
    """
    if draft_logits.ndim != 2:
        raise SamplingError(f"draft_logits: expected [R, V], got shape {draft_logits.shape}")
    log_probs = processed_log_probs(draft_logits, arrays.temperature, arrays.top_k, arrays.top_p, arrays.cut)
    keys = token_key(arrays.seed, positions, Stream.DRAFT, round_start)
    return sample_from_log_probs(keys, log_probs), log_probs


def _check_shapes(target_logits, draft_tokens, draft_log_probs, num_drafts, positions):
    if target_logits.ndim != 3 or target_logits.shape[1] < 1:
        raise SamplingError(f"target_logits: expected [R, k+1, V], got shape {target_logits.shape}")
    rows, width, vocab = target_logits.shape
    if draft_tokens.shape != (rows, width - 1):
        raise SamplingError(f"draft_tokens: expected shape {(rows, width - 1)} to match target_logits "
                            f"{target_logits.shape}, got {draft_tokens.shape}")
    if draft_log_probs is not None and draft_log_probs.shape != (rows, width - 1, vocab):
        raise SamplingError(f"draft_log_probs: expected shape {(rows, width - 1, vocab)}, "
                            f"got {draft_log_probs.shape}")
    for name, value in (("num_drafts", num_drafts), ("positions", positions)):
        if value.shape != (rows,):
            raise SamplingError(f"{name}: expected shape {(rows,)}, got {value.shape}")


def verify_drafts(target_logits: jax.Array, draft_tokens: jax.Array, draft_log_probs: jax.Array | None,
                  num_drafts: jax.Array, arrays: SamplingArrays, positions: jax.Array):
    """Accept a prefix of each row's drafts and emit one more token: (tokens int32[R, k+1], num_emitted int32[R]).

    target_logits [R, k+1, V]; draft_tokens int32[R, k]; draft_log_probs [R, k, V] is the processed q each draft
    was sampled from, or None for deterministic proposals (n-gram: q is a point mass on the proposed token).
    num_drafts[r] in [0, k] (clipped) says how many drafts the row has; the rest are ignored, 0 is a plain
    decode step identical to sample_tokens. tokens[r, :num_emitted[r]] are the accepted drafts followed by the
    correction or bonus token; later entries are NO_TOKEN (-1). num_emitted = accepted + 1.
    """
    _check_shapes(target_logits, draft_tokens, draft_log_probs, num_drafts, positions)
    rows, width, _ = target_logits.shape
    k = width - 1
    row_ids = jnp.arange(rows)
    draft_tokens = draft_tokens.astype(jnp.int32)
    num_drafts = jnp.clip(num_drafts.astype(jnp.int32), 0, k)
    positions = positions.astype(jnp.int32)

    target_lp = processed_log_probs(target_logits, arrays.temperature, arrays.top_k, arrays.top_p, arrays.cut)
    if k:
        draft_index = jnp.arange(k, dtype=jnp.int32)
        p_x = jnp.take_along_axis(target_lp[:, :k], draft_tokens[..., None], axis=-1)[..., 0]
        if draft_log_probs is None:
            q_x = jnp.zeros_like(p_x)
        else:
            draft_log_probs = draft_log_probs.astype(jnp.float32)
            q_x = jnp.take_along_axis(draft_log_probs, draft_tokens[..., None], axis=-1)[..., 0]
        u = jax.vmap(jax.random.uniform)(
            token_key(arrays.seed[:, None], positions[:, None] + draft_index, Stream.ACCEPT).ravel()).reshape(rows, k)
        # u < p/q  <=>  log u + log q < log p; p = q accepts surely (u < 1), p(x) = 0 never accepts.
        accept = (jnp.log(u) + q_x < p_x) & (draft_index < num_drafts[:, None])
        num_accepted = jnp.sum(jnp.cumprod(accept, axis=1), axis=1, dtype=jnp.int32)
    else:
        num_accepted = jnp.zeros(rows, jnp.int32)
    rejected = num_accepted < num_drafts

    p_at = target_lp[row_ids, num_accepted]                                     # [R, V]
    if k:
        at = jnp.minimum(num_accepted, k - 1)
        if draft_log_probs is None:
            vocab_ids = jnp.arange(target_logits.shape[-1], dtype=jnp.int32)
            q_at = jnp.where(vocab_ids == draft_tokens[row_ids, at][:, None], 0.0, -jnp.inf)
        else:
            q_at = draft_log_probs[row_ids, at]
        residual = jnp.maximum(jnp.exp(p_at) - jnp.exp(q_at), 0.0)
        mass = jnp.sum(residual, axis=-1, keepdims=True)
        # p <= q everywhere can only arise from rounding (a rejection needs p(x) < q(x), hence mass elsewhere);
        # then p itself is the best available correction.
        use_residual = rejected[:, None] & (mass > 0)
        residual_lp = jnp.log(residual) - jnp.log(jnp.where(mass > 0, mass, 1.0))
        emit_lp = jnp.where(use_residual, residual_lp, p_at)
    else:
        emit_lp = p_at
    stream = jnp.where(rejected, Stream.RESIDUAL, Stream.SAMPLE)
    emitted = sample_from_log_probs(token_key(arrays.seed, positions + num_accepted, stream), emit_lp)

    index = jnp.arange(width, dtype=jnp.int32)[None, :]
    drafts = jnp.concatenate([draft_tokens, jnp.full((rows, 1), NO_TOKEN, jnp.int32)], axis=1)
    tokens = jnp.where(index < num_accepted[:, None], drafts,
                       jnp.where(index == num_accepted[:, None], emitted[:, None], NO_TOKEN))
    return tokens, num_accepted + 1


def replay_acceptance(target_logits: jax.Array, draft_tokens: jax.Array, num_drafts: jax.Array,
                      distribution: tuple[float, ...], arrays: SamplingArrays, positions: jax.Array):
    """Benchmark stand-in for verify_drafts on random-weight models, whose own acceptance means nothing: the
    number of accepted drafts is drawn from `distribution` (probabilities of accepting 0..k, measured on a real
    model) and capped by num_drafts; the emitted token after them is sampled from the target as usual. Output
    is NOT the target distribution. Same shapes and return values as verify_drafts."""
    rows, width, _ = target_logits.shape
    log_dist = jnp.log(jnp.asarray(distribution, jnp.float32))
    keys = token_key(arrays.seed, positions, Stream.REPLAY)
    drawn = jax.vmap(lambda key: jax.random.categorical(key, log_dist))(keys).astype(jnp.int32)
    num_accepted = jnp.minimum(drawn, jnp.clip(num_drafts, 0, width - 1))
    target_lp = processed_log_probs(target_logits[jnp.arange(rows), num_accepted], arrays.temperature,
                                    arrays.top_k, arrays.top_p, arrays.cut)
    emitted = sample_from_log_probs(token_key(arrays.seed, positions + num_accepted, Stream.SAMPLE), target_lp)
    index = jnp.arange(width, dtype=jnp.int32)[None, :]
    drafts = jnp.concatenate([draft_tokens.astype(jnp.int32), jnp.full((rows, 1), NO_TOKEN, jnp.int32)], axis=1)
    tokens = jnp.where(index < num_accepted[:, None], drafts,
                       jnp.where(index == num_accepted[:, None], emitted[:, None], NO_TOKEN))
    return tokens, num_accepted + 1
