"""Steady-state decode batches without prefill: requests admitted as if their prompts were already in the cache.

Timing a few hundred decode steps at context L needs a full batch at L; prefilling it for real would cost more
device time than the measurement. The KV pool is filled with random values instead (attention reads the same
bytes either way), and each request is admitted with its prompt minus the newest token marked computed.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsespec_jax.engine import Engine
from sparsespec_jax.kv_cache import KVCache
from sparsespec_jax.request import Request
from sparsespec_jax.sampling import SamplingParams


def place_at_context(engine: Engine, batch: int, context: int, new_tokens: int, seed: int,
                     reserve: int | None = None,
                     params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Request]:
    """Admit `batch` requests with random `context`-token prompts as already prefilled, with pages for
    `reserve` more tokens (default: all new tokens). `params`: one for all or one per request (default:
    greedy, `new_tokens`, EOS ignored)."""
    rng = np.random.default_rng(seed)
    params = params or SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    per_request = [params] * batch if isinstance(params, SamplingParams) else list(params)
    if len(per_request) != batch:
        raise ValueError(f"params: got {len(per_request)} for a batch of {batch}")
    reserve = new_tokens + 1 if reserve is None else reserve
    requests = [engine.admit_prefilled(rng.integers(0, engine.model_config.vocab_size, context).tolist(), p,
                                       reserve) for p in per_request]
    engine.kv = random_kv(engine.kv, seed)
    return requests


def random_kv(kv: KVCache, seed: int) -> KVCache:
    """A pool of the same shape, dtype and sharding filled with random values, generated in place on its
    devices (a tensor-parallel pool never exists whole on one device)."""
    fill = _pool_filler(kv.k.shape, kv.k.dtype, kv.k.sharding)
    kv.k.delete()                                   # free the old pool before the new one exists
    kv.v.delete()
    k, v = fill(jax.random.key(seed))
    return KVCache(k=k, v=v, page_size=kv.page_size)


@functools.lru_cache(maxsize=8)
def _pool_filler(shape: tuple[int, ...], dtype, sharding):
    """The jitted fill of one pool layout, kept so every engine of that layout reuses its compiled program."""

    @functools.partial(jax.jit, out_shardings=(sharding, sharding))
    def fill(key):
        # One layer at a time, so temporaries stay one layer large (the pool may fill most of the device).
        def layer(key):
            return jax.random.normal(key, shape[1:], jnp.float32).astype(dtype)

        key_k, key_v = jax.random.split(key)
        return (jax.lax.map(layer, jax.random.split(key_k, shape[0])),
                jax.lax.map(layer, jax.random.split(key_v, shape[0])))

    return fill
