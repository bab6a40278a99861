"""Pure-jnp top-K selection over the last axis: the semantics every top-K kernel must reproduce.

Per (row, head) the k[row] largest scores are chosen; ties go to the lower position, and the order is the
total order of float32 bit patterns (-inf below every finite value, -0.0 just below +0.0; scores must not
be NaN). Layout:
  scores  f32[R, H, S]
  k       int32[R]      how many positions each row keeps (clipped to [0, min(max_k, S)])
Returns indices int32[R, H, max_k] (the chosen positions in ascending order, then zeros, which are valid
positions, so consumers may gather with them unmasked) and count int32[R] (the clipped k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def float_order_key(x: jax.Array) -> jax.Array:
    """int32 whose signed order is the total order of the float32 values (bit flip of negative floats)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def selected_count(k: jax.Array, max_k: int, num_positions: int) -> jax.Array:
    return jnp.clip(k.astype(jnp.int32), 0, min(max_k, num_positions))


def topk_select_reference(scores, k, *, max_k: int):
    num_rows, num_heads, num_positions = scores.shape
    count = selected_count(k, max_k, num_positions)
    # Bitwise-not reverses the signed order without overflow: a stable ascending sort of ~key is best-first.
    order = jnp.argsort(~float_order_key(scores), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    positions = jnp.arange(num_positions, dtype=jnp.int32)
    chosen = rank < count[:, None, None]
    ascending = jnp.sort(jnp.where(chosen, positions, num_positions), axis=-1)[..., :max_k]
    ascending = jnp.pad(ascending, ((0, 0), (0, 0), (0, max_k - ascending.shape[-1])),
                        constant_values=num_positions)
    return jnp.where(ascending < num_positions, ascending, 0).astype(jnp.int32), count
