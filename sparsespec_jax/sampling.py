"""Per-request sampling on device: parameters, the processed distribution, and batch-independent keys.

Every token is drawn from `processed_log_probs` (temperature, then top-k, then top-p). Greedy decoding
(temperature 0) is a point mass on the argmax, so speculative acceptance treats it like any other distribution.
Random keys come from the request's own seed, the absolute token position and a stream id, never from a shared
per-step key: a request samples the same tokens alone or in any batch, in any row.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SEED_LIMIT = 1 << 32
# positive temperatures below this divide as if equal to it, keeping the scaled logits finite in float32
MIN_TEMPERATURE = 1e-6


class SamplingError(ValueError):
    """A sampling parameter is outside its allowed range."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples (host side). top_k 0 or -1 and top_p 1 switch truncation off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)):
            raise SamplingError(f"temperature: must be a number, got {temperature!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise SamplingError(f"temperature: must be finite and >= 0 (0 = greedy), got {temperature!r}")
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating, np.integer)):
            raise SamplingError(f"top_p: must be a number, got {top_p!r}")
        if not 0 < top_p <= 1:
            raise SamplingError(f"top_p: must be in (0, 1], got {top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise SamplingError(f"top_k: must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise SamplingError(f"seed: must be None or an integer in [0, 2**32), got {self.seed!r}")
        if isinstance(self.stop, str):
            raise SamplingError(f"stop: must be a list or tuple of strings, got the string {self.stop!r}")
        stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop: every entry must be a non-empty string, got {stop!r}")
        stop_token_ids = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in stop_token_ids):
            raise SamplingError(f"stop_token_ids: every entry must be an integer >= 0, got {stop_token_ids!r}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise SamplingError(f"ignore_eos: must be a bool, got {self.ignore_eos!r}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def derive_seed(default_seed: int, request_index: int) -> int:
    """Seed of a request that gave none: (default_seed * 1_000_003 + request_index) mod 2**32.

    Deterministic per (engine seed, request index), so a rerun with the same seed reproduces every request.
    """
    if not _is_int(default_seed) or not 0 <= default_seed < SEED_LIMIT:
        raise SamplingError(f"default_seed: must be an integer in [0, 2**32), got {default_seed!r}")
    if not _is_int(request_index) or request_index < 0:
        raise SamplingError(f"request_index: must be an integer >= 0, got {request_index!r}")
    return (default_seed * 1_000_003 + request_index) % SEED_LIMIT


# How the rows of a batch may truncate their distributions (a static property of the batch, known on the host):
# "none": no row truncates; "top_p": truncating rows use top-p alone, so only the nucleus is searched;
# "small_top_k": every truncating row sets 1 <= top_k <= SMALL_TOP_K (then maybe top-p), so both cuts lie among
# the row's SMALL_TOP_K largest values; "top_k_top_p": any rows, top-k searched first. No cut branches on data
# on the device.
TRUNCATION_CUTS = ("none", "top_p", "small_top_k", "top_k_top_p")
# the largest top_k the "small_top_k" cut serves (Qwen3 recommends 20, many generation configs 50)
SMALL_TOP_K = 64
# values per chunk in the "small_top_k" cut's first pass (one maximum per chunk)
CUT_CHUNK = 128


def truncation_cut(temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> str:
    """The TRUNCATION_CUTS entry covering rows with these parameters (conservative: top_k >= vocab counts as
    truncating, the device then simply keeps everything)."""
    truncates = (temperature > 0) & ((top_k > 0) | (top_p < 1))
    if not truncates.any():
        return "none"
    top_k = top_k[truncates]
    if not (top_k > 0).any():
        return "top_p"
    return "small_top_k" if ((top_k > 0) & (top_k <= SMALL_TOP_K)).all() else "top_k_top_p"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling parameters (host arrays until a jitted step takes them); padding rows are greedy, seed 0."""

    temperature: jax.Array      # f32[R], 0 = greedy
    top_p: jax.Array            # f32[R], 1 = off
    top_k: jax.Array            # i32[R], 0 = off
    seed: jax.Array             # u32[R]
    cut: str = dataclasses.field(default="top_k_top_p", metadata=dict(static=True))   # TRUNCATION_CUTS

    @classmethod
    def from_rows(cls, params: Sequence[SamplingParams], seeds: Sequence[int], num_rows: int) -> "SamplingArrays":
        """Rows 0..len(params)-1 take params[i] with the resolved seeds[i]; the rest are padding."""
        if len(seeds) != len(params):
            raise SamplingError(f"seeds: got {len(seeds)} for {len(params)} sampling params")
        if not _is_int(num_rows) or num_rows < len(params):
            raise SamplingError(f"num_rows: must be an integer >= the {len(params)} rows given, got {num_rows!r}")
        temperature = np.zeros(num_rows, np.float32)
        top_p = np.ones(num_rows, np.float32)
        top_k = np.zeros(num_rows, np.int32)
        seed = np.zeros(num_rows, np.uint32)
        for i, (p, s) in enumerate(zip(params, seeds)):
            if not isinstance(p, SamplingParams):
                raise SamplingError(f"params[{i}]: must be SamplingParams, got {type(p).__name__}")
            if not _is_int(s) or not 0 <= s < SEED_LIMIT:
                raise SamplingError(f"seeds[{i}]: must be an integer in [0, 2**32), got {s!r}")
            temperature[i], top_p[i], top_k[i], seed[i] = p.temperature, p.top_p, max(p.top_k, 0), s
        # host arrays: they travel with the jitted call
        return cls(temperature, top_p, top_k, seed, truncation_cut(temperature, top_k, top_p))

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], num_rows: int, default_seed: int,
                    request_indices: Sequence[int] | None = None) -> "SamplingArrays":
        """Rows with seed None get derive_seed(default_seed, index), index = request_indices[i] or i.

        Pass stable request indices so a request's derived seed does not depend on its place in this batch.
        """
        indices = range(len(params)) if request_indices is None else list(request_indices)
        if len(indices) != len(params):
            raise SamplingError(f"request_indices: got {len(indices)} for {len(params)} sampling params")
        seeds = [p.seed if isinstance(p, SamplingParams) and p.seed is not None else derive_seed(default_seed, i)
                 for p, i in zip(params, indices)]
        return cls.from_rows(params, seeds, num_rows)


class Stream(enum.IntEnum):
    """Independent random streams of one request at one position."""

    SAMPLE = 0      # plain decode, and the bonus token after a fully accepted draft
    DRAFT = 1       # a draft step's proposal
    ACCEPT = 2      # the uniform deciding whether a draft token is accepted
    RESIDUAL = 3    # the correction token drawn from norm(max(0, p - q)) after a rejection
    REPLAY = 4      # a replayed acceptance count (benchmarks of random-weight models only)


def token_key(seed, position, stream, nonce=0) -> jax.Array:
    """Key for one draw: fold_in(fold_in(fold_in(key(seed), position), stream), nonce), broadcast elementwise.

    nonce separates repeated draws of one stream at one position (a draft round's start position).
    """
    seed, position, stream, nonce = jnp.broadcast_arrays(
        jnp.asarray(seed, jnp.uint32), jnp.asarray(position, jnp.int32),
        jnp.asarray(stream, jnp.int32), jnp.asarray(nonce, jnp.int32))

    def one(s, p, st, n):
        key = jax.random.fold_in(jax.random.key(s), p)
        return jax.random.fold_in(jax.random.fold_in(key, st), n)

    keys = jax.vmap(one)(seed.ravel(), position.ravel(), stream.ravel(), nonce.ravel())
    return keys.reshape(seed.shape)


def _per_row(param, logits: jax.Array, dtype) -> jax.Array:
    """Reshape a per-row parameter [R] (or [R, T, ...]) so it broadcasts against logits [R, ..., V]."""
    param = jnp.asarray(param, dtype)
    if param.ndim >= logits.ndim or logits.shape[:param.ndim] != param.shape:
        raise SamplingError(f"sampling parameter of shape {param.shape} does not match the leading axes of "
                            f"logits {logits.shape}")
    return param.reshape(param.shape + (1,) * (logits.ndim - param.ndim))


def _sortable_keys(values: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 values (negative floats flipped whole, positive ones offset)."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 0, bits | jnp.uint32(1 << 31), ~bits)


def _search_ways() -> int:
    """Keys tried per pass of _largest_key. A CPU is bound by the comparisons, so bisection (the fewest: 32
    passes; 37 ms against 16 ways' 185 for 242 rows of 3000 on 2 cores). On an H200, 242 rows of 151936 (a
    whole search, each pass one reduction): 8, 16 and 32 ways took 1.27, 1.57 and 2.48 ms; in a whole step
    (Qwen3-1.7B shape, batch 128, top_p 0.95) 8 and 16 ways took the same time (6.52 and 6.54 ms)."""
    return 16 if jax.default_backend() == "gpu" else 2


def _unrolled_search() -> bool:
    """Whether _largest_key's passes are traced one after another (GPU: no device loop in the step) or run as a
    loop of a fixed count with one compiled pass (elsewhere: a tiny model's pillar step with a top-k and top-p
    cut compiled in 12.5-14 s on 2 CPU cores unrolled, 8.3-9.5 s looped, as long as its greedy step)."""
    return jax.default_backend() == "gpu"


def _weight_at_or_above(keys: jax.Array, weights: jax.Array, tried: jax.Array) -> jax.Array:
    """Per row, the weight of the values whose keys are at or above each tried key: [..., V] x2, [..., W] -> [..., W].
    One reduction of W operands, so each element is read once for all W keys; summed as [..., W, V], XLA re-reads
    the row per key (one H200, 242 rows of 151936, 16 ways: a whole search 4.26 -> 1.58 ms)."""
    partial = tuple(jnp.where(keys >= tried[..., j, None], weights, 0) for j in range(tried.shape[-1]))
    sums = jax.lax.reduce(partial, tuple(jnp.zeros((), weights.dtype) for _ in partial),
                          lambda totals, values: tuple(t + v for t, v in zip(totals, values)), (keys.ndim - 1,))
    return jnp.stack(sums, axis=-1)


def _largest_key(keys: jax.Array, weights: jax.Array, goal: jax.Array) -> jax.Array:
    """Per row ([..., V] -> [..., 1]), the largest key K whose values at or above it weigh at least `goal`
    (weights >= 0; the row's smallest key must qualify, it is never checked). Exact: a search over the key
    range, `ways` - 1 keys per pass, each pass narrowing the range ~`ways`-fold, a fixed number of passes with
    no data-dependent branch, so a dispatch never waits on it (a sort or a conditional fallback would)."""
    ways = _search_ways()
    multiples = jnp.arange(1, ways, dtype=jnp.uint32)

    def one_pass(_, bounds):
        lo, hi = bounds
        step = (hi - lo) // ways + 1
        tried = lo + step * multiples                               # may pass hi, or wrap around below lo
        weight = _weight_at_or_above(keys, weights, tried)
        passed = jnp.sum((tried <= hi) & (tried >= lo) & (weight >= goal), axis=-1, keepdims=True,
                         dtype=jnp.uint32)                          # the keys that qualify are a prefix
        above = lo + step * (passed + 1)
        hi = jnp.where((passed + 1 < ways) & (above <= hi) & (above >= lo), above - 1, hi)
        return lo + step * passed, hi

    bounds = (jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True))
    passes = math.ceil(32 / math.log2(ways))
    return jax.lax.fori_loop(0, passes, one_pass, bounds, unroll=_unrolled_search())[0]


def _truncation_mask(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, cut: str) -> jax.Array:
    """Which tokens top-k then top-p keep ([..., V] bool). Top-k keeps the values at or above the k-th largest
    (all of a tie); top-p then keeps, of those, the values at or above the largest cut whose renormalised mass
    reaches top_p: the minimal nucleus, its top token always, ties with its smallest value included."""
    if cut == "small_top_k":
        return _small_top_k_mask(scaled, top_k, top_p)
    vocab = scaled.shape[-1]
    keys = _sortable_keys(scaled)
    if cut == "top_k_top_p":
        k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k).astype(jnp.float32)
        k_cut = _largest_key(keys, jnp.ones_like(scaled), k)
    else:
        k_cut = jnp.min(keys, axis=-1, keepdims=True)
    in_top_k = keys >= k_cut
    probs = jax.nn.softmax(jnp.where(in_top_k, scaled, -jnp.inf), axis=-1)
    p_cut = _largest_key(keys, probs, top_p)
    return keys >= jnp.where(top_p >= 1, k_cut, jnp.maximum(p_cut, k_cut))


def _largest_values(scaled: jax.Array, count: int) -> jax.Array:
    """Per row, the `count` largest values in descending order, ties repeated ([..., V] -> [..., count]), from
    the few chunks of CUT_CHUNK values whose maxima are the `count` largest: those chunks hold at least `count`
    values at or above the smallest of those maxima, and no other chunk holds a larger value. A top-k over V /
    CUT_CHUNK maxima and one over count * CUT_CHUNK candidates instead of one over the whole vocabulary (XLA's
    top-k moves ~0.05 TB/s on an H200, bench/results/kernels_h200.md)."""
    vocab = scaled.shape[-1]
    chunks = -(-vocab // CUT_CHUNK)
    padded = jnp.pad(scaled, [(0, 0)] * (scaled.ndim - 1) + [(0, chunks * CUT_CHUNK - vocab)],
                     constant_values=-jnp.inf)
    blocks = padded.reshape(scaled.shape[:-1] + (chunks, CUT_CHUNK))
    if chunks > count:
        _, best = jax.lax.top_k(jnp.max(blocks, axis=-1), count)
        blocks = jnp.take_along_axis(blocks, best[..., None], axis=-2)
    return jax.lax.top_k(blocks.reshape(scaled.shape[:-1] + (-1,)), count)[0]


def _small_top_k_mask(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """_truncation_mask for rows with 1 <= top_k <= SMALL_TOP_K: the k-th largest value is read off the row's
    SMALL_TOP_K largest, and so is the nucleus's edge (every value above the k-th is among them with all its
    ties). Only the top-k set's total weight needs the whole row (ties of the k-th value may go past the list)."""
    width = min(SMALL_TOP_K, scaled.shape[-1])
    largest = _largest_values(scaled, width)                                   # [..., width], descending
    k = jnp.clip(top_k, 1, width)
    kth = jnp.take_along_axis(largest, jnp.broadcast_to(k - 1, largest.shape[:-1] + (1,)), axis=-1)
    head = largest[..., :1]
    total = jnp.sum(jnp.where(scaled >= kth, jnp.exp(scaled - head), 0), axis=-1, keepdims=True)
    # weight up to each place of the descending list; a tied value's last place holds its whole mass, and the
    # largest qualifying value is the same whichever of its places qualify
    at_or_above = jnp.cumsum(jnp.exp(largest - head), axis=-1)
    qualifies = (largest > kth) & (at_or_above >= top_p * total)
    edge = jnp.max(jnp.where(qualifies, largest, kth), axis=-1, keepdims=True)
    return scaled >= jnp.where(top_p >= 1, kth, edge)


def processed_log_probs(logits: jax.Array, temperature, top_k, top_p, cut: str = "top_k_top_p") -> jax.Array:
    """Log-probs of the distribution a row samples from; -inf outside its support. Shape and axes of logits.

    temperature scales the logits; top-k keeps the k largest; top-p keeps the smallest set of the most probable
    remaining tokens whose (renormalised) mass reaches top_p, the top token always. Tokens tied with the last
    kept value are all kept, so the support never depends on vocabulary order. temperature 0 gives the one-hot
    of the argmax (first index on ties). Parameters are per row ([R]) and broadcast over middle axes.
    cut (TRUNCATION_CUTS) promises how rows may truncate; "top_k_top_p" is right for any rows.
    """
    if cut not in TRUNCATION_CUTS:
        raise SamplingError(f"cut: must be one of {TRUNCATION_CUTS}, got {cut!r}")
    logits = jnp.asarray(logits, jnp.float32)
    temperature = _per_row(temperature, logits, jnp.float32)
    top_k = _per_row(top_k, logits, jnp.int32)
    top_p = _per_row(top_p, logits, jnp.float32)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, jnp.maximum(temperature, MIN_TEMPERATURE))
    if cut != "none":
        truncates = ~greedy & (((top_k > 0) & (top_k < logits.shape[-1])) | (top_p < 1))
        scaled = jnp.where(truncates & ~_truncation_mask(scaled, top_k, top_p, cut), -jnp.inf, scaled)
    log_probs = scaled - jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    vocab_ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    one_hot = jnp.where(vocab_ids == jnp.argmax(logits, axis=-1, keepdims=True), 0.0, -jnp.inf)
    return jnp.where(greedy, one_hot, log_probs)


def sample_from_log_probs(keys: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One token per key from log_probs [..., V] (Gumbel-max): int32[...]. A point mass yields its token exactly."""
    flat_logp = log_probs.reshape(-1, log_probs.shape[-1])
    tokens = jax.vmap(jax.random.categorical)(keys.ravel(), flat_logp)
    return tokens.astype(jnp.int32).reshape(log_probs.shape[:-1])


def sample_tokens(logits: jax.Array, arrays: SamplingArrays, positions: jax.Array) -> jax.Array:
    """Sample the token at absolute position positions[r] for every row: logits [R, V] -> int32[R]."""
    if logits.ndim != 2:
        raise SamplingError(f"logits: expected [R, V], got shape {logits.shape}")
    if positions.shape != logits.shape[:1]:
        raise SamplingError(f"positions: expected shape {logits.shape[:1]}, got {positions.shape}")
    log_probs = processed_log_probs(logits, arrays.temperature, arrays.top_k, arrays.top_p, arrays.cut)
    return sample_from_log_probs(token_key(arrays.seed, positions, Stream.SAMPLE), log_probs)
