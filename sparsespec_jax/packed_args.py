"""A step's host arrays travel to the device as one int32 buffer.

A jitted call converts every numpy argument separately, one host-to-device transfer each; a step has a few
dozen small arrays (token ids, positions, page tables, row metadata, sampling parameters), so argument handling
was a visible share of the host's time per step. Packing costs one concatenate on the host; unpacking inside
the jit is slicing, free next to the step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Static description of a packed pytree: its structure and each leaf's shape and dtype."""

    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], str], ...]


def pack(tree) -> tuple[np.ndarray, PackedLayout]:
    """Flatten a pytree of 32-bit or bool numpy arrays into one int32 buffer and its layout."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    parts, described = [], []
    for leaf in leaves:
        array = np.asarray(leaf)
        dtype = array.dtype
        described.append((array.shape, dtype.str))
        if dtype.itemsize == 4 and dtype != np.int32:
            array = array.view(np.int32)                 # bits travel unchanged (float32, uint32)
        elif dtype != np.int32 and dtype != np.bool_:    # bools become 0 / 1 in the concatenation
            raise TypeError(f"pack: leaf of dtype {dtype} (shape {array.shape}); only 32-bit and bool "
                            f"arrays can be packed")
        parts.append(array.ravel())
    buffer = np.concatenate(parts, dtype=np.int32) if parts else np.zeros(0, np.int32)
    return buffer, PackedLayout(treedef, tuple(described))


def unpack(buffer: jax.Array, layout: PackedLayout):
    """The pytree `pack` flattened (inside a jit: static slices and bitcasts of the buffer)."""
    leaves, offset = [], 0
    for shape, dtype_name in layout.leaves:
        size = math.prod(shape)
        flat = buffer[offset:offset + size]
        offset += size
        dtype = np.dtype(dtype_name)
        if dtype == np.bool_:
            leaf = flat != 0
        elif dtype == np.int32:
            leaf = flat
        else:
            leaf = jax.lax.bitcast_convert_type(flat, dtype)
        leaves.append(leaf.reshape(shape))
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)
