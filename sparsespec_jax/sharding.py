"""Tensor parallelism: one engine spread over the first N local devices of a one-axis mesh ("tp").

Every device holds whole attention heads: query heads, the KV heads they share, the KV cache pool's and the
draft sets' slices of those KV heads. PillarAttn scores, top-K selection and sparse draft attention therefore
never leave a device. Each layer's projections follow the usual column-then-row split, so a layer costs two
all-reduces of the hidden state (after wo and after w_down):

  wq, wk, wv, biases    column-parallel (heads)         wo       row-parallel (heads)
  w_gate, w_up          column-parallel (intermediate)  w_down   row-parallel (intermediate)
  embed, lm_head        vocabulary-parallel              norms    replicated

The decoder then fuses q/k/v and gate/up (model.fuse_projections) in layouts that keep these splits: wqkv
over KV heads, w_gate_up over the intermediate size.

The embedding and LM head are split over the vocabulary, not the hidden size: tied models use one table for
both, and for the LM head (the widest matmul of a small model) each device then computes a slice of the
logits that only has to be gathered, [rows, V] once, where a hidden split would all-reduce partial logits of
the same size (twice the traffic). The embedding lookup then costs one all-reduce of [tokens, D].

A tensor-parallel degree that does not divide the KV-head count is refused rather than met by replicating
KV heads: replicas would multiply the KV cache, the very memory this engine is built to save. Intermediate
or vocabulary sizes that do not split evenly keep those weights replicated (correct, more memory).

Jitted steps need no mesh argument: placed inputs carry their NamedSharding, jit propagates it, and code that
must know the mesh inside a trace (sharding hints, shard_map around attention) reads it from an input's
type with `mesh_of`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sparsespec_jax.config import ModelConfig, param_shapes, validate_params

TP_AXIS = "tp"

# The axis of each canonical parameter that is split over TP_AXIS; names not listed are replicated.
PARAM_SPLIT_AXIS = {
    "embed": 0, "lm_head": 1,
    "layers.wq": 2, "layers.wk": 2, "layers.wv": 2, "layers.bq": 1, "layers.bk": 1, "layers.bv": 1,
    "layers.wo": 1,
    "layers.w_gate": 2, "layers.w_up": 2, "layers.w_down": 1,
}

# The KV-head axis of each field of the engine's device state (KVCache.k/v [L, Hkv, slots, D],
# DraftSets.positions [slots, L, Hkv, C]); other fields (counts, flags) are replicated.
STATE_HEAD_AXIS = {"k": 1, "v": 1, "positions": 2}


class ShardingError(ValueError):
    """The requested tensor-parallel layout cannot be built for this model or machine."""


def check_tensor_parallel(cfg: ModelConfig, tensor_parallel: int, model_name: str | None = None) -> None:
    """Raise ShardingError naming the model and the counts when this process's devices cannot split it."""
    if not isinstance(tensor_parallel, int) or isinstance(tensor_parallel, bool) or tensor_parallel < 1:
        raise ShardingError(f"tensor_parallel: must be a positive integer, got {tensor_parallel!r}")
    model = model_name or f"this {cfg.arch} model"
    if cfg.num_kv_heads % tensor_parallel or cfg.num_heads % tensor_parallel:
        choices = [n for n in range(1, cfg.num_kv_heads + 1) if cfg.num_kv_heads % n == 0]
        raise ShardingError(
            f"tensor_parallel={tensor_parallel} must divide both the KV-head count ({cfg.num_kv_heads}) and the "
            f"query-head count ({cfg.num_heads}) of {model}: every device holds whole KV heads (they are not "
            f"replicated); choose one of {choices}")
    num_devices = jax.local_device_count()
    if tensor_parallel > num_devices:
        raise ShardingError(f"tensor_parallel={tensor_parallel} exceeds the {num_devices} device(s) available "
                            f"to this process ({jax.default_backend()})")


def make_mesh(cfg: ModelConfig, tensor_parallel: int) -> Mesh:
    """A one-axis mesh over the first `tensor_parallel` local devices (also for 1: one code path).

    Local devices, not global ones: in a multi-process run every process serves its own share of the
    requests with its own engine (data parallel), so no step ever spans processes.
    """
    check_tensor_parallel(cfg, tensor_parallel)
    return Mesh(np.array(jax.local_devices()[:tensor_parallel]), (TP_AXIS,), axis_types=(AxisType.Auto,))


def param_partition_spec(name: str, shape: tuple[int, ...], tensor_parallel: int) -> PartitionSpec:
    """Where canonical parameter `name` of `shape` lives: its split axis over TP_AXIS, or replicated."""
    axis = PARAM_SPLIT_AXIS.get(name)
    if axis is None or tensor_parallel == 1 or shape[axis] % tensor_parallel:
        return PartitionSpec()
    return PartitionSpec(*(TP_AXIS if i == axis else None for i in range(len(shape))))


def param_partition_specs(cfg: ModelConfig, tensor_parallel: int) -> dict[str, PartitionSpec]:
    """PartitionSpec of every canonical parameter of `cfg` (config.param_shapes names)."""
    return {name: param_partition_spec(name, shape, tensor_parallel) for name, shape in param_shapes(cfg).items()}


def place_params(cfg: ModelConfig, params: Mapping[str, Any], mesh: Mesh, dtype) -> dict[str, jax.Array]:
    """Put host parameters on the mesh shard by shard, cast to `dtype`.

    Each device receives only its slice, cut and cast on the host, so no device ever holds a whole split
    tensor (a checkpoint too large for one device still loads).
    """
    validate_params(cfg, params, source="model parameters")
    dtype = jnp.dtype(dtype)
    specs = param_partition_specs(cfg, mesh.shape[TP_AXIS])
    placed = {}
    for name, value in params.items():
        host = np.asarray(value)

        def shard(index, host=host):
            return host[index].astype(dtype, copy=False)

        placed[name] = jax.make_array_from_callback(host.shape, NamedSharding(mesh, specs[name]), shard)
    return placed


def create_on_mesh(make: Callable[[], Any], mesh: Mesh):
    """Build the device state that `make` returns (a KVCache, DraftSets...) directly in its sharded layout:
    the KV-head axis of the fields in STATE_HEAD_AXIS split over the mesh, everything else replicated."""

    def sharding(path, leaf) -> NamedSharding:
        axis = STATE_HEAD_AXIS.get(getattr(path[-1], "name", None))
        if axis is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, PartitionSpec(*(TP_AXIS if i == axis else None for i in range(leaf.ndim))))

    shardings = jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(make))
    return jax.jit(make, out_shardings=shardings)()


# -- inside a trace --------------------------------------------------------------------------------------

def mesh_of(x: jax.Array):
    """The tensor-parallel mesh `x` is laid out on, or None when there is none (or it has one device)."""
    mesh = jax.typeof(x).sharding.mesh
    if TP_AXIS not in mesh.axis_names or mesh.shape[TP_AXIS] == 1:
        return None
    return mesh


def constrain(x: jax.Array, mesh, *spec) -> jax.Array:
    """Pin `x` to PartitionSpec(*spec) on `mesh` (no-op without a mesh) where propagation alone could choose
    a layout that gathers a large array."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def gathered_logits(logits: jax.Array, mesh) -> jax.Array:
    """Logits [..., V] whole on every device. Sampling sorts and reduces whole rows, so they are gathered
    once, here; the matmul's vocabulary split is pinned first (where the head is split), or the partitioner
    may gather the LM head instead of its output."""
    if mesh is None:
        return logits
    rows = (None,) * (logits.ndim - 1)
    if logits.shape[-1] % mesh.shape[TP_AXIS] == 0:
        logits = constrain(logits, mesh, *rows, TP_AXIS)
    return constrain(logits, mesh, *rows, None)


def per_device_heads(kernel: Callable, mesh, in_specs: tuple, out_specs):
    """`kernel`, a function independent per head, run on each device's own heads (shard_map); as is without
    a mesh. The partitioner would otherwise gather a Pallas kernel's inputs and run it whole on every device,
    and gather index arrays (or the pool) for the references' head-indexed gathers. Varying-axes checks are
    off because Pallas output shapes do not declare them."""
    if mesh is None:
        return kernel
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
